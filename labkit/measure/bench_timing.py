"""Where a `labkit bench` run's wall time goes: per bench phase, and per migration cell split by the Lab's phases.

A bench that takes minutes must say which part takes them, or nobody can tell a slow emulator from a slow
plan. PhaseClock adds up wall time under names (ceilings, the floor, the VM, each backend's migrations, the
report); TimedLab is the Lab with the instants it passes recorded (each Phase's start from its timeline
marks, when the source's and destination's processes were spawned, when collecting began, when teardown
ended), so one migration's wall time splits into lab set-up, source spawn, boot/prefill, warm-up,
destination start, the migration itself, collecting and teardown.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from labkit.host.hardware import VMConfig
from labkit.host.machine import Machine
from labkit.lab.engine import Lab
from labkit.lab.report import Result

#: One migration's wall time, in the order it is spent (seconds_by_cell in the bench's JSON).
CELL_PARTS = (
    "lab_setup",  # Lab(): the scenario checked, the runner, the host's facts
    "source_spawn",  # the source's process to QMP-ready (the emulated guest's prefill happens here)
    "source_boot_prefill",  # runner.ready (real QEMU: boot, the host's prefill) and the QMP set-up
    "warmup",  # the guest runs before migrate (Scenario.warmup)
    "destination_start",  # the destination's process, listening
    "previous_teardown",  # waiting, source warmed up, for the cell before to finish its teardown
    "migration",  # migrate to completed, both sides
    "collect",  # the Result read from both sides
    "teardown",  # both processes shut down, the run dir removed (with Teardowns: in the background)
)


@dataclass
class PhaseClock:
    """Wall seconds added up per name, in the order names first appear."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.add(name, time.monotonic() - t0)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 2) for k, v in self.seconds.items()}


class TimedLab(Lab):
    """The Lab, unchanged, with the instants of its spawns and of its collect recorded (monotonic ns).
    `after_source` is called once the source runs (warmed up), before the destination starts."""

    def __init__(self, *args: Any, after_source: Callable[[], None] | None = None, **kwargs: Any):
        self.spawns: list[tuple[str, int, int]] = []  # (VM name, start, end)
        self.t_collect = 0
        self.after_source = after_source
        self.waited_s = 0.0  # in after_source
        super().__init__(*args, **kwargs)

    def _start_source(self) -> None:
        super()._start_source()
        if self.after_source is not None:
            t0 = time.monotonic()
            self.after_source()
            self.waited_s = time.monotonic() - t0

    def _spawn(self, config: VMConfig, connect: bool = True) -> Machine:
        t0 = time.monotonic_ns()
        try:
            return super()._spawn(config, connect)
        finally:
            self.spawns.append((config.name, t0, time.monotonic_ns()))

    def _collect(self) -> Result:
        self.t_collect = time.monotonic_ns()
        return super()._collect()

    def close(self) -> None:
        """Both VMs are told to quit before either is waited for, so their exits (freeing guest RAM, ending
        their threads) overlap instead of queueing; then the Lab's own close reaps and cleans up."""
        for m in (self.dst, self.src):
            if m is not None and m.alive() and m.qmp.connected:
                with contextlib.suppress(Exception):
                    m.qmp.cmd("quit", timeout=5)
        super().close()


def cell_parts(lab: TimedLab, t_start: int, t_run_end: int, t_end: int) -> dict[str, float]:
    """One migration's wall time by CELL_PARTS (seconds), from a TimedLab that has run and closed.

    t_start: before Lab() was built; t_run_end: run() returned; t_end: the Lab closed (monotonic ns)."""
    starts = {m.detail: m.t_ms for m in lab.marks if m.side == "lab" and m.kind == "phase"}
    phase_ms = [(p.name, starts[p.label]) for p in lab.plan if p.label in starts]
    collect_ms = (lab.t_collect - lab.t0) / 1e6 if lab.t_collect else (t_run_end - lab.t0) / 1e6
    out = dict.fromkeys(CELL_PARTS, 0.0)
    out["lab_setup"] = (lab.t0 - t_start) / 1e9
    for i, (name, t) in enumerate(phase_ms):
        end = phase_ms[i + 1][1] if i + 1 < len(phase_ms) else collect_ms
        seconds = max(0.0, end - t) / 1e3
        if name == "start-source":
            spawn = sum((b - a) / 1e9 for who, a, b in lab.spawns if who == "source")
            warmup = min(lab.scenario.warmup, max(0.0, seconds - spawn))
            waited = min(lab.waited_s, max(0.0, seconds - spawn - warmup))
            out["source_spawn"] += spawn
            out["warmup"] += warmup
            out["previous_teardown"] += waited
            out["source_boot_prefill"] += max(0.0, seconds - spawn - warmup - waited)
        elif name == "start-destination":
            out["destination_start"] += seconds
        else:
            out["migration"] += seconds
    out["collect"] = (t_run_end - lab.t0) / 1e9 - collect_ms / 1e3
    out["teardown"] = (t_end - t_run_end) / 1e9
    return out


class Teardowns:
    """One migration's teardown at a time, in the background: the next cell's source spawns and boots while
    the last cell's VMs exit, and `wait` (called once that source is warmed up) makes sure nothing of the
    last cell still runs when the next destination starts and the migration is measured."""

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None

    def start(self, lab: Lab, parts: dict[str, float], t_run_end: int) -> None:
        self.wait()

        def close() -> None:
            lab.close()
            parts["teardown"] = (time.monotonic_ns() - t_run_end) / 1e9

        self.thread = threading.Thread(target=close, name="bench-teardown", daemon=True)
        self.thread.start()

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None


def timed_migrate(teardowns: Teardowns | None = None, **settings: Any) -> tuple[Result, dict[str, float]]:
    """labkit.lab.engine.migrate(**settings), and its wall time by CELL_PARTS. With `teardowns`, the Lab is
    closed in the background (its "teardown" part is filled in when that ends: call teardowns.wait())."""
    t_start = time.monotonic_ns()
    lab = TimedLab(after_source=teardowns.wait if teardowns else None, **settings)
    try:
        res = lab.run()
    except BaseException:
        lab.close()
        raise
    t_run_end = time.monotonic_ns()
    if teardowns is None:
        lab.close()
        return res, cell_parts(lab, t_start, t_run_end, time.monotonic_ns())
    parts = cell_parts(lab, t_start, t_run_end, t_run_end)
    teardowns.start(lab, parts, t_run_end)
    return res, parts


def summarize_cells(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per cell (backend, mode, RAM, dirty rate): the wall seconds of all its runs together, by CELL_PARTS."""
    cells: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        parts = r.get("seconds_by_part")
        if not parts:
            continue
        key = (r["backend"], r["mode"], r["ram_bytes"], r["dirty_rate"])
        c = cells.setdefault(
            key,
            {"backend": key[0], "mode": key[1], "ram_bytes": key[2], "dirty_rate": key[3], "runs": 0,
             "seconds": dict.fromkeys(CELL_PARTS, 0.0)},
        )  # fmt: skip
        c["runs"] += 1
        for k in CELL_PARTS:
            c["seconds"][k] += parts.get(k, 0.0)
    for c in cells.values():
        c["seconds"] = {k: round(v, 2) for k, v in c["seconds"].items()}
        c["seconds"]["total"] = round(sum(c["seconds"].values()), 2)  # teardown included, overlapped or not
    return list(cells.values())


def format_phases(seconds_by_phase: dict[str, float], by_cell: list[dict[str, Any]]) -> list[str]:
    """The wall time by bench phase, then by cell and part (all runs of a cell together)."""
    from labkit.qemu_syntax import format_size

    total = sum(seconds_by_phase.values()) or 1.0
    lines = ["wall time by phase (s):"]
    width = max((len(name) for name in seconds_by_phase), default=0)
    lines += [f"  {name:{width}s} {s:7.1f}  {100 * s / total:4.0f}%" for name, s in seconds_by_phase.items()]
    if by_cell:
        short = {"lab_setup": "setup", "source_spawn": "spawn", "source_boot_prefill": "boot",
                 "warmup": "warm", "destination_start": "dest", "previous_teardown": "wait",
                 "migration": "migr", "collect": "coll", "teardown": "down"}  # fmt: skip
        lines.append(
            "  by cell, all runs (s): " + " ".join(f"{k:>6s}" for k in (*short.values(), "total"))
        )
        for c in by_cell:
            where = (
                f"{c['backend'][:4]} {c['mode']} {format_size(c['ram_bytes'])} {format_size(c['dirty_rate'])}/s"
                f" x{c['runs']}"
            )
            lines.append(
                f"    {where:34s}" + " ".join(f"{c['seconds'].get(k, 0.0):6.1f}" for k in (*short, "total"))
            )
    return lines
