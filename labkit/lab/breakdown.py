"""The guest's pause broken down by checkpoint, the same way for both backends.

The checkpoints are QEMU 10.0.2's own: the names its vmstate_downtime_checkpoint trace point gives
(migration/migration.c and savevm.c), the main channel's migration_socket_outgoing_connected /
migration_socket_incoming_accepted trace points, and the STOP and RESUME events. Real QEMU writes them to
its trace log (labkit.host.runners.qemu_trace); the emulator records the same names at the same places
(labkit.vm.migration.migration). Where QEMU reads and loads each device section in turn, there is no
separate "device state read" instant, on either backend: dst-precopy-loadvm-completed covers both.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from itertools import pairwise
from typing import TYPE_CHECKING, Any

from labkit.lab.report import BreakdownRow, TimelineRow

if TYPE_CHECKING:
    import pandas as pd

# (side, checkpoint, what it marks), in the order QEMU passes them on the guest's critical path.
PAUSE_CHECKPOINTS: tuple[tuple[str, str, str], ...] = (
    ("source", "migration_socket_outgoing_connected", "main channel connected"),
    ("destination", "migration_socket_incoming_accepted", "main channel accepted"),
    ("source", "src-downtime-start", "stop requested (migration_stop_vm)"),
    ("source", "STOP", "vCPUs paused, STOP emitted"),
    ("source", "src-vm-stopped", "vm_stop_force_state returned: stop notifiers done"),
    ("source", "src-iterable-saved", "RAM's last section written"),
    ("source", "src-non-iterable-saved", "device state written"),
    ("destination", "dst-precopy-loadvm-completed", "device state read and loaded"),
    ("destination", "dst-precopy-bh-enter", "process_incoming_migration_bh runs"),
    ("destination", "dst-precopy-bh-announced", "self-announce done"),
    ("destination", "RESUME", "vm_start: RESUME emitted"),
    ("destination", "dst-precopy-bh-vm-started", "vm_start returned"),
)
# Off the guest's critical path: the source stops its downtime clock just before `completed`, which on real
# QEMU can come after the destination has resumed.
OFF_PATH_CHECKPOINTS: tuple[tuple[str, str, str], ...] = (
    ("source", "src-downtime-end", "source's downtime clock stops; completed follows"),
)
ALL_CHECKPOINTS = PAUSE_CHECKPOINTS + OFF_PATH_CHECKPOINTS
CHECKPOINT_WHAT = {(side, name): what for side, name, what in ALL_CHECKPOINTS}


def _times(timeline: Iterable[TimelineRow]) -> dict[tuple[str, str], float]:
    """The first time each (side, checkpoint) appears in a timeline: checkpoint rows and STOP/RESUME events."""
    out: dict[tuple[str, str], float] = {}
    for r in timeline:
        if r.kind == "checkpoint":
            key = (r.side, r.detail)
        elif r.kind in ("STOP", "RESUME"):
            key = (r.side, r.kind)
        else:
            continue
        if key in CHECKPOINT_WHAT and key not in out:
            out[key] = r.t_ms
    return out


def pause_breakdown(timeline: Iterable[TimelineRow]) -> list[BreakdownRow]:
    """The checkpoints of one migration in the order they happened, each with its time from the source's
    STOP event (from src-downtime-start when the guest was not running, so no STOP came) and the time since
    the previous one. Empty when neither happened."""
    times = _times(timeline)
    zero = times.get(("source", "STOP"), times.get(("source", "src-downtime-start")))
    if zero is None:
        return []
    rows: list[BreakdownRow] = []
    order = {(side, name): i for i, (side, name, _) in enumerate(ALL_CHECKPOINTS)}
    for (side, name), t in sorted(times.items(), key=lambda kv: (kv[1], order[kv[0]])):
        delta = None if not rows else round(t - (rows[-1].t_ms + zero), 3)
        rows.append(BreakdownRow(name, side, round(t - zero, 3), delta))
    return rows


def breakdown_steps(runs: Sequence[Sequence[BreakdownRow | dict[str, Any]]]) -> dict[str, Any]:
    """Over many migrations of one kind: the median time between consecutive critical-path checkpoints
    (PAUSE_CHECKPOINTS order, skipping any a run lacks), and the median time of each checkpoint from STOP."""

    def as_map(run: Sequence[BreakdownRow | dict[str, Any]]) -> dict[tuple[str, str], float]:
        rows = [r if isinstance(r, dict) else asdict(r) for r in run]
        return {(r["side"], r["checkpoint"]): r["t_ms"] for r in rows}

    maps = [as_map(run) for run in runs]
    deltas: dict[tuple[tuple[str, str], tuple[str, str]], list[float]] = {}
    for m in maps:
        path = [(side, name) for side, name, _ in PAUSE_CHECKPOINTS if (side, name) in m]
        for a, b in pairwise(path):
            deltas.setdefault((a, b), []).append(m[b] - m[a])
    steps: list[dict[str, Any]] = []
    for (a, b), values in deltas.items():
        steps.append(
            {
                "from": a[1],
                "from_side": a[0],
                "to": b[1],
                "to_side": b[0],
                "median_ms": round(statistics.median(values), 3),
                "n": len(values),
            }
        )
    order = {(side, name): i for i, (side, name, _) in enumerate(PAUSE_CHECKPOINTS)}
    steps.sort(key=lambda s: (order[(s["to_side"], s["to"])], order[(s["from_side"], s["from"])]))
    at = {}
    for side, name, _ in ALL_CHECKPOINTS:
        values = [m[(side, name)] for m in maps if (side, name) in m]
        if values:
            at[name] = round(statistics.median(values), 3)
    return {"steps": steps, "t_ms_median": at, "runs": len(maps)}


def pause_steps(rows: Sequence[BreakdownRow | dict[str, Any]]) -> list[dict[str, Any]]:
    """One migration's pause cut into steps, from the source's STOP through the critical-path checkpoints
    after it (PAUSE_CHECKPOINTS order, skipping any the run lacks) to the destination's RESUME: the steps sum
    to the STOP -> RESUME pause, so two runs compared step by step show where one's pause is longer. The
    main channel's checkpoints are left out: they belong before STOP, even where one lands inside the pause.
    Empty without both STOP and RESUME."""
    times = {
        (r["side"], r["checkpoint"]): r["t_ms"]
        for r in (x if isinstance(x, dict) else asdict(x) for x in rows)
    }
    path = [(side, name) for side, name, _ in PAUSE_CHECKPOINTS]
    path = path[path.index(("source", "STOP")) : path.index(("destination", "RESUME")) + 1]
    if path[0] not in times or path[-1] not in times:
        return []
    present = [key for key in path if key in times]
    return [
        {"from": a[1], "from_side": a[0], "to": b[1], "to_side": b[0], "ms": round(times[b] - times[a], 3)}
        for a, b in pairwise(present)
    ]


def compare_steps(runs: dict[str, Sequence[BreakdownRow | dict[str, Any]]]) -> pd.DataFrame:
    """Several runs' pause steps side by side (a DataFrame: step, then one ms column per run, named by the
    keys of `runs`, e.g. "emulated" and "qemu"), in critical-path order; a step a run lacks is NaN there."""
    import pandas as pd

    order = {(side, name): i for i, (side, name, _) in enumerate(PAUSE_CHECKPOINTS)}
    table: dict[str, dict[str, float]] = {}
    keys: dict[str, tuple[int, int]] = {}
    for label, rows in runs.items():
        for s in pause_steps(rows):
            step = f"{s['from']} -> {s['to']}"
            table.setdefault(step, {})[label] = s["ms"]
            keys[step] = (order[(s["to_side"], s["to"])], order[(s["from_side"], s["from"])])
    steps = sorted(table, key=keys.__getitem__)
    return pd.DataFrame(
        [{"step": step, **{label: table[step].get(label) for label in runs}} for step in steps],
        columns=["step", *runs],
    )


def largest_difference(frame: pd.DataFrame, a: str, b: str) -> str | None:
    """The step (a `compare_steps` row) where runs `a` and `b` differ most, in absolute ms; None if no step
    was measured in both."""
    both = frame.dropna(subset=[a, b])
    if both.empty:
        return None
    diff = (both[b] - both[a]).abs().to_numpy()
    return str(both["step"].iloc[int(diff.argmax())])
