"""One emulated VM as a real process: command line, memfd RAM in /proc, QMP from qemu.qmp, stop and cont."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from labkit.host.hardware import VMConfig
from labkit.host.qmp_sync import QMPCommandError
from labkit.host.runners import spawn
from labkit.qemu_syntax import GuestConfig, MiB

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def vm():
    m = spawn(VMConfig(name="t", ram=64 * MiB, guest=GuestConfig(dirty_rate=128 * MiB)))
    yield m
    m.shutdown()


def test_maps_show_memfd_ram_blocks(vm):
    paths = {m.path for m in vm.maps()}
    assert "/memfd:ram0 (deleted)" in paths
    assert "/memfd:pc.bios (deleted)" in paths
    blocks = {b["name"]: b for b in vm.cmd("x-labkit-ram-blocks")}
    assert blocks["ram0"]["kind"] == "memfd" and blocks["ram0"]["size"] == 64 * MiB
    assert vm.cmd("query-memdev")[0]["share"] is True


def test_stop_really_stops_the_guest_and_cont_resumes(vm):
    time.sleep(0.1)
    assert vm.cmd("query-status") == {"status": "running", "running": True}
    vm.cmd("stop")
    assert vm.cmd("query-status")["status"] == "paused"
    a = vm.cmd("x-labkit-guest-stats")
    time.sleep(0.2)
    b = vm.cmd("x-labkit-guest-stats")
    assert a["bytes-written"] == b["bytes-written"] and a["heartbeat-seq"] == b["heartbeat-seq"]
    vm.cmd("cont")
    time.sleep(0.2)
    c = vm.cmd("x-labkit-guest-stats")
    assert c["bytes-written"] > b["bytes-written"]
    names = [e["event"] for e in vm.events]
    assert names[-2:] == ["STOP", "RESUME"]
    assert vm.cmd("x-labkit-verify")["ok"]


def test_qmp_greeting_version_and_errors(vm):
    assert vm.qmp.greeting["QMP"]["version"]["qemu"]["major"] == 10
    assert vm.cmd("query-version")["qemu"]["major"] == 10
    assert vm.cmd("query-name") == {"name": "t"}
    assert {"name": "migrate"} in vm.cmd("query-commands")
    with pytest.raises(QMPCommandError) as e:
        vm.cmd("no-such-command")
    assert e.value.error_class == "CommandNotFound"
    with pytest.raises(QMPCommandError) as e:
        vm.cmd("migrate-set-parameters", {"mode": 7})
    assert "Invalid parameter type for 'mode', expected: string" in str(e.value)
    assert vm.cmd("query-status")["running"]  # the connection stays usable


def test_console_lines_from_the_guest(vm):
    deadline = time.monotonic() + 5
    while not vm.cmd("x-labkit-console")["lines"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "labkit guest" in vm.cmd("x-labkit-console")["lines"][0]


def test_legacy_client_and_reconnect(vm):
    from qemu.qmp.legacy import QEMUMonitorProtocol

    vm.qmp.close()  # one client at a time, as QEMU's -qmp serves
    for _ in range(2):
        c = QEMUMonitorProtocol(vm.qmp_path)
        c.connect()
        assert c.cmd("query-status")["status"] == "running"
        c.close()
    vm.connect()
    assert vm.cmd("query-status")["running"]


def test_qmp_shell_runs_query_status(vm):
    vm.qmp.close()
    shell = os.path.join(os.path.dirname(sys.executable), "qmp-shell")
    if not os.path.exists(shell):
        pytest.skip("qmp-shell is not installed beside this Python")
    out = subprocess.run(
        [shell, vm.qmp_path], input="query-status\n", capture_output=True, text=True, timeout=20
    )
    assert "running" in out.stdout, out.stdout + out.stderr
    vm.connect()


def test_quit_emits_shutdown_and_exits(vm):
    vm.cmd("quit")
    assert vm.wait(10) == 0
    assert vm.qmp.wait_event("SHUTDOWN", timeout=5)["data"]["reason"] == "host-qmp-quit"


@pytest.mark.parametrize(
    "args,needle",
    [
        (["-bogus"], "labkit-vm: -bogus: invalid option"),
        (["-m"], "labkit-vm: -m: requires an argument"),
        (["-object", "memory-backend-memfd,id=r,size=0"], "can't create backend with size 0"),
    ],
)
def test_bad_command_line_exits_1_with_one_line(args, needle):
    p = subprocess.run([sys.executable, "-m", "labkit.vm", *args], capture_output=True, text=True, timeout=30)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and needle in p.stderr


def test_vm_dies_with_its_parent(tmp_path):
    code = (
        "import sys, time; from labkit.host.runners import spawn; from labkit.host.hardware import VMConfig;"
        f"m = spawn(VMConfig(ram=32 << 20), run_dir={str(tmp_path)!r}); print(m.pid, flush=True); time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    parent.stdout.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
            with open(f"/proc/{child}/stat") as f:
                if f.read().split()[2] == "Z":
                    break
        except (ProcessLookupError, FileNotFoundError):
            break
        time.sleep(0.05)
    else:
        os.kill(child, 9)
        pytest.fail("the VM outlived the process that spawned it")
