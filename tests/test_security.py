"""Who may connect: private run directories, 0600 sockets, loopback listeners, bounded messages, no shell.

A lab kit runs on shared machines (a classroom server, a laptop with other accounts): another user must not be
able to drive a learner's VM over QMP, feed it a migration stream, or hand it fds on the cpr channel. Where this
runs as root, the checks are also made for real, by a process running as `nobody`.
"""

from __future__ import annotations

import ast
import errno
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

import psutil
import pytest
from faults import unix_socket_listening
from helpers import wait_for

import labkit
from labkit.host.hardware import VMConfig
from labkit.host.machine import Machine
from labkit.host.runners import spawn
from labkit.host.runners.emulated import EmulatedRunner
from labkit.lab.engine import Lab
from labkit.qemu_syntax import MiB

pytestmark = pytest.mark.timeout(45)

RAM = 32 * MiB
NOBODY = 65534


def mode(path: str | Path) -> int:
    return os.stat(path).st_mode & 0o777


def connect_as_nobody(paths: list[str]) -> dict[str, str]:
    """Try to connect to each unix socket as user nobody; returns path -> "ok" or the errno name.

    A forked child drops to nobody and only makes system calls (no interpreter start-up as nobody, which could
    not read this Python anyway), then reports over a pipe.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            out = {}
            for p in paths:
                s = socket.socket(socket.AF_UNIX)
                try:
                    s.connect(p)
                    out[p] = "ok"
                except OSError as e:
                    out[p] = errno.errorcode.get(e.errno, str(e.errno))
                finally:
                    s.close()
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    return json.loads(data)


as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")


# -- run directories and socket modes ---------------------------------------------------------------------
def test_run_directories_are_0700():
    with spawn(VMConfig(name="a", ram=RAM)) as m:
        assert mode(m.run_dir) == 0o700
        assert mode(m.qmp_path) == 0o600
        assert mode(m.log_path) & 0o077 == 0
    with Lab(mode="cpr-transfer", ram="32M") as lab:
        assert mode(lab.dir) == 0o700
    assert not os.path.exists(lab.dir)


def test_a_given_run_directory_is_made_private(tmp_path):
    d = tmp_path / "shared"
    d.mkdir(mode=0o777)
    os.chmod(d, 0o777)
    Machine(VMConfig(name="b", ram=RAM), EmulatedRunner(), run_dir=str(d))
    assert mode(d) == 0o700


def _cpr_destination(d: Path) -> Machine:
    cpr = {
        "channel-type": "cpr",
        "addr": {"transport": "socket", "type": "unix", "path": str(d / "cpr.sock")},
    }
    return spawn(VMConfig(name="d", ram=RAM).with_incoming(f"unix:{d}/main.sock", cpr), connect=False)


def test_qmp_main_and_cpr_sockets_are_0600():
    """Each socket is 0600 even in a directory others can enter, so the mode alone keeps them out."""
    d = Path(tempfile.mkdtemp(prefix="labkit-open-"))  # /tmp is 1777: only d's own mode matters
    os.chmod(d, 0o755)
    m = n = None
    try:
        m = _cpr_destination(d)
        n = spawn(VMConfig(name="n", ram=RAM).with_incoming(f"unix:{d}/n-main.sock"))
        os.chmod(n.run_dir, 0o755)  # open the run directory too: only the socket's mode is left
        # cpr.py binds, then chmods: wait out that window (a race reported to its owner), then check
        wait_for(lambda: unix_socket_listening(str(d / "cpr.sock")), "a 0600 cpr socket, listening")
        assert mode(n.qmp_path) == 0o600
        assert mode(d / "n-main.sock") == 0o600
        if os.geteuid() == 0:
            seen = connect_as_nobody([str(d / "cpr.sock"), str(d / "n-main.sock"), n.qmp_path])
            assert set(seen.values()) == {"EACCES"}, seen
            assert m.alive()  # nobody got in: it still waits for its source
            assert n.cmd("query-migrate")["status"] == "setup"
    finally:
        for vm in (m, n):
            if vm is not None:
                vm.kill()
        shutil.rmtree(d, ignore_errors=True)


@as_root
def test_another_user_cannot_reach_a_vm():
    """The run directory alone (0700) stops another user, whatever the socket's own mode."""
    with spawn(VMConfig(name="c", ram=RAM)) as m:
        os.chmod(m.qmp_path, 0o666)  # even if a socket were left open to all ...
        assert connect_as_nobody([m.qmp_path]) == {m.qmp_path: "EACCES"}  # ... the 0700 directory holds
        assert m.cmd("query-status")["running"]


def test_state_file_of_cpr_reboot_is_0600(tmp_path):
    with spawn(VMConfig(name="s", ram=RAM)) as m:
        m.cmd("migrate-set-parameters", {"mode": "cpr-reboot"})
        m.cmd("migrate", {"uri": f"file:{tmp_path}/state"})
        wait_for(lambda: m.cmd("query-migrate")["status"] == "completed", "the save")
        assert mode(tmp_path / "state") == 0o600


# -- inet listeners ---------------------------------------------------------------------------------------
def _listening(pid: int) -> list[tuple[str, int]]:
    conns = psutil.Process(pid).net_connections(kind="inet")
    return [(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]


@pytest.mark.parametrize(
    "uri,host",
    [("tcp::0", "127.0.0.1"), ("tcp:localhost:0", "127.0.0.1"), ("tcp:0.0.0.0:0", "0.0.0.0")],
)
def test_inet_listener_binds_loopback_unless_told(uri, host):
    with spawn(VMConfig(name="t", ram=RAM).with_incoming(uri)) as m:
        listening = wait_for(lambda: _listening(m.pid), "the inet listener")
        assert [ip for ip, _ in listening] == [host], listening


# -- bounded messages -------------------------------------------------------------------------------------
def test_qmp_message_size_is_bounded():
    """A 2 MiB command is answered with an error and not buffered; the same connection goes on working."""
    with spawn(VMConfig(name="q", ram=RAM)) as m:
        s = socket.socket(socket.AF_UNIX)
        m.qmp.close()  # the monitor serves one client at a time
        try:
            s.settimeout(20)
            s.connect(m.qmp_path)
            f = s.makefile("rwb")
            json.loads(f.readline())  # greeting
            f.write(b'{"execute": "qmp_capabilities"}\n')
            f.flush()
            assert "return" in json.loads(f.readline())
            f.write(b'{"execute": "query-status", "arguments": {"x": "' + b"a" * (2 * MiB) + b'"}}\n')
            f.flush()
            reply = json.loads(f.readline())
            assert reply["error"]["desc"] == "JSON token size limit exceeded", reply
            f.write(b'{"execute": "query-status"}\n')
            f.flush()
            line = json.loads(f.readline())
            while "return" not in line:  # skip anything the discarded object left behind
                line = json.loads(f.readline())
            assert line["return"]["running"] is True
            assert psutil.Process(m.pid).memory_info().rss < 512 * MiB
            f.close()
        finally:
            s.close()
    # CPR state (name length, fd count) and main stream (device payload, RAM block count) bounds are
    # exercised on real destinations in test_malformed_input.py.


# -- no shell ---------------------------------------------------------------------------------------------
def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func: ast.expr) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def test_no_shell_anywhere_in_labkit():
    """No shell=True, os.system, os.popen or exec*/spawn*p with a string: nothing a learner types reaches a shell."""
    banned = {"os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput", "eval", "exec"}
    runners = {"subprocess.run", "subprocess.Popen", "subprocess.call", "subprocess.check_call"}
    runners |= {"subprocess.check_output"}
    found = []
    root = Path(labkit.__file__).parent
    files = sorted(root.rglob("*.py"))
    assert len(files) > 20
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for call in _calls(tree):
            name = _name(call.func)
            where = f"{path.relative_to(root)}:{call.lineno}"
            if name in banned:
                found.append(f"{where} {name}()")
            for kw in call.keywords:
                if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    found.append(f"{where} shell=")
            if (
                name in runners
                and call.args
                and not isinstance(call.args[0], ast.List | ast.Tuple | ast.Name)
            ):
                if isinstance(call.args[0], ast.Constant | ast.JoinedStr | ast.BinOp):
                    found.append(f"{where} {name}() with a command string")
    assert not found, found
