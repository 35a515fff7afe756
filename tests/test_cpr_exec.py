"""cpr-exec (QEMU 10.2) in the emulator and the lab: the same PID, a new program, guest RAM kept in its memfds.

Every refusal is checked with QEMU 10.2's text (or, where QEMU 10.2 has none, with what it does instead) and
with the source guest still running and its memory verified; a failed exec leaves the guest running in the
old program with its RAM intact; a full migration through the CLI keeps ram0's inode at a new address.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from labkit.host.hardware import VMConfig
from labkit.host.machine import Machine
from labkit.host.runners.emulated import EmulatedRunner, emulated_argv
from labkit.lab.engine import Lab
from labkit.qemu_syntax import GuestConfig
from labkit.vm.memory import CPR_BLOCKER_TEXT
from labkit.vm.migration.cpr_exec import CPR_EXEC_STATE_NAME, IGNORED_CHANNEL_TEXT, NO_COMMAND_TEXT
from tests.helpers import CPR_TRANSFER_SOURCE_EVENTS, unix, wait_for

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parent.parent
O_CLOEXEC = 0o2000000


def _source(tmp_path, **kw) -> Machine:
    cfg = VMConfig(name="source", ram="64M", guest=GuestConfig(dirty_rate=16 << 20), **kw)
    m = Machine(cfg, EmulatedRunner()).launch()
    m.cmd("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
    m.cmd("migrate-set-parameters", {"mode": "cpr-exec"})
    return m


def _memfds(pid: int) -> dict[int, str]:
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("/memfd:"):
            out[int(name)] = target
    return out


def _cloexec(pid: int, fd: int) -> bool:
    for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("flags:"):
            return bool(int(line.split()[1], 8) & O_CLOEXEC)
    raise AssertionError("no flags in fdinfo")


def _still_running(m: Machine) -> None:
    """The refused or failed migration left the source guest running, its memory exactly as written."""
    assert m.cmd("query-status") == {"status": "running", "running": True}
    before = m.cmd("x-labkit-guest-stats")["heartbeat-seq"]
    v = m.cmd("x-labkit-verify")
    assert v["ok"], v
    wait_for(lambda: m.cmd("x-labkit-guest-stats")["heartbeat-seq"] > before, "the guest to keep beating")


def _events(m: Machine) -> list[str]:
    return [" ".join([e["event"], str(e.get("data", {}).get("status", ""))]).strip() for e in m.events]


def test_cpr_exec_command_is_a_parameter_empty_by_default(tmp_path):
    with _source(tmp_path) as m:
        params = m.cmd("query-migrate-parameters")
        assert params["mode"] == "cpr-exec" and params["cpr-exec-command"] == []
        m.cmd("migrate-set-parameters", {"cpr-exec-command": ["true", "-x"]})
        assert m.cmd("query-migrate-parameters")["cpr-exec-command"] == ["true", "-x"]
        with pytest.raises(Exception, match=r"Invalid parameter type for 'cpr-exec-command\[1\]'"):
            m.cmd("migrate-set-parameters", {"cpr-exec-command": ["true", 3]})


@pytest.mark.parametrize(
    "kw,block",
    [({"share": False}, "ram0"), ({"aux_ram_share": False}, "/rom@etc/acpi/rsdp")],
    ids=["share=off", "aux-ram-share=off"],
)
def test_ram_blockers_use_the_cpr_text_and_the_guest_keeps_running(tmp_path, kw, block):
    with _source(tmp_path, **kw) as m:
        m.cmd("migrate-set-parameters", {"cpr-exec-command": ["true"]})
        text = CPR_BLOCKER_TEXT.format(name=block)
        assert text in m.cmd("query-migrate")["blocked-reasons"]
        with pytest.raises(Exception) as err:
            m.cmd("migrate", {"uri": f"file:{tmp_path}/state"})
        assert str(err.value).endswith(text)
        _still_running(m)
        assert not any(t.endswith(CPR_EXEC_STATE_NAME) for t in _memfds(m.pid).values())


@pytest.mark.parametrize("command", [None, []], ids=["never-set", "empty-list"])
def test_empty_command_is_refused_with_qemu_10_2_text(tmp_path, command):
    with _source(tmp_path) as m:
        if command is not None:
            m.cmd("migrate-set-parameters", {"cpr-exec-command": command})
        with pytest.raises(Exception) as err:
            m.cmd("migrate", {"uri": f"file:{tmp_path}/state"})
        assert str(err.value).endswith(NO_COMMAND_TEXT)
        _still_running(m)


def test_streaming_uri_fails_to_connect_and_the_guest_keeps_running(tmp_path):
    """QEMU 10.2 has no check for a streaming URI in cpr-exec (its docs warn it may block); a unix URI that
    nobody listens on fails at connect, before the guest is stopped, and the saved state is dropped."""
    with _source(tmp_path) as m:
        m.cmd("migrate-set-parameters", {"cpr-exec-command": ["true"]})
        path = tmp_path / "nobody.sock"
        m.cmd("migrate", {"uri": f"unix:{path}"})
        info = wait_for(
            lambda: (q := m.cmd("query-migrate")).get("status") == "failed" and q, "the migration to fail"
        )
        assert info["error-desc"] == f"Failed to connect to '{path}': No such file or directory"
        assert "STOP" not in _events(m)
        _still_running(m)
        assert not any(t.endswith(CPR_EXEC_STATE_NAME + " (deleted)") for t in _memfds(m.pid).values())


def test_failed_exec_fails_after_completed_and_resumes_the_guest_with_its_ram(tmp_path):
    """execvp fails (no such program): QEMU 10.2 prints the error, goes from completed to failed, drops the
    state memfd, sets close-on-exec again and restarts the guest in the old program."""
    with _source(tmp_path) as m:
        missing = str(tmp_path / "no-such-qemu")
        m.cmd("migrate-set-parameters", {"cpr-exec-command": [missing, "-incoming", "defer"]})
        ram_fds = [b["fd"] for b in m.cmd("x-labkit-ram-blocks") if b["kind"] == "memfd"]
        m.cmd("migrate", {"uri": f"file:{tmp_path}/state"})
        info = wait_for(
            lambda: (q := m.cmd("query-migrate")).get("status") == "failed" and q, "the exec to fail"
        )
        assert info["error-desc"] == f"execvp {missing} failed: No such file or directory"
        wait_for(lambda: "RESUME" in _events(m), "RESUME")
        order = [e for e in _events(m) if e.split()[0] in ("MIGRATION", "STOP", "RESUME")]
        assert order[-4:] == ["MIGRATION device", "MIGRATION completed", "MIGRATION failed", "RESUME"]
        assert order.index("STOP") < order.index("MIGRATION completed")
        _still_running(m)
        fds = _memfds(m.pid)
        assert not any(CPR_EXEC_STATE_NAME in t for t in fds.values())
        assert ram_fds and all(_cloexec(m.pid, fd) for fd in ram_fds)
        assert f"labkit-vm: execvp {missing} failed: No such file or directory" in m.log()


def test_new_program_dying_before_it_loads_ends_the_vm(tmp_path):
    """Once execvp succeeded the old program is gone: if the new one exits before loading (a bad option
    here), the process ends with its one-line error, as QEMU 10.2's would, and the VM is lost."""
    with _source(tmp_path) as m:
        m.cmd("migrate-set-parameters", {"cpr-exec-command": [sys.executable, "-m", "labkit.vm", "-m", "bogus"]})
        m.cmd("migrate", {"uri": f"file:{tmp_path}/state"})
        assert m.wait(30) == 1
        assert "labkit-vm: -m bogus:" in m.log() or "labkit-vm: " in m.log().splitlines()[-1]


def test_cpr_channel_is_ignored_on_both_sides(tmp_path):
    """QEMU 10.2's cpr_state_save ignores a cpr channel in cpr-exec mode; the new program warns and goes on."""
    with _source(tmp_path) as src:
        dcfg = replace(src.config, name="destination").with_incoming(
            f"file:{tmp_path}/state", unix(tmp_path / "cpr.sock", "cpr")
        )
        dst = Machine(dcfg, EmulatedRunner())
        src.cmd("migrate-set-parameters", {"cpr-exec-command": emulated_argv(dcfg, dst.qmp_path)})
        channels = [
            {"channel-type": "main", "addr": {"transport": "file", "filename": f"{tmp_path}/state", "offset": 0}},
            unix(tmp_path / "cpr.sock", "cpr"),
        ]
        src.cmd("migrate", {"channels": channels})
        wait_for(lambda: os.path.exists(dst.qmp_path), "the new program's monitor")
        with dst.adopt(src):
            src.qmp.close()
            dst.connect(30)
            wait_for(lambda: dst.cmd("query-status")["status"] == "running", "the guest to resume")
            assert dst.cmd("x-labkit-info")["pid"] == src.pid
            assert dst.cmd("x-labkit-verify")["ok"]
            assert f"labkit-vm: warning: {IGNORED_CHANNEL_TEXT}" in dst.log()
            # QEMU 10.2's order: the old program's events as in the other CPR modes, then the new program's
            # RESUME (it starts with the events capability off, as a fresh QEMU does)
            pre = dst.cmd("x-labkit-query-migrate")["pre-exec"]
            assert [f"{e['event']} {e.get('data', {}).get('status', '')}".strip() for e in pre["events"]] == (
                CPR_TRANSFER_SOURCE_EVENTS
            )
            assert [e["event"] for e in dst.cmd("x-labkit-events")] == ["RESUME"]
            assert not (tmp_path / "cpr.sock").exists()  # nobody listened on it


def test_stepping_shows_the_state_memfd_then_the_same_pid(tmp_path):
    with Lab(mode="cpr-exec", ram="64M", dirty_rate="16M") as lab:
        snaps = [lab.step() for _ in lab.phases]
        r = lab.run()
    saved, execd = snaps[1], snaps[2]
    assert saved.states == {"source": "postmigrate", "destination": None}
    assert CPR_EXEC_STATE_NAME in {f["name"] for f in saved.fds["source"]}
    assert execd.states["destination"] == "inmigrate" and "exec'd" in execd.states["source"]
    assert CPR_EXEC_STATE_NAME in {f["name"] for f in execd.fds["destination"]}  # held until incoming starts
    assert CPR_EXEC_STATE_NAME not in {f["name"] for f in snaps[3].fds["destination"]}
    src_ram0 = next(m for m in saved.mappings if m.block == "ram0")
    dst_ram0 = next(m for m in execd.mappings if m.block == "ram0")
    assert src_ram0.inode == dst_ram0.inode and src_ram0.start != dst_ram0.start
    assert r.status == "completed" and r.guest_verified
    assert r.pids["source"] == r.pids["destination"]
    assert saved.pids["source"] == execd.pids["destination"] == execd.pids["source"] == r.pids["source"]
    # after the load, the new program holds the same memfds as the old one, and nothing more
    assert {f["inode"] for f in snaps[4].fds["destination"]} == {
        f["inode"] for f in saved.fds["source"] if f["name"] != CPR_EXEC_STATE_NAME
    }


def test_cli_cpr_exec_1g_json():
    """Done when: `labkit migrate --mode cpr-exec --ram 1G --json` completes, verified, one PID, ram0 the same
    inode at a new address, no cpr channel bytes; nothing is left running."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "labkit.cli.main", "migrate", "--mode", "cpr-exec", "--ram", "1G", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=110, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["status"] == "completed" and r["guest_verified"] is True
    assert r["pids"]["source"] == r["pids"]["destination"] is not None
    assert not psutil.pid_exists(r["pids"]["source"]) or psutil.Process(r["pids"]["source"]).status() == "zombie"
    ram0 = {m["side"]: m for m in r["mappings"] if m["block"] == "ram0"}
    assert ram0["source"]["inode"] == ram0["destination"]["inode"]
    assert ram0["source"]["start"] != ram0["destination"]["start"]
    assert r["bytes"]["cpr"] is None and r["bytes"]["main"] > 0
    names = [t["detail"] for t in r["timeline"] if t["kind"] == "checkpoint"]
    assert names.index("cpr-exec") < names.index("dst-exec-entered")  # the exec's own time is in the timeline


def test_every_mode_reports_both_pids():
    with Lab(mode="cpr-transfer", ram="32M") as lab:
        r = lab.run()
    assert r.status == "completed"
    assert r.pids["source"] and r.pids["destination"] and r.pids["source"] != r.pids["destination"]
    assert r.to_dict()["pids"] == r.pids


def test_qemu_backend_refuses_cpr_exec_naming_the_version():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "labkit.cli.main", "migrate", "--backend", "qemu", "--mode", "cpr-exec"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, cwd=ROOT)
    assert out.returncode == 1 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "QEMU 10.2" in lines[0], out.stderr


def test_the_new_program_still_dies_with_the_lab():
    """PR_SET_PDEATHSIG survives execve (it is cleared only for set-user-ID programs): a VM that cpr-exec'd
    still gets SIGKILL when the process that spawned it dies."""
    script = (
        "from labkit.lab.engine import Lab\n"
        "import time\n"
        "lab = Lab(mode='cpr-exec', ram='32M')\n"
        "r = lab.run()\n"
        "print(r.pids['destination'], r.status, flush=True)\n"
        "time.sleep(120)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        pid, status = parent.stdout.readline().split()
        assert status == "completed"
        vm = psutil.Process(int(pid))
        assert vm.ppid() == parent.pid and vm.status() != psutil.STATUS_ZOMBIE
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()

    def gone() -> bool:
        try:
            return vm.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_for(gone, "the exec'd VM to die with its parent", timeout=10)
