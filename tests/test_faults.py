"""Faults at every phase of a migration, for every mode, on real processes (the table is faults.FAULTS).

Each scenario holds the migration at an exact point (hold points, or a StreamRelay on the main channel), breaks
it (SIGKILL, SIGSTOP, a cut channel, migrate_cancel, a truncated file), then checks QEMU's rules: before
switchover the source reports `failed` with a reason and its guest runs on; after it, `cont` resumes it; guest
memory is verified either way; the surviving process holds exactly the fds it held before; a destination that
cannot load exits 1 with QEMU's lines (the loader's detail, then its errno). conftest.py fails any test that
leaks a process or an fd in this process.

With LABKIT_FAULTS_JSON=path set, each passing scenario appends what it observed to that file (one JSON object
per line): scripts/fault_table.py renders docs/faults.md from it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from faults import (
    DEVICE_SECTION_MARK,
    FAULTS,
    FaultPoint,
    StreamRelay,
    fd_census,
    unix_socket_listening,
)
from helpers import unix, wait_for

from labkit.host.hardware import VMConfig
from labkit.host.machine import Machine
from labkit.host.qmp_sync import QMPCommandError
from labkit.host.runners import spawn
from labkit.qemu_syntax import GuestConfig, MiB

pytestmark = pytest.mark.timeout(60)

RAM = 32 * MiB
TERMINAL = ("completed", "failed", "cancelled")


# -- helpers ----------------------------------------------------------------------------------------------


class Rig:
    """One scenario's processes, paths and relays; everything is killed and closed at the end."""

    def __init__(self, tmp: Path, mode: str):
        self.tmp, self.mode = tmp, mode
        self.main = str(tmp / "main.sock")  # where the source connects
        self.cpr = str(tmp / "cpr.sock")
        self.state = str(tmp / "vm-state")
        self.config = VMConfig(name="src", ram=RAM, guest=GuestConfig(dirty_rate=16 * MiB))
        self.machines: list[Machine] = []
        self.relays: list[StreamRelay] = []
        self.src: Machine | None = None
        self.census_before = None
        self.outcome: dict = {}

    def recorded(self) -> dict:
        """The outcome with this run's temporary directory spelled $DIR, so the table reads the same each run."""
        return {k: v.replace(str(self.tmp), "$DIR") for k, v in self.outcome.items()}

    def close(self) -> None:
        for r in self.relays:
            r.close()
        for m in self.machines:
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.kill(m.pid, signal.SIGCONT)
            m.kill()

    # processes ------------------------------------------------------------------------------------------
    def source(self, holds: tuple[str, ...] = (), **params) -> Machine:
        m = spawn(self.config)
        self.machines.append(m)
        m.cmd("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
        m.cmd("migrate-set-parameters", {"mode": self.mode, **params})
        if holds:
            m.cmd("x-labkit-hold", {"points": list(holds)})
        time.sleep(0.1)  # the guest writes some memory first
        m.cmd("query-status")
        self.census_before = fd_census(m.pid)
        self.src = m
        return m

    def destination(
        self, *incoming: str | dict, holds: tuple[str, ...] = (), connect: bool = True
    ) -> Machine:
        cfg = replace(self.config, name="dst", holds=list(holds)).with_incoming(*incoming)
        m = spawn(cfg, connect=connect)
        self.machines.append(m)
        return m

    def cpr_destination(self, holds: tuple[str, ...] = (), main: str | None = None) -> Machine:
        m = self.destination(f"unix:{main or self.main}", unix(self.cpr, "cpr"), holds=holds, connect=False)
        wait_for(lambda: unix_socket_listening(self.cpr), "the destination to listen on the cpr channel")
        return m

    def migrate(self, main: str | None = None) -> None:
        assert self.src is not None
        if self.mode == "cpr-transfer":
            self.src.cmd("migrate", {"channels": [unix(main or self.main), unix(self.cpr, "cpr")]})
        elif self.mode == "cpr-reboot":
            self.src.cmd("migrate", {"uri": f"file:{self.state}"})
        else:
            self.src.cmd("migrate", {"uri": f"unix:{main or self.main}"})

    def relay(self, back: str, **kw) -> StreamRelay:
        r = StreamRelay(self.main, back, **kw)
        self.relays.append(r)
        return r

    # observing ------------------------------------------------------------------------------------------
    @staticmethod
    def held(m: Machine, point: str) -> None:
        wait_for(lambda: m.cmd("x-labkit-hold")["held-at"] == point, f"{m.config.name} to hold at {point}")

    @staticmethod
    def status(m: Machine, statuses=TERMINAL) -> dict:
        return wait_for(
            lambda: (i := m.cmd("query-migrate"))["status"] in statuses and i, f"status in {statuses}"
        )

    @staticmethod
    def log_says(m: Machine, text: str) -> None:
        wait_for(lambda: text in m.log(), f"{text!r} in the log of {m.config.name}")

    def source_survives(self, expect: str, cont: bool = False, error_has: str | None = None) -> None:
        """The source's migration ended as `expect`; its guest runs (after `cont`), memory intact, fds as before."""
        src = self.src
        assert src is not None
        info = self.status(src)
        assert info["status"] == expect, info
        if expect == "failed":
            assert info.get("error-desc"), info
            if error_has:
                assert error_has in info["error-desc"], info
        state = src.cmd("query-status")["status"]
        if cont:
            assert state == "postmigrate"
            src.cmd("cont")
        wait_for(lambda: src.cmd("query-status")["status"] == "running", "the source guest to run")
        beat = src.cmd("x-labkit-guest-stats")["heartbeat-seq"]
        wait_for(lambda: src.cmd("x-labkit-guest-stats")["heartbeat-seq"] > beat, "the guest to run on")
        verify = src.cmd("x-labkit-verify")
        assert verify["ok"], verify
        assert verify["written"] > 0
        census = wait_for(lambda: (c := fd_census(src.pid)) == self.census_before and c, "fds as before", 5)
        assert census == self.census_before
        text = f"`{expect}`"
        if info.get("error-desc"):
            text += f": {info['error-desc']}"
        if cont:
            text += f"; was `{state}`, `cont`"
        self.outcome["source"] = text
        self.outcome["guest"] = f"running, {verify['written']} written pages verified"
        self.outcome["fds"] = f"source fds unchanged ({sum(census.values())})"

    def exits_with_qemus_lines(self, m: Machine, who: str = "destination") -> str:
        """Exit 1 with QEMU's last words: one line, or for a failed load of the main stream QEMU's two, the
        loader's detail (error_report) and then `load of migration failed: <strerror>`."""
        rc = m.wait(20)
        lines = [ln for ln in m.log().splitlines() if ln.strip() and "holding at" not in ln]
        assert rc == 1, (rc, lines)
        assert lines and all(ln.startswith("labkit-vm: ") for ln in lines), lines
        assert len(lines) == 1 or (
            len(lines) == 2 and lines[1].startswith("labkit-vm: load of migration failed: ")
        ), lines
        self.outcome[who] = "exit 1: " + " / ".join(lines)
        return lines[-1]

    def killed(self, m: Machine, who: str = "destination") -> None:
        m.kill()
        self.outcome.setdefault(who, "killed")


@pytest.fixture
def rig(request, tmp_path):
    fault: FaultPoint = request.node.callspec.params["fault"]
    r = Rig(tmp_path, fault.mode)
    try:
        yield r
    finally:
        r.close()


def record(fault: FaultPoint, outcome: dict) -> None:
    """Append what a passing scenario observed, for scripts/fault_table.py."""
    path = os.environ.get("LABKIT_FAULTS_JSON")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"id": fault.id, **outcome}) + "\n")


# -- scenarios, by fault id -------------------------------------------------------------------------------
SCENARIOS: dict[str, Callable[[Rig], None]] = {}


def scenario(*ids: str):
    def register(fn):
        for i in ids:
            SCENARIOS[i] = fn
        return fn

    return register


@scenario("cpr-transfer/dst-killed-waiting-on-cpr")
def _dst_killed_waiting_on_cpr(r: Rig) -> None:
    r.source()
    r.killed(r.cpr_destination())
    with pytest.raises(QMPCommandError) as e:
        r.migrate()
    assert str(e.value) == f"Failed to connect to '{r.cpr}': Connection refused"
    r.outcome["migrate"] = f"error: {e.value}"
    r.source_survives("failed", error_has="Connection refused")


@scenario("cpr-transfer/dst-killed-at-cpr-load")
def _dst_killed_at_cpr_load(r: Rig) -> None:
    r.source()
    dst = r.cpr_destination(holds=("cpr-load",))
    r.migrate()
    r.log_says(dst, "holding at cpr-load")
    assert r.src.cmd("query-migrate")["status"] == "setup"
    r.killed(dst)
    r.source_survives("failed", error_has=r.main)


@scenario("cpr-transfer/dst-killed-after-fds")
def _dst_killed_after_fds(r: Rig) -> None:
    r.source(holds=("cpr-hup",))
    dst = r.cpr_destination()
    r.migrate()
    r.held(r.src, "cpr-hup")
    dst.connect()
    assert dst.cmd("query-status")["status"] == "inmigrate"
    r.killed(dst)
    r.src.cmd("x-labkit-continue")
    r.source_survives("failed", error_has="Connection refused")


@scenario("cpr-transfer/dst-killed-main-connected", "normal/dst-killed-main-connected")
def _dst_killed_main_connected(r: Rig) -> None:
    r.source(holds=("main-connected",))
    dst = r.cpr_destination() if r.mode == "cpr-transfer" else r.destination(f"unix:{r.main}")
    r.migrate()
    r.held(r.src, "main-connected")
    stopped = "finish-migrate" if r.mode == "cpr-transfer" else "running"
    assert r.src.cmd("query-status")["status"] == stopped
    r.killed(dst)
    r.src.cmd("x-labkit-continue")
    r.source_survives("failed")


@scenario("cpr-transfer/channel-cut-by-dst-end", "normal/channel-cut-by-dst-end")
def _channel_cut_by_dst_end(r: Rig) -> None:
    back = str(r.tmp / "dst-main.sock")
    holds = ("main-connected",) if r.mode == "cpr-transfer" else ()
    r.source(holds=holds)
    # cpr-transfer's stream is a few hundred bytes, written at once: cut before the first one
    limit = 0 if r.mode == "cpr-transfer" else 1 * MiB
    dst = r.cpr_destination(main=back) if r.mode == "cpr-transfer" else r.destination(f"unix:{back}")
    relay = r.relay(back, limit=limit, then="cut")
    r.migrate()
    wait_for(relay.done.is_set, "the relay to cut the channel")
    if holds:
        r.src.cmd("x-labkit-continue")
    r.exits_with_qemus_lines(dst)
    r.source_survives("failed")


@scenario("cpr-transfer/dst-killed-loading-devices", "normal/dst-killed-loading-devices")
def _dst_killed_loading_devices(r: Rig) -> None:
    back = str(r.tmp / "dst-main.sock")
    r.source()
    dst = r.cpr_destination(main=back) if r.mode == "cpr-transfer" else r.destination(f"unix:{back}")
    relay = r.relay(back, mark=DEVICE_SECTION_MARK, extra=10, then="stall")
    r.migrate()
    wait_for(relay.reached.is_set, "the stream to reach the cpu section")
    assert r.status(r.src)["status"] == "completed"
    if r.mode == "cpr-transfer":
        dst.connect()
    assert dst.cmd("query-migrate")["status"] == "active"  # still loading, starved mid-section
    r.killed(dst)
    r.source_survives("completed", cont=True)


@scenario("cpr-transfer/dst-killed-before-resume", "normal/dst-killed-before-resume")
def _dst_killed_before_resume(r: Rig) -> None:
    r.source()
    if r.mode == "cpr-transfer":
        dst = r.cpr_destination(holds=("loaded",))
    else:
        dst = r.destination(f"unix:{r.main}", holds=("loaded",))
    r.migrate()
    assert r.status(r.src)["status"] == "completed"
    dst.connect()
    r.held(dst, "loaded")
    r.killed(dst)
    r.source_survives("completed", cont=True)


@scenario("cpr-transfer/src-killed-after-fds")
def _src_killed_after_fds(r: Rig) -> None:
    src = r.source(holds=("cpr-hup",))
    dst = r.cpr_destination()
    r.migrate()
    r.held(src, "cpr-hup")
    dst.connect()
    before = fd_census(dst.pid)
    r.killed(src, "source")
    time.sleep(0.2)
    assert dst.cmd("query-status")["status"] == "inmigrate"
    assert dst.cmd("query-migrate")["status"] == "setup"
    verify = dst.cmd("x-labkit-verify")  # the memfds the destination adopted hold the guest, intact
    assert verify["ok"] and verify["written"] > 0, verify
    assert fd_census(dst.pid) == before
    rc = dst.shutdown()
    assert rc == 0
    r.outcome["destination"] = (
        f"`inmigrate`, waiting on main; its memfds verified ({verify['written']} written pages); "
        f"`quit` exit {rc}"
    )
    r.outcome["fds"] = "destination fds unchanged"
    r.outcome["guest"] = "not running; intact in the destination's memfds (verified)"


@scenario("cpr-transfer/src-killed-main-connected", "normal/src-killed-at-switchover")
def _src_killed_mid_stream(r: Rig) -> None:
    point = "main-connected" if r.mode == "cpr-transfer" else "switchover"
    src = r.source(holds=(point,))
    dst = r.cpr_destination() if r.mode == "cpr-transfer" else r.destination(f"unix:{r.main}")
    r.migrate()
    r.held(src, point)
    r.killed(src, "source")
    r.exits_with_qemus_lines(dst)


@scenario("normal/dst-killed-before-migrate")
def _dst_killed_before_migrate(r: Rig) -> None:
    r.source()
    r.killed(r.destination(f"unix:{r.main}"))
    r.migrate()
    r.source_survives("failed", error_has="Connection refused")


@scenario("normal/dst-killed-at-switchover")
def _dst_killed_at_switchover(r: Rig) -> None:
    r.source(holds=("switchover",))
    dst = r.destination(f"unix:{r.main}")
    r.migrate()
    r.held(r.src, "switchover")
    r.killed(dst)
    r.src.cmd("x-labkit-continue")
    r.source_survives("failed")
    events = [e["event"] for e in r.src.cmd("x-labkit-events")]
    stop = len(events) - 1 - events[::-1].index("STOP")
    assert "RESUME" in events[stop:], events[stop:]  # stopped for switchover, then restarted


@scenario("normal/channel-closed-by-src-end")
def _channel_closed_by_src_end(r: Rig) -> None:
    src = r.source(**{"max-bandwidth": 8 * MiB})
    dst = r.destination(f"unix:{r.main}")
    r.migrate()
    wait_for(lambda: src.cmd("x-labkit-query-migrate")["source"]["bytes-main"] > 1 * MiB, "1 MiB sent")
    src.cmd("migrate_cancel")
    r.exits_with_qemus_lines(dst)
    r.source_survives("cancelled")


@scenario("normal/dst-frozen-then-cancel")
def _dst_frozen_then_cancel(r: Rig) -> None:
    src = r.source(holds=("main-connected",))
    dst = r.destination(f"unix:{r.main}")
    r.migrate()
    r.held(src, "main-connected")
    os.kill(dst.pid, signal.SIGSTOP)
    src.cmd("x-labkit-continue")

    def stuck() -> bool:  # the socket buffers are full: nothing more goes out
        a = src.cmd("x-labkit-query-migrate")["source"]["bytes-main"]
        time.sleep(0.3)
        return a > 0 and src.cmd("x-labkit-query-migrate")["source"]["bytes-main"] == a

    wait_for(stuck, "the source to block on the frozen destination")
    assert src.cmd("query-migrate")["status"] == "active"
    src.cmd("migrate_cancel")
    r.source_survives("cancelled")
    os.kill(dst.pid, signal.SIGCONT)
    r.exits_with_qemus_lines(dst)


@scenario("cpr-reboot/src-killed-while-saving")
def _src_killed_while_saving(r: Rig) -> None:
    src = r.source(holds=("main-connected",))
    r.migrate()
    r.held(src, "main-connected")
    r.killed(src, "source")
    dst = r.destination("defer")
    dst.cmd("migrate-incoming", {"uri": f"file:{r.state}"})
    r.exits_with_qemus_lines(dst, "restoring process")


@scenario("cpr-reboot/truncated-state-file")
def _truncated_state_file(r: Rig) -> None:
    src = r.source()
    r.migrate()
    assert r.status(src)["status"] == "completed"
    size = os.path.getsize(r.state)
    os.truncate(r.state, size // 2)
    dst = r.destination("defer")
    dst.cmd("migrate-incoming", {"uri": f"file:{r.state}"})
    r.exits_with_qemus_lines(dst, "restoring process")
    r.source_survives("completed", cont=True)


@scenario("cpr-reboot/dst-killed-before-resume")
def _restore_killed_before_resume(r: Rig) -> None:
    src = r.source()
    r.migrate()
    assert r.status(src)["status"] == "completed"
    assert src.shutdown() == 0  # cpr-reboot: the old process quits once the state is saved
    r.outcome["source"] = "`completed`, then `quit` (as cpr-reboot does)"
    first = r.destination("defer", holds=("loaded",))
    first.cmd("migrate-incoming", {"uri": f"file:{r.state}"})
    r.held(first, "loaded")
    r.killed(first, "restoring process")
    second = r.destination("defer")
    second.cmd("migrate-incoming", {"uri": f"file:{r.state}"})
    assert r.status(second)["status"] == "completed"
    assert second.cmd("query-status")["status"] == "running"
    verify = second.cmd("x-labkit-verify")
    assert verify["ok"] and verify["written"] > 0, verify
    r.outcome["restoring process"] = "killed at `loaded`; a second restore `completed`, `running`"
    r.outcome["guest"] = f"running in the second process, {verify['written']} written pages verified"


# -- the tests --------------------------------------------------------------------------------------------
def test_every_fault_point_has_a_scenario():
    assert set(SCENARIOS) == {f.id for f in FAULTS}
    assert len({f.id for f in FAULTS}) == len(FAULTS)


@pytest.mark.parametrize("fault", FAULTS, ids=[f.id for f in FAULTS])
def test_fault(fault: FaultPoint, rig: Rig):
    SCENARIOS[fault.id](rig)
    record(fault, rig.recorded())


def test_quit_while_blocked_on_a_frozen_destination(tmp_path):
    """`quit` on a source whose migration thread is blocked writing to a stopped destination ends it promptly."""
    src = spawn(VMConfig(name="src", ram=RAM, guest=GuestConfig(dirty_rate=16 * MiB)))
    dst = spawn(VMConfig(name="dst", ram=RAM).with_incoming(f"unix:{tmp_path}/m.sock"))
    try:
        src.cmd("x-labkit-hold", {"points": ["main-connected"]})
        src.cmd("migrate", {"uri": f"unix:{tmp_path}/m.sock"})
        Rig.held(src, "main-connected")
        os.kill(dst.pid, signal.SIGSTOP)
        src.cmd("x-labkit-continue")
        time.sleep(0.5)
        assert src.cmd("query-migrate")["status"] == "active"
        t0 = time.monotonic()
        assert src.shutdown() == 0
        assert time.monotonic() - t0 < 5
    finally:
        os.kill(dst.pid, signal.SIGCONT)
        dst.kill()
        src.kill()
