"""Lab: one migration between two VM processes, phase by phase, for either backend.

A Lab spawns the source, then the destination as the mode wants it, drives both over QMP exactly as one drives
QEMU 10, and measures what happened. `step()` advances one phase and returns a Snapshot; `run()` does the rest
and returns the Result.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from labkit.host.hardware import VMConfig
from labkit.host.limits import LimitError, check_request, convergence_hint
from labkit.host.machine import Machine
from labkit.host.procfs import page_frames, read_fds, read_maps
from labkit.host.qmp_sync import QMPCommandError, QMPTimeout
from labkit.host.runners import get_backend
from labkit.lab.breakdown import pause_breakdown
from labkit.lab.cpr_exec import PHASES as CPR_EXEC_PHASES
from labkit.lab.cpr_exec import CprExecPhases, qemu_cpr_exec_refusal
from labkit.lab.report import MappingRow, Result, TimelineRow
from labkit.qemu_syntax import GuestConfig, parse_size

MODES = ("normal", "cpr-reboot", "cpr-transfer")
ALL_MODES = (*MODES, "cpr-exec")  # cpr-exec (QEMU 10.2) runs on the emulated backend

PHASES: dict[str, list[str]] = {
    "cpr-transfer": [
        "source running",
        "destination waiting on the cpr channel",
        "cpr state sent (fds in flight)",
        "destination mapped guest RAM, listening on main",
        "main channel connected, source stopped",
        "device state sent",
        "destination running, source in postmigrate",
    ],
    "normal": [
        "source running",
        "destination listening on main",
        "pre-copy passes",
        "stop and copy",
        "destination running, source in postmigrate",
    ],
    "cpr-reboot": [
        "source running",
        "source stopped and saved to a file",
        "source quit",
        "new process waiting (-incoming defer)",
        "state restored, guest running",
    ],
    "cpr-exec": CPR_EXEC_PHASES,
}


class LabError(ValueError):
    """A request the lab refuses before or while running it; its text is one line for the user."""


@dataclass
class Snapshot:
    """What both sides look like at a phase boundary."""

    phase: str
    index: int
    states: dict[str, str | None] = field(default_factory=dict)
    migration: dict[str, Any] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)
    bytes: dict[str, int] = field(default_factory=dict)
    fds: dict[str, list[dict]] = field(default_factory=dict)
    mappings: list[MappingRow] = field(default_factory=list)
    pids: dict[str, int | None] = field(default_factory=dict)  # cpr-exec: one PID, two programs


def _events_of(ops, m: Machine | None) -> list[dict]:
    if m is None or not m.alive() or not m.qmp.connected:
        return []
    try:
        return ops.events(m)
    except (QMPCommandError, QMPTimeout, ConnectionError):
        return [{**e, "monotonic-ns": None} for e in m.events]


def _checkpoints_of(ops, m: Machine | None) -> list[dict]:
    """The VM's trace points (QEMU's trace log, or labkit-vm's x-labkit-checkpoints); none if unreadable."""
    if m is None or not m.alive():
        return []
    try:
        return ops.checkpoints(m)
    except (QMPCommandError, QMPTimeout, ConnectionError, OSError):
        return []


class Lab(CprExecPhases):
    """Orchestrates one migration. Use as a context manager so both processes always end."""

    def __init__(
        self,
        backend: str = "emulated",
        mode: str = "cpr-transfer",
        ram: str | int = "256M",
        memory_backend: str = "memfd",
        aux_ram_share: bool = True,
        share: bool | None = None,  # None: the backend's own default (memfd on, ram and file off)
        dirty_rate: str | int = 0,
        pattern: str = "sequential",
        working_set: str | int | None = None,
        downtime_limit: int = 300,
        max_bandwidth: str | int = "10G",
        defer: bool = False,
        warmup: float = 0.3,
        seed: int = 1,
        events: bool = True,
        timeout: float = 60.0,
        prefill: bool = False,
        hugetlb: str | int | None = None,  # huge page size ("2M"): a hugetlb memfd (memfd backend only)
    ):
        if mode not in ALL_MODES:
            raise LabError(f"mode must be one of {', '.join(ALL_MODES)}, not {mode!r}")
        if mode == "cpr-exec" and backend == "qemu":
            raise LabError(qemu_cpr_exec_refusal())
        try:  # before anything is spawned: a request this host cannot honour gets one line, not an OOM kill
            ram = check_request(
                backend=backend, mode=mode, ram=ram, memory_backend=memory_backend, share=share,
                pattern=pattern, dirty_rate=dirty_rate, working_set=working_set,
                downtime_limit=downtime_limit, max_bandwidth=max_bandwidth, timeout=timeout, hugetlb=hugetlb,
            )  # fmt: skip
        except LimitError as e:
            raise LabError(str(e)) from None
        self.backend = backend
        self.ops = get_backend(backend)
        self.mode = mode
        self.defer = defer
        self.warmup = warmup
        self.timeout = timeout
        self.events_cap = events
        self.downtime_limit = downtime_limit
        self.max_bandwidth = parse_size(max_bandwidth)
        self.dir = tempfile.mkdtemp(prefix="labkit-lab-")
        os.chmod(self.dir, 0o700)
        mem_path = os.path.join(self.dir, "guest-ram") if memory_backend == "file" else None
        if share is None and memory_backend == "file":
            share = True  # the lab's file backend is a shared file, the set-up cpr-reboot's docs recommend
        self.config = VMConfig(
            name="source",
            ram=parse_size(ram, "m") if isinstance(ram, str) else ram,
            memory_backend=memory_backend,
            share=share,
            aux_ram_share=aux_ram_share,
            mem_path=mem_path,
            hugetlb=hugetlb,
            guest=GuestConfig(
                dirty_rate=parse_size(dirty_rate),
                pattern=pattern,
                working_set=parse_size(working_set) if working_set is not None else None,
                seed=seed,
                prefill=prefill,
            ),
        )
        self.src: Machine | None = None
        self.dst: Machine | None = None
        self.main_path = os.path.join(self.dir, "main.sock")
        self.cpr_path = os.path.join(self.dir, "cpr.sock")
        self.file_path = os.path.join(self.dir, "vm-state")
        self.t0 = time.monotonic_ns()
        self.marks: list[TimelineRow] = []
        self.error: str | None = None
        self.migrate_info: dict = {}
        self.migrate_lab_info: dict = {}  # x-labkit-query-migrate of a source that has quit (cpr-reboot)
        self._events_from = 0  # index in the source's events where this migration's start
        self._actions: list[Callable[[], None]] = {
            "cpr-transfer": [
                self._start_source,
                self._start_destination_cpr,
                self._migrate_cpr_transfer,
                self._connect_destination,
                self._wait_source_stopped,
                self._wait_device_sent,
                self._wait_completed,
            ],
            "normal": [
                self._start_source,
                self._start_destination_normal,
                self._migrate_normal,
                self._wait_device_sent,
                self._wait_completed,
            ],
            "cpr-reboot": [
                self._start_source,
                self._migrate_cpr_reboot,
                self._quit_source,
                self._start_destination_defer,
                self._restore_from_file,
            ],
            "cpr-exec": self._cpr_exec_actions(),
        }[mode]
        self.phases = list(PHASES[mode])
        self.index = 0
        self.stepping = False  # set by the first step(): hold at each phase so both sides can be looked at
        self.can_hold = backend == "emulated"
        self.result: Result | None = None

    # -- stepping ----------------------------------------------------------------------------------------
    def step(self) -> Snapshot:
        """Run exactly one phase and return a Snapshot of both sides; StopIteration after the last one.

        Stepping from the start holds both processes at each phase boundary (emulated backend), so what a
        Snapshot shows is where the migration really is; the pause then includes the time spent looking.
        """
        if self.index >= len(self._actions):
            raise StopIteration("the migration has no phases left")
        if self.index == 0:
            self.stepping = self.can_hold
        phase = self._advance()
        return self.snapshot(phase)

    def _advance(self) -> str:
        phase = self.phases[self.index]
        self.mark("lab", "phase", phase)
        if self.error is None:
            self._actions[self.index]()
        self.index += 1
        return phase

    def run(self) -> Result:
        """Run the phases that remain and return the Result (without holds, unless stepping began them)."""
        while self.index < len(self._actions):
            self._advance()
        if self.result is None:
            self.result = self._collect()
        return self.result

    def close(self) -> None:
        for m in (self.dst, self.src):
            if m is not None:
                with contextlib.suppress(Exception):
                    m.shutdown(timeout=5)
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def mark(self, side: str, kind: str, detail: str) -> None:
        self.marks.append(TimelineRow(round((time.monotonic_ns() - self.t0) / 1e6, 3), side, kind, detail))

    # -- phases ------------------------------------------------------------------------------------------
    def _spawn(self, config: VMConfig, connect: bool = True) -> Machine:
        m = Machine(config, self.backend)
        m.launch(connect=connect, timeout=self.timeout)
        return m

    def _start_source(self) -> None:
        self.src = self._spawn(self.config)
        ready = getattr(self.ops, "ready", None)
        if ready is not None:
            ready(self.src)  # real QEMU: wait for the guest to boot, so the warm-up is time it really runs
        self.src.cmd(
            "migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": self.events_cap}]}
        )
        params: dict[str, Any] = {
            "mode": self.mode,
            "downtime-limit": self.downtime_limit,
            "max-bandwidth": self.max_bandwidth,
        }
        try:
            self.src.cmd("migrate-set-parameters", params)
        except QMPCommandError as e:
            self._failed(str(e))
            return
        if self.mode == "cpr-reboot" and self.config.memory_backend == "file":
            self.src.cmd(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": "x-ignore-shared", "state": True}]},
            )
        time.sleep(self.warmup)  # let the guest run and dirty memory before migrating

    def _dest_config(self, *incoming: str | dict, holds: tuple[str, ...] = ()) -> VMConfig:
        from dataclasses import replace

        held = list(holds) if self.stepping else []
        return replace(self.config, name="destination", holds=held).with_incoming(*incoming)

    # -- holding (emulated backend, when stepping) ---------------------------------------------------------
    def _hold(self, m: Machine, *points: str) -> None:
        if self.stepping:
            m.cmd("x-labkit-hold", {"points": list(points)})

    def _wait_held(self, m: Machine, point: str) -> None:
        if self.stepping and self.error is None:
            self._wait_for(
                lambda: m.cmd("x-labkit-hold", timeout=10)["held-at"] == point or self._src_ended(),
                f"the {m.config.name} to reach '{point}'",
                m,
            )

    def _continue(self, m: Machine, point: str) -> None:
        if self.stepping and self.error is None:
            with contextlib.suppress(QMPCommandError):
                m.cmd("x-labkit-continue", {"point": point})

    def _src_ended(self) -> bool:
        if self.exec_done:  # cpr-exec: the old program is gone; the destination is the same process
            return False
        st = self.src.cmd("query-migrate", timeout=10).get("status")
        if st in ("failed", "cancelled"):
            return True
        return False

    def _start_destination_cpr(self) -> None:
        main = "defer" if self.defer else f"unix:{self.main_path}"
        cpr = {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": self.cpr_path}}
        self.dst = self._spawn(self._dest_config(main, cpr, holds=("cpr-load", "loaded")), connect=False)
        self._wait_for(
            lambda: os.path.exists(self.cpr_path), "the destination to listen on the cpr channel", self.dst
        )

    def _start_destination_normal(self) -> None:
        main = "defer" if self.defer else f"unix:{self.main_path}"
        self.dst = self._spawn(self._dest_config(main, holds=("loaded",)))
        self.dst.cmd(
            "migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": self.events_cap}]}
        )
        if self.defer:
            self.dst.cmd("migrate-incoming", {"uri": f"unix:{self.main_path}"})
        if self.backend == "emulated":
            # the destination faults its RAM in before it accepts; don't measure a stream racing with that
            self._wait_for(
                lambda: self._checkpoint_seen(self.dst, "labkit-dst-populated"),
                "the destination to fault its RAM in",
                self.dst,
            )

    @staticmethod
    def _checkpoint_seen(m: Machine, name: str) -> bool:
        return any(c["name"] == name for c in m.cmd("x-labkit-checkpoints", timeout=10))

    def _labkit_info(self, m: Machine | None) -> dict:
        """x-labkit-query-migrate: what the emulator knows beyond QEMU's query-migrate (bytes on the cpr
        channel, pages per pass, checkpoints); {} on real QEMU, or when the VM cannot be asked."""
        if self.backend != "emulated" or m is None or not m.alive() or not m.qmp.connected:
            return {}
        with contextlib.suppress(QMPCommandError, QMPTimeout, ConnectionError):
            return m.cmd("x-labkit-query-migrate", timeout=10)
        return {}

    def _start_destination_defer(self) -> None:
        self.dst = self._spawn(self._dest_config("defer"))
        self.dst.cmd(
            "migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": self.events_cap}]}
        )
        if self.config.memory_backend == "file":
            self.dst.cmd(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": "x-ignore-shared", "state": True}]},
            )

    def _reset_gap(self) -> None:
        with contextlib.suppress(QMPCommandError, QMPTimeout):
            self.ops.reset_gap(self.src)

    def _migrate(self, args: dict) -> bool:
        self._reset_gap()
        self.mark("source", "qmp", "migrate")
        self._events_from = len(self.src.events)
        try:
            self.src.cmd("migrate", args)
        except QMPCommandError as e:
            self._failed(str(e))
            return False
        return True

    def _migrate_cpr_transfer(self) -> None:
        self._hold(self.src, "cpr-hup", "main-connected")
        channels = [
            {"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": self.main_path}},
            {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": self.cpr_path}},
        ]
        self._migrate({"channels": channels})

    def _connect_destination(self) -> None:
        """cpr-transfer: the destination's monitor exists only once it has loaded CPR state."""
        assert self.dst is not None
        if self.stepping and self.error is None:
            with contextlib.suppress(ProcessLookupError):  # it may have died; connect() below then says so
                os.kill(self.dst.pid, signal.SIGUSR1)  # no monitor yet: a signal lets it read the CPR state
        if not self.stepping and not self.defer and self.backend == "emulated":
            # The emulated destination keeps its own event history (x-labkit-events), so the lab can connect
            # once the source is done: its QMP handshake then does not compete, on two cores, with the pause
            # it measures. Real QEMU keeps no history, so there the lab connects at once, as users do.
            self._wait_status(("completed", "failed", "cancelled"))
        try:
            self.dst.connect(self.timeout)
        except (QMPTimeout, ConnectionError) as e:
            self._failed(f"destination monitor: {e}")
            return
        if self.defer:
            self.dst.cmd("migrate-incoming", {"uri": f"unix:{self.main_path}"})
        self._wait_held(self.src, "cpr-hup")

    def _wait_source_stopped(self) -> None:
        self._continue(self.src, "cpr-hup")
        self._wait_held(self.src, "main-connected")
        if not self.stepping:
            self._wait_status(("active", "device", "completed", "failed", "cancelled"))

    def _wait_device_sent(self) -> None:
        self._continue(self.src, "switchover")
        self._continue(self.src, "main-connected")
        self._wait_status(("completed", "failed", "cancelled"))
        if self.dst is not None:
            self._wait_held(self.dst, "loaded")

    def _wait_completed(self) -> None:
        self._wait_status(("completed", "failed", "cancelled"))
        if self.dst is not None:
            self._continue(self.dst, "loaded")
        if self.error is None and self.dst is not None:
            self._wait_for(lambda: self._dst_done(), "the destination to finish loading", self.dst)

    def _dst_done(self) -> bool:
        st = self.dst.cmd("query-migrate", timeout=10)
        return st.get("status") in ("completed", "failed")

    def _migrate_normal(self) -> None:
        self._hold(self.src, "switchover")
        if self._migrate({"uri": f"unix:{self.main_path}"}):
            self._wait_status(("active", "device", "completed", "failed", "cancelled"))
            self._wait_held(self.src, "switchover")

    def _migrate_cpr_reboot(self) -> None:
        if self._migrate({"uri": f"file:{self.file_path}"}):
            self._wait_status(("completed", "failed", "cancelled"))

    def _quit_source(self) -> None:
        self.migrate_info = self.src.cmd("query-migrate")
        self.migrate_lab_info = self._labkit_info(self.src)
        self.src_events = _events_of(self.ops, self.src)
        self.src_checkpoints = _checkpoints_of(self.ops, self.src)
        self.src_state = self.src.cmd("query-status")["status"]
        self.src_maps = self._block_mappings("source", self.src)
        self.src.shutdown()
        self.mark("source", "process", "quit")

    def _restore_from_file(self) -> None:
        self.dst.cmd("migrate-incoming", {"uri": f"file:{self.file_path}"})
        self._wait_for(lambda: self._dst_done(), "the restore to finish", self.dst)

    # -- waiting -----------------------------------------------------------------------------------------
    def _failed(self, message: str) -> None:
        if self.error is None:
            hint = convergence_hint(self.config.guest.dirty_rate, self.max_bandwidth)
            if hint and self.mode == "normal" and message.startswith("timed out"):
                message = f"{message}: {hint}"
            self.error = message
            self.mark("lab", "error", message)

    def _wait_for(
        self,
        cond: Callable[[], bool],
        what: str,
        m: Machine | None,
        interval: float = 0.02,
        nap: Callable[[float], None] = time.sleep,
    ) -> None:
        """Poll cond() until it holds. Polling is gentle (20 ms): every QMP round trip costs both processes
        CPU that a 2-core machine would otherwise give to the migration being measured."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if m is not None and not m.alive():
                self._failed(f"waiting for {what}: the process exited ({m.exit_reason()})")
                return
            try:
                if cond():
                    return
            except (QMPCommandError, QMPTimeout, ConnectionError):
                pass
            nap(interval)
        self._failed(f"timed out after {self.timeout} s waiting for {what}")

    def _wait_status(self, statuses: tuple[str, ...]) -> None:
        """Wait for the source's migration status. With the events capability on, MIGRATION events say it:
        no query-migrate is sent while the migration runs, so the lab does not make the source's monitor
        parse and answer requests in the middle of the pause it measures. Without events, it polls."""
        if self.error is not None or self.src is None:
            return
        info: dict = {}

        def seen() -> str | None:
            for ev in self.src.events[self._events_from :]:
                if ev.get("event") == "MIGRATION" and ev.get("data", {}).get("status") in statuses:
                    return ev["data"]["status"]
            return None

        def reached() -> bool:
            if self.events_cap and seen() is not None:
                return True
            if not self.events_cap:
                info.update(self.src.cmd("query-migrate", timeout=10))
            return info.get("status") in statuses

        def nap(seconds: float) -> None:
            try:
                self.src.qmp.wait_event("MIGRATION", timeout=seconds * 5, after=len(self.src.events))
            except QMPTimeout:
                if self.events_cap:  # no event for a while: ask, in case one was missed
                    info.update(self.src.cmd("query-migrate", timeout=10))

        self._wait_for(reached, f"migration status {'/'.join(statuses)}", self.src, nap=nap)
        status = (seen() if self.events_cap else None) or info.get("status")
        if status in ("failed", "cancelled"):
            info.update(self.src.cmd("query-migrate", timeout=10))
            self._failed(info.get("error-desc") or f"migration {info.get('status')}")

    # -- observing ---------------------------------------------------------------------------------------
    def _block_mappings(self, side: str, m: Machine | None) -> list[MappingRow]:
        if m is None or not m.alive():
            return []
        rows = []
        try:
            blocks = self.ops.ram_blocks(m) if m.qmp.connected else []
        except (QMPCommandError, QMPTimeout):
            blocks = []
        maps = read_maps(m.pid)
        for b in blocks:
            for mp in maps:
                if mp.start == b["host-addr"]:
                    frames = page_frames(m.pid, [mp.start + i * (mp.size // 4) for i in range(4)])
                    rows.append(
                        MappingRow(
                            side, b["name"], mp.start, mp.end, mp.size, mp.inode, mp.path, mp.offset, frames
                        )
                    )
        return rows

    def snapshot(self, phase: str) -> Snapshot:
        snap = Snapshot(phase, self.index)
        for side, m in (("source", self.src), ("destination", self.dst)):
            if side == "source" and self.exec_done:
                snap.states[side] = f"(exec'd into the destination, pid {m.pid})"
                snap.pids[side] = m.pid
                continue
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
                seen: dict[int, dict] = {}
                for f in read_fds(m.pid):
                    if f.kind == "memfd" and f.inode not in seen:
                        seen[f.inode] = {"fd": f.fd, "name": f.memfd_name, "inode": f.inode, "size": f.size}
                snap.fds[side] = list(seen.values())
                snap.mappings += self._block_mappings(side, m)
        lab = self._labkit_info(self.src).get("source", {})
        transferred = snap.migration.get("source", {}).get("ram", {}).get("transferred", 0)
        snap.bytes = {"main": lab.get("bytes-main", transferred), "cpr": lab.get("bytes-cpr")}
        return snap

    def _collect(self) -> Result:
        cfg = self.config
        res = Result(
            backend=self.backend,
            mode=self.mode,
            ram_bytes=cfg.ram,
            status="failed" if self.error else "",
            dirty_rate=cfg.guest.dirty_rate,
        )
        res.error = self.error
        src_alive = self.src is not None and self.src.alive() and not self.exec_done
        info = (
            self.src.cmd("query-migrate", timeout=10)
            if src_alive and self.src.qmp.connected
            else self.migrate_info
        )
        res.query_migrate = info
        res.status = (
            "failed"
            if self.error and info.get("status") in (None, "none", "setup", "completed")
            else info.get("status", "failed")
        )
        if self.error and res.status == "completed":
            res.status = "failed"
        res.total_ms = info.get("total-time")
        res.setup_ms = info.get("setup-time")
        res.pause_ms["reported"] = info.get("downtime")
        ram = info.get("ram", {})
        res.passes = ram.get("dirty-sync-count", 0)
        lab_info = self._labkit_info(self.src) if src_alive else self.migrate_lab_info
        lab = lab_info.get("source", {})
        # ram.transferred counts the whole main stream on both backends (QEMU's migration_transferred_bytes);
        # only the emulator counts its cpr channel's bytes, and only it answers after a failure
        res.bytes = {"main": lab.get("bytes-main", ram.get("transferred", 0)), "cpr": lab.get("bytes-cpr")}
        if self.mode == "cpr-exec":
            res.bytes["cpr"] = None  # no cpr channel: the state went into a memfd that the exec kept open
        res.pages_per_pass = lab.get("pages-per-pass", [])
        res.throughput_mbps = ram.get("mbps")
        live_ms = (info.get("total-time") or 0) - (info.get("downtime") or 0) - (info.get("setup-time") or 0)
        if self.mode == "normal" and ram.get("precopy-bytes") and live_ms > 0:
            res.precopy_bytes_per_s = round(ram["precopy-bytes"] / (live_ms / 1000), 1)
        bpp, spp = lab.get("bytes-per-pass", []), lab.get("seconds-per-pass", [])
        if self.mode == "normal" and bpp and spp and spp[0] > 0:
            res.first_pass_bytes_per_s = round(bpp[0] / spp[0], 1)
        src_events = _events_of(self.ops, self.src) if src_alive else getattr(self, "src_events", [])
        dst_events = _events_of(self.ops, self.dst)
        stop = next((e for e in src_events if e.get("event") == "STOP"), None)
        resume = next((e for e in dst_events if e.get("event") == "RESUME"), None)
        if stop and resume and stop.get("monotonic-ns") and resume.get("monotonic-ns"):
            res.pause_ms["events"] = round((resume["monotonic-ns"] - stop["monotonic-ns"]) / 1e6, 3)
        elif stop and not resume and self.dst is not None and res.status == "completed":
            res.notes.append("no RESUME seen: the destination resumed before its monitor was connected")
        res.pids = {
            "source": self.src.pid if self.src is not None and self.src.proc is not None else None,
            "destination": self.dst.pid if self.dst is not None and self.dst.proc is not None else None,
        }
        for side, evs in (("source", src_events), ("destination", dst_events)):
            for e in evs:
                if e.get("monotonic-ns") is None:
                    continue
                detail = e.get("data", {}).get("status") or str(e.get("data", {}).get("pass", "")) or ""
                res.timeline.append(
                    TimelineRow(round((e["monotonic-ns"] - self.t0) / 1e6, 3), side, e["event"], detail)
                )
        src_marks = _checkpoints_of(self.ops, self.src) if src_alive else getattr(self, "src_checkpoints", [])
        for side, marks in (("source", src_marks), ("destination", _checkpoints_of(self.ops, self.dst))):
            for c in marks:
                detail = c["name"] if c["kind"] == "checkpoint" else f"{c['name']} {c['detail']}".rstrip()
                res.timeline.append(
                    TimelineRow(round((c["monotonic-ns"] - self.t0) / 1e6, 3), side, c["kind"], detail)
                )
        res.timeline += self.marks
        res.timeline.sort(key=lambda r: r.t_ms)
        res.pause_breakdown = pause_breakdown(res.timeline)
        res.states["source"] = (
            self.src.cmd("query-status", timeout=10)["status"]
            if src_alive
            else getattr(self, "src_state", "(exited)")
        )
        dst_ok = (
            self.dst is not None and self.dst.proc is not None and self.dst.alive() and self.dst.qmp.connected
        )
        if dst_ok:
            res.states["destination"] = self.dst.cmd("query-status", timeout=10)["status"]
        elif self.dst is None or self.dst.proc is None:
            res.states["destination"] = "(not started)"
        else:
            res.states["destination"] = "(no monitor yet)" if self.dst.alive() else "(exited)"
        res.mappings = (
            self._block_mappings("source", self.src) if src_alive else getattr(self, "src_maps", [])
        )
        if dst_ok:
            res.mappings += self._block_mappings("destination", self.dst)
            if res.status == "completed":
                time.sleep(0.01)  # let the guest beat at least once after resuming
                stats = self.ops.guest_stats(self.dst)
                gap = stats.get("max-gap-ns")
                res.pause_ms["guest"] = None if gap is None else round(gap / 1e6, 3)
                if gap is None:
                    res.notes.append(f"guest pause unavailable: {stats.get('max-gap-why', 'unknown')}")
                res.verify = self.ops.verify(self.dst)
                res.guest_verified = bool(res.verify.get("ok"))
        if not res.guest_verified and src_alive and res.status != "completed":
            # the migration failed: the source must still hold the guest's memory intact
            res.verify = self.ops.verify(self.src)
            res.guest_verified = bool(res.verify.get("ok"))
        return res


def migrate(**kwargs: Any) -> Result:
    """Run one migration start to finish and return its Result (both processes end before it returns)."""
    with Lab(**kwargs) as lab:
        return lab.run()
