"""Lab: one migration between two VM processes, phase by phase, for either backend.

A Lab takes a Scenario (labkit.lab.scenario: what to migrate and how) and a runner (labkit.host.runners: which
program runs the VMs), spawns the source, then the destination as the mode wants it, drives both over QMP
exactly as one drives QEMU 10, and measures what happened. `step()` advances one phase and returns a
Snapshot; `run()` does the rest and returns the Result, which carries the Scenario back.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from labkit.host.hardware import VMConfig
from labkit.host.limits import convergence_hint
from labkit.host.machine import Machine
from labkit.host.procfs import read_fds
from labkit.host.qmp_sync import QMPCommandError, QMPTimeout
from labkit.host.runners import Runner, get_runner
from labkit.host.wait import WaitError, wait_until
from labkit.lab.collect import SourceRecord, block_mappings, collect, details_of, read_source
from labkit.lab.cpr_exec import PHASES as CPR_EXEC_PHASES
from labkit.lab.facts import HostFacts
from labkit.lab.phase import Phase
from labkit.lab.progress import MigrationDetails, MigrationInfo
from labkit.lab.progress_recorder import ProgressRecorder
from labkit.lab.report import MappingRow, Result, TimelineRow
from labkit.lab.scenario import ALL_MODES, MODES, LabError, Mode, Scenario

__all__ = ["ALL_MODES", "MODES", "PHASES", "Lab", "LabError", "Phase", "Scenario", "Snapshot", "migrate"]

Observer = Callable[["Lab"], None]


@dataclass
class Snapshot:
    """What both sides look like at a phase boundary."""

    phase: str
    index: int
    states: dict[str, str | None] = field(default_factory=dict)
    migration: dict[str, Any] = field(default_factory=dict)  # query-migrate per side, as QEMU wrote it
    events: list[dict[str, Any]] = field(default_factory=list)
    bytes: dict[str, int | None] = field(default_factory=dict)
    fds: dict[str, list[dict[str, Any]]] = field(default_factory=dict[str, Any])
    mappings: list[MappingRow] = field(default_factory=list)
    pids: dict[str, int | None] = field(default_factory=dict)  # cpr-exec: one PID, two programs

    def progress(self, side: str) -> MigrationInfo:
        """query-migrate of one side, parsed."""
        return MigrationInfo.from_qmp(self.migration.get(side))


class Lab:
    """Orchestrates one migration. Use as a context manager so both processes always end.

    Lab(Scenario(mode="normal", ram="64M")) is the form to read; Lab(mode="normal", ram="64M") builds the
    same Scenario from its settings, for a notebook cell."""

    def __init__(self, scenario: Scenario | None = None, runner: Runner | None = None, **settings: Any):
        if scenario is not None and settings:
            raise TypeError("give a Scenario or its settings, not both")
        self.scenario = scenario if scenario is not None else Scenario(**settings)
        self.scenario.check()  # before anything is spawned: one line, not an OOM kill
        self.runner = runner if runner is not None else get_runner(self.scenario.backend)
        if self.scenario.defer is None:  # the lab's choice, recorded so the Result says what ran
            auto = self.scenario.mode == "cpr-transfer" and not self.runner.keeps_event_history
            self.scenario = self.scenario.with_(defer=auto)
        refusal = self.runner.refusal(self.scenario.mode)
        if refusal is not None:
            raise LabError(refusal)
        self.host = HostFacts.measure(qemu=self.runner.version())  # the machine, as the run starts
        self.observers: list[Observer] = []  # called at every poll while the lab waits (samples, figures)
        self.dir = tempfile.mkdtemp(prefix="labkit-lab-")
        os.chmod(self.dir, 0o700)
        self.config = self._source_config()
        self.src: Machine | None = None
        self.dst: Machine | None = None
        self.main_path = os.path.join(self.dir, "main.sock")
        self.cpr_path = os.path.join(self.dir, "cpr.sock")
        self.file_path = os.path.join(self.dir, "vm-state")
        self.t0 = time.monotonic_ns()
        # the guest's progress counter, sampled through its memfd (named recorder: progress() is query-migrate)
        self.recorder = ProgressRecorder(self.t0, self.scenario.progress, self.scenario.progress_after_ms)
        self.marks: list[TimelineRow] = []
        self.error: str | None = None
        self.src_record = SourceRecord()  # what is known of a source that quit (cpr-reboot) or exec'd
        self.exec_done = False  # cpr-exec: the old program has exec'd into the destination
        self.pre_exec: dict[str, Any] | None = None  # cpr-exec: the old program's record, read after the exec
        self.events_from = 0  # index in the source's events where this migration's start
        self.plan: list[Phase] = list(MODE_PHASES[self.scenario.mode])
        self.index = 0
        self.stepping = False  # set by the first step(): hold at each phase so both sides can be looked at
        self.result: Result | None = None

    # -- the scenario, by the names the Lab always had -------------------------------------------------
    @property
    def backend(self) -> str:
        return self.runner.name

    @property
    def mode(self) -> Mode:
        return self.scenario.mode

    @property
    def defer(self) -> bool:
        return bool(self.scenario.defer)

    @property
    def timeout(self) -> float:
        return self.scenario.timeout

    @property
    def can_hold(self) -> bool:
        """Stepping holds both sides at each phase: the runner must be able to, and the scenario want it."""
        return self.runner.can_hold and self.scenario.holds == "when-stepped"

    @property
    def phases(self) -> list[str]:
        """The phases' labels, in order."""
        return [p.label for p in self.plan]

    def _source_config(self) -> VMConfig:
        s = self.scenario
        return VMConfig(
            name="source", ram=s.ram, memory_backend=s.memory_backend, share=s.vm_share,
            aux_ram_share=s.aux_ram_share, guest=s.guest, prealloc=s.prealloc, hugetlb=s.hugetlb,
            mem_path=os.path.join(self.dir, "guest-ram") if s.file_backed else None,
        )  # fmt: skip

    # -- stepping ----------------------------------------------------------------------------------------
    def step(self) -> Snapshot:
        """Run exactly one phase and return a Snapshot of both sides; StopIteration after the last one.

        Stepping from the start holds both processes at each phase boundary (where the runner can), so what
        a Snapshot shows is where the migration really is; the pause then includes the time spent looking.
        """
        if self.index >= len(self.plan):
            raise StopIteration("the migration has no phases left")
        if self.index == 0:
            self.stepping = self.can_hold
        phase = self._advance()
        return self.snapshot(phase)

    def _advance(self) -> str:
        phase = self.plan[self.index]
        self.mark("lab", "phase", phase.label)
        if self.error is None:
            phase.action(self)
        self.index += 1
        return phase.label

    def run(self) -> Result:
        """Run the phases that remain and return the Result (without holds, unless stepping began them)."""
        while self.index < len(self.plan):
            self._advance()
        if self.result is None:
            self.result = self._collect()
        return self.result

    def close(self) -> None:
        self.recorder.close()
        for m in (self.dst, self.src):
            if m is not None:
                with contextlib.suppress(Exception):
                    m.shutdown(timeout=5)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def mark(self, side: str, kind: str, detail: str) -> None:
        self.marks.append(TimelineRow(round((time.monotonic_ns() - self.t0) / 1e6, 3), side, kind, detail))

    def _observe(self) -> None:
        for observer in self.observers:
            observer(self)

    # -- phases ------------------------------------------------------------------------------------------
    def _spawn(self, config: VMConfig, connect: bool = True) -> Machine:
        m = Machine(config, self.runner)
        m.launch(connect=connect, timeout=self.timeout)
        self.recorder.attach(config.name, m)
        return m

    def set_capability(self, m: Machine, capability: str, state: bool) -> None:
        m.cmd("migrate-set-capabilities", {"capabilities": [{"capability": capability, "state": state}]})

    def _start_source(self) -> None:
        s = self.scenario
        self.src = self._spawn(self.config)
        self.runner.ready(self.src)  # real QEMU: wait for the guest to boot, so the warm-up is time it runs
        self.set_capability(self.src, "events", s.events)
        params: dict[str, Any] = {"mode": s.mode, "downtime-limit": s.downtime_limit, "max-bandwidth": s.max_bandwidth}
        try:
            self.src.cmd("migrate-set-parameters", params)
        except QMPCommandError as e:
            self.failed(str(e))
            return
        if s.mode == "cpr-reboot" and s.file_backed:
            self.set_capability(self.src, "x-ignore-shared", True)
        time.sleep(s.warmup)  # let the guest run and dirty memory before migrating

    def dest_config(self, *incoming: str | dict[str, Any], holds: tuple[str, ...] = ()) -> VMConfig:
        held = list(holds) if self.stepping else []
        return replace(self.config, name="destination", holds=held).with_incoming(*incoming)

    # -- holding (where the runner can, when stepping) -------------------------------------------------------
    def hold(self, m: Machine | None, *points: str) -> None:
        if self.stepping and m is not None:
            self.runner.hold(m, *points)

    def wait_held(self, m: Machine | None, point: str) -> None:
        if self.stepping and self.error is None and m is not None:
            self.wait_for(
                lambda: self.runner.held_at(m) == point or self._src_ended(),
                f"the {m.config.name} to reach '{point}'",
                m,
            )

    def continue_(self, m: Machine | None, point: str) -> None:
        if self.stepping and self.error is None and m is not None:
            with contextlib.suppress(QMPCommandError):
                self.runner.continue_(m, point)

    def _src_ended(self) -> bool:
        if self.exec_done or self.src is None:  # cpr-exec: the old program is gone; the destination is the same process
            return False
        return self.progress(self.src).status in ("failed", "cancelled")

    def _start_destination_cpr(self) -> None:
        main = "defer" if self.defer else f"unix:{self.main_path}"
        cpr = {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": self.cpr_path}}
        self.dst = self._spawn(self.dest_config(main, cpr, holds=("cpr-load", "loaded")), connect=False)
        self.wait_for(
            lambda: os.path.exists(self.cpr_path), "the destination to listen on the cpr channel", self.dst
        )

    def _start_destination_normal(self) -> None:
        main = "defer" if self.defer else f"unix:{self.main_path}"
        self.dst = self._spawn(self.dest_config(main, holds=("loaded",)))
        self.set_capability(self.dst, "events", self.scenario.events)
        if self.defer:
            self.dst.cmd("migrate-incoming", {"uri": f"unix:{self.main_path}"})
        if self.runner.faults_in_before_accept:
            # the destination faults its RAM in before it accepts; don't measure a stream racing with that
            dst = self.dst
            self.wait_for(
                lambda: self.runner.checkpoint_seen(dst, "labkit-dst-populated"),
                "the destination to fault its RAM in",
                self.dst,
            )

    def _start_destination_defer(self) -> None:
        self.dst = self._spawn(self.dest_config("defer"))
        self.set_capability(self.dst, "events", self.scenario.events)
        if self.scenario.file_backed:
            self.set_capability(self.dst, "x-ignore-shared", True)

    def start_migration(self, args: dict[str, Any]) -> bool:
        """`migrate` on the source; False (and the lab's error set) when QEMU refuses it."""
        src = self.src
        assert src is not None
        with contextlib.suppress(QMPCommandError, QMPTimeout):
            self.runner.reset_gap(src)  # the guest's longest gap is measured from here
        self.mark("source", "qmp", "migrate")
        self.events_from = len(src.events)
        try:
            src.cmd("migrate", args)
        except QMPCommandError as e:
            self.failed(str(e))
            return False
        return True

    def _migrate_cpr_transfer(self) -> None:
        self.hold(self.src, "cpr-hup", "main-connected")
        channels = [
            {"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": self.main_path}},
            {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": self.cpr_path}},
        ]
        self.start_migration({"channels": channels})

    def _connect_destination(self) -> None:
        """cpr-transfer: the destination's monitor exists only once it has loaded CPR state."""
        assert self.dst is not None
        self.continue_(self.dst, "cpr-load")  # held before its monitor exists (emulator, when stepping)
        if not self.stepping and not self.defer and self.runner.keeps_event_history:
            # The emulated destination keeps its own event history (x-labkit-events), so the lab can connect
            # once the source is done: its QMP handshake then does not compete, on two cores, with the pause
            # it measures. Real QEMU keeps no history, so there the lab connects at once, as users do.
            self.wait_status(("completed", "failed", "cancelled"))
        try:
            self.dst.connect(self.timeout)
        except (QMPTimeout, ConnectionError) as e:
            self.failed(f"destination monitor: {e}")
            return
        if self.defer:
            self.dst.cmd("migrate-incoming", {"uri": f"unix:{self.main_path}"})
        self.wait_held(self.src, "cpr-hup")

    def _wait_source_stopped(self) -> None:
        self.continue_(self.src, "cpr-hup")
        self.wait_held(self.src, "main-connected")
        if not self.stepping:
            self.wait_status(("active", "device", "completed", "failed", "cancelled"))

    def _wait_device_sent(self) -> None:
        self.continue_(self.src, "switchover")
        self.continue_(self.src, "main-connected")
        self.wait_status(("completed", "failed", "cancelled"))
        if self.dst is not None:
            self.wait_held(self.dst, "loaded")

    def _wait_completed(self) -> None:
        self.wait_status(("completed", "failed", "cancelled"))
        if self.dst is not None:
            self.continue_(self.dst, "loaded")
        if self.error is None and self.dst is not None:
            self.wait_for(self.dst_done, "the destination to finish loading", self.dst)

    def dst_done(self) -> bool:
        assert self.dst is not None
        return self.progress(self.dst).status in ("completed", "failed")

    @staticmethod
    def progress(m: Machine) -> MigrationInfo:
        """query-migrate, parsed (labkit.lab.progress)."""
        return MigrationInfo.from_qmp(m.cmd("query-migrate", timeout=10))

    def _migrate_normal(self) -> None:
        self.hold(self.src, "switchover")
        if self.start_migration({"uri": f"unix:{self.main_path}"}):
            self.wait_status(("active", "device", "completed", "failed", "cancelled"))
            self.wait_held(self.src, "switchover")

    def _migrate_cpr_reboot(self) -> None:
        if self.start_migration({"uri": f"file:{self.file_path}"}):
            self.wait_status(("completed", "failed", "cancelled"))

    def _quit_source(self) -> None:
        assert self.src is not None
        self.src_record = read_source(self.runner, self.src)  # all the Result will know of it
        self.src.shutdown()
        self.mark("source", "process", "quit")

    def _restore_from_file(self) -> None:
        assert self.dst is not None
        self.dst.cmd("migrate-incoming", {"uri": f"file:{self.file_path}"})
        self.wait_for(self.dst_done, "the restore to finish", self.dst)

    # -- waiting -----------------------------------------------------------------------------------------
    def failed(self, message: str) -> None:
        if self.error is None:
            hint = convergence_hint(self.scenario.dirty_rate, self.scenario.max_bandwidth)
            if hint and self.mode == "normal" and message.startswith("timed out"):
                message = f"{message}: {hint}"
            self.error = message
            self.mark("lab", "error", message)

    def wait_for(
        self,
        cond: Callable[[], bool],
        what: str,
        m: Machine | None,
        interval: float = 0.02,
        nap: Callable[[float], None] = time.sleep,
    ) -> None:
        """Poll cond() until it holds (labkit.host.wait); a timeout or an exited process fails the lab."""
        try:
            wait_until(cond, what, self.timeout, m, interval, nap, between=self._observe)
        except WaitError as e:
            self.failed(str(e))

    def wait_status(self, statuses: tuple[str, ...]) -> None:
        """Wait for the source's migration status. With the events capability on, MIGRATION events say it:
        no query-migrate is sent while the migration runs, so the lab does not make the source's monitor
        parse and answer requests in the middle of the pause it measures. Without events, it polls."""
        src = self.src
        if self.error is not None or src is None:
            return
        events = self.scenario.events
        last = [MigrationInfo()]  # the last query-migrate asked

        def seen() -> str | None:
            for ev in src.events[self.events_from :]:
                if ev.get("event") == "MIGRATION" and ev.get("data", {}).get("status") in statuses:
                    status: str = ev["data"]["status"]
                    return status
            return None

        def reached() -> bool:
            if events and seen() is not None:
                return True
            if not events:
                last[0] = self.progress(src)
            return last[0].status in statuses

        def nap(seconds: float) -> None:
            try:
                self.runner.wait_event(src, "MIGRATION", timeout=seconds * 5, after=len(src.events))
            except QMPTimeout:
                if events:  # no event for a while: ask, in case one was missed
                    last[0] = self.progress(src)

        self.wait_for(reached, f"migration status {'/'.join(statuses)}", src, nap=nap)
        status = (seen() if events else None) or last[0].status
        if status in ("failed", "cancelled"):
            info = self.progress(src)
            self.failed(info.error_desc or f"migration {info.status}")

    # -- observing ---------------------------------------------------------------------------------------
    def block_mappings(self, side: str, m: Machine | None) -> list[MappingRow]:
        return block_mappings(self.runner, side, m)

    def _side_snapshot(self, snap: Snapshot, side: str, m: Machine | None) -> None:
        """One side's run state, query-migrate, memfds and mappings, into snap."""
        if m is not None and m.proc is None:
            m = None  # cpr-exec: the destination's program is not exec'd yet
        state = None
        if m is not None and m.alive() and m.qmp.connected:
            with contextlib.suppress(QMPCommandError, QMPTimeout, ConnectionError):
                state = m.cmd("query-status", timeout=10)["status"]
                snap.migration[side] = m.cmd("query-migrate", timeout=10)
        elif m is not None and m.alive():
            state = "(no monitor yet)"
        elif m is not None:
            state = "(exited)"
        snap.states[side] = state
        snap.pids[side] = m.pid if m is not None else None
        if m is not None and m.alive():
            # Python's mmap keeps a dup of each fd it maps: show one row per memfd (per inode)
            seen: dict[int, dict[str, Any]] = {}
            for f in read_fds(m.pid):
                if f.kind == "memfd" and f.inode is not None and f.inode not in seen:
                    seen[f.inode] = {"fd": f.fd, "name": f.memfd_name, "inode": f.inode, "size": f.size}
            snap.fds[side] = list(seen.values())
            snap.mappings += self.block_mappings(side, m)

    def snapshot(self, phase: str) -> Snapshot:
        snap = Snapshot(phase, self.index)
        for side, m in (("source", self.src), ("destination", self.dst)):
            if side == "source" and self.exec_done and m is not None:
                snap.states[side] = f"(exec'd into the destination, pid {m.pid})"
                snap.pids[side] = m.pid
                continue
            self._side_snapshot(snap, side, m)
        details = MigrationDetails.from_qmp(details_of(self.runner, self.src))
        transferred = snap.progress("source").stats.transferred
        snap.bytes = {
            "main": details.bytes_main if details else transferred,
            "cpr": details.bytes_cpr if details else None,
        }
        return snap

    def _collect(self) -> Result:
        return collect(self)


MODE_PHASES: dict[Mode, tuple[Phase, ...]] = {
    "cpr-transfer": (
        Phase("start-source", "source running", Lab._start_source),
        Phase("start-destination", "destination waiting on the cpr channel", Lab._start_destination_cpr),
        Phase("migrate", "cpr state sent (fds in flight)", Lab._migrate_cpr_transfer),
        Phase("connect-destination", "destination mapped guest RAM, listening on main", Lab._connect_destination),
        Phase("source-stopped", "main channel connected, source stopped", Lab._wait_source_stopped),
        Phase("device-state", "device state sent", Lab._wait_device_sent),
        Phase("completed", "destination running, source in postmigrate", Lab._wait_completed),
    ),
    "normal": (
        Phase("start-source", "source running", Lab._start_source),
        Phase("start-destination", "destination listening on main", Lab._start_destination_normal),
        Phase("precopy", "pre-copy passes", Lab._migrate_normal),
        Phase("stop-and-copy", "stop and copy", Lab._wait_device_sent),
        Phase("completed", "destination running, source in postmigrate", Lab._wait_completed),
    ),
    "cpr-reboot": (
        Phase("start-source", "source running", Lab._start_source),
        Phase("save", "source stopped and saved to a file", Lab._migrate_cpr_reboot),
        Phase("quit-source", "source quit", Lab._quit_source),
        Phase("start-destination", "new process waiting (-incoming defer)", Lab._start_destination_defer),
        Phase("restore", "state restored, guest running", Lab._restore_from_file),
    ),
    "cpr-exec": (Phase("start-source", "source running", Lab._start_source), *CPR_EXEC_PHASES),
}
PHASES: dict[str, list[str]] = {mode: [p.label for p in plan] for mode, plan in MODE_PHASES.items()}


def migrate(scenario: Scenario | None = None, runner: Runner | None = None, **settings: Any) -> Result:
    """Run one migration start to finish and return its Result (both processes end before it returns).
    migrate(Scenario(...)), or migrate(mode=..., ram=...) for the same Scenario built from its settings."""
    with Lab(scenario, runner, **settings) as lab:
        return lab.run()
