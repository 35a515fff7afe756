"""The guest's pause split by checkpoint, for the three CPR modes, and where each mode starts its new process.

cpr-transfer starts the new QEMU and lets it map guest RAM *before* the guest stops: the pause holds device
state only. cpr-reboot and cpr-exec start the new process *after* the guest stopped, so its whole start-up
falls inside the pause; cpr-exec saves the quit, the fresh process and the second container, but not the
start-up of the new program. This module runs the sweep, cuts each pause at the checkpoints both processes
recorded (their names are read from the Results, not assumed), and draws it.
"""

from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass
from typing import TYPE_CHECKING

from labkit.lab.engine import PHASES, migrate
from labkit.lab.report import Result
from labkit.qemu_syntax import human_size

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

CPR_MODES = ("cpr-reboot", "cpr-transfer", "cpr-exec")
WHERE_COLOURS = {"source": "tab:blue", "between the programs": "tab:red", "destination": "tab:green"}
# The lab phase that starts the new process, per mode (cpr-exec's start-up is read from its checkpoints).
_SPAWN_PHASE = {"cpr-transfer": PHASES["cpr-transfer"][1], "cpr-reboot": PHASES["cpr-reboot"][3]}


@dataclass
class Segment:
    """One piece of the pause: from one checkpoint (or STOP) to the next (or RESUME), in ms after STOP."""

    mode: str
    ram_bytes: int
    start_ms: float
    duration_ms: float
    frm: str
    to: str
    where: str  # source | destination | between the programs


def huge_pages_note() -> str | None:
    """Why the huge-page half of the sweep is skipped here, or None if hugetlb pages could be had."""
    try:
        meminfo = dict(
            line.split(":", 1) for line in open("/proc/meminfo", encoding="ascii").read().splitlines()
        )
        free = int(meminfo.get("HugePages_Free", "0").split()[0])
    except (OSError, ValueError):
        free = 0
    if free == 0:
        return (
            "huge pages skipped: this machine has no hugetlb pages reserved (HugePages_Free 0), and the "
            "emulator's memory-backend-memfd uses 4 KiB pages only"
        )
    return "huge pages skipped: the emulator's memory-backend-memfd uses 4 KiB pages only"


def _points(result: Result) -> tuple[float, float, list[tuple[float, str, str]]] | None:
    tl = result.timeline
    stop = next((r.t_ms for r in tl if r.side == "source" and r.kind == "STOP"), None)
    resume = next((r.t_ms for r in tl if r.side == "destination" and r.kind == "RESUME"), None)
    if stop is None or resume is None:
        return None
    marks = sorted(
        (r.t_ms, r.side, r.detail) for r in tl if r.kind == "checkpoint" and stop <= r.t_ms <= resume
    )
    return stop, resume, [(stop, "source", "STOP"), *marks, (resume, "destination", "RESUME")]


def pause_segments(result: Result) -> list[Segment]:
    """The pause (source STOP to destination RESUME) cut at every checkpoint that falls inside it."""
    found = _points(result)
    if found is None:
        return []
    stop, _, points = found
    out = []
    for (t0, side0, name0), (t1, side1, name1) in zip(points, points[1:], strict=False):
        where = side0 if side0 == side1 else "between the programs"
        out.append(
            Segment(
                result.mode, result.ram_bytes, round(t0 - stop, 3), round(t1 - t0, 3), name0, name1, where
            )
        )
    return out


def new_process_window(result: Result) -> tuple[float, float] | None:
    """When the new process started and had guest RAM mapped, in ms relative to the source's STOP."""
    found = _points(result)
    if found is None:
        return None
    stop = found[0]
    tl = result.timeline
    if result.mode == "cpr-exec":
        t0 = next((r.t_ms for r in tl if r.kind == "checkpoint" and r.detail == "cpr-exec"), None)
        t1 = next((r.t_ms for r in tl if r.kind == "checkpoint" and r.detail == "dst-ram-mapped"), None)
    else:
        phases = [r for r in tl if r.side == "lab" and r.kind == "phase"]
        i = next((i for i, r in enumerate(phases) if r.detail == _SPAWN_PHASE.get(result.mode)), None)
        t0 = phases[i].t_ms if i is not None else None
        t1 = phases[i + 1].t_ms if i is not None and i + 1 < len(phases) else None
    if t0 is None or t1 is None:
        return None
    return round(t0 - stop, 3), round(t1 - stop, 3)


def sweep(
    rams: tuple[str, ...] = ("64M", "256M", "1G"),
    modes: tuple[str, ...] = CPR_MODES,
    seed: int = 1,
    dirty_rate: str = "16M",
    prefill: bool = True,
) -> list[Result]:
    """One migration per mode and RAM size, same guest workload and seed (a memfd backend, share=on).

    prefill: the guest writes all its RAM once at boot, as a guest that has used its memory; every page is
    then mapped in the old process, and tearing those mappings down is part of the exec (cpr-exec) or the
    quit (cpr-reboot)."""
    return [
        migrate(mode=mode, ram=ram, dirty_rate=dirty_rate, seed=seed, warmup=0.2, prefill=prefill)
        for ram in rams
        for mode in modes
    ]


def cpr_exec_steps(ram: str = "64M", dirty_rate: str = "16M", seed: int = 1) -> tuple[pd.DataFrame, Result]:
    """Step through one cpr-exec migration (both programs held at each phase) and tabulate, per phase, the
    PID, the run states, the memfds the process holds, and where ram0 is mapped (inode and address)."""
    import pandas as pd

    from labkit.lab.engine import Lab

    rows = []
    with Lab(mode="cpr-exec", ram=ram, dirty_rate=dirty_rate, seed=seed) as lab:
        for _ in lab.phases:
            snap = lab.step()
            side = "destination" if snap.fds.get("destination") else "source"
            ram0 = next((x for x in snap.mappings if x.block == "ram0" and x.side == side), None)
            rows.append(
                {
                    "phase": snap.phase,
                    "pid": snap.pids.get(side),
                    "program": side,
                    "source state": snap.states.get("source"),
                    "destination state": snap.states.get("destination"),
                    "memfds held": ", ".join(f["name"] for f in snap.fds.get(side, [])),
                    "ram0 inode": ram0.inode if ram0 else None,
                    "ram0 address": hex(ram0.start) if ram0 else None,
                }
            )
        result = lab.run()
    return pd.DataFrame(rows), result


def breakdown_frame(results: list[Result]) -> pd.DataFrame:
    """One row per segment: mode, RAM, from, to, where, start and duration (ms after STOP)."""
    import pandas as pd

    rows = [
        {
            "mode": s.mode,
            "ram": human_size(s.ram_bytes),
            "ram_bytes": s.ram_bytes,
            "from": s.frm,
            "to": s.to,
            "where": s.where,
            "start_ms": s.start_ms,
            "duration_ms": s.duration_ms,
        }
        for r in results
        for s in pause_segments(r)
    ]
    return pd.DataFrame(
        rows, columns=["mode", "ram", "ram_bytes", "from", "to", "where", "start_ms", "duration_ms"]
    )


def reference_prefix() -> str:
    """The stored sweep (data/pause-breakdown-*.csv), for when there is no time to run one."""
    top = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # labkit/measure/ -> repo
    return os.path.join(top, "data", "pause-breakdown")


def grows_with_ram(summary: pd.DataFrame, ms_per_gib: float = 250.0) -> dict[str, bool]:
    """Per mode: does the pause grow by more than `ms_per_gib` per GiB of guest RAM, from the smallest size
    measured to the largest? (A slope, not a ratio: a 3 ms pause that becomes 30 ms has not grown with RAM in
    any way that matters, and a shared machine's noise is tens of milliseconds.)"""
    out = {}
    for mode, rows in summary[summary.status == "completed"].groupby("mode", sort=False):
        rows = rows.sort_values("ram_bytes")
        gib = (rows.ram_bytes.iloc[-1] - rows.ram_bytes.iloc[0]) / (1 << 30)
        rise = rows.pause_ms.iloc[-1] - rows.pause_ms.iloc[0]
        out[mode] = bool(gib > 0 and rise / gib > ms_per_gib)
    return out


def summary_frame(results: list[Result]) -> pd.DataFrame:
    """One row per migration: the pause, the new process's start-up window, and how much of it is inside."""
    import pandas as pd

    rows = []
    for r in results:
        window = new_process_window(r)
        pause = r.pause_ms.get("events")
        inside = None
        if window is not None and pause is not None:
            inside = round(max(0.0, min(window[1], pause) - max(window[0], 0.0)), 3)
        rows.append(
            {
                "mode": r.mode,
                "ram": human_size(r.ram_bytes),
                "ram_bytes": r.ram_bytes,
                "status": r.status,
                "pause_ms": pause,
                "start_up_from_ms": window[0] if window else None,
                "start_up_to_ms": window[1] if window else None,
                "start_up_inside_pause_ms": inside,
                "same_pid": r.pids.get("source") == r.pids.get("destination"),
            }
        )
    return pd.DataFrame(rows)


def plot_pause_breakdown(segments: pd.DataFrame, summary: pd.DataFrame, note: str | None = None) -> Figure:
    """One bar per completed migration: its pause cut at each checkpoint, coloured by which program was
    working, and the new process's start-up (hatched) where it falls relative to STOP (x = 0).

    Takes the frames (breakdown_frame, summary_frame) so that stored measurements draw the same figure."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    done = summary[summary.status == "completed"]
    fig = Figure(figsize=(10, 0.55 * max(len(done), 1) + 2.4), layout="constrained")
    ax = fig.add_subplot()
    labels = []
    for y, row in enumerate(done.itertuples()):
        labels.append(f"{row.mode}, {row.ram}")
        mine = segments[(segments["mode"] == row.mode) & (segments.ram_bytes == row.ram_bytes)]
        for seg in mine.itertuples():
            ax.barh(
                y,
                seg.duration_ms,
                left=seg.start_ms,
                color=WHERE_COLOURS[seg.where],
                edgecolor="white",
                height=0.6,
            )
        if (
            row.start_up_from_ms == row.start_up_from_ms and row.start_up_to_ms == row.start_up_to_ms
        ):  # not NaN
            ax.barh(
                y + 0.36,
                row.start_up_to_ms - row.start_up_from_ms,
                left=row.start_up_from_ms,
                height=0.14,
                color="none",
                edgecolor="black",
                hatch="////",
                linewidth=0.6,
            )
        if row.pause_ms == row.pause_ms:
            ax.annotate(
                f"{row.pause_ms:.1f} ms",
                (max(row.pause_ms, 0), y),
                xytext=(4, -3),
                textcoords="offset points",
                fontsize=8,
            )
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("ms after the source's STOP (the pause runs from 0 to the destination's RESUME)")
    handles = [Patch(color=c, label=f"pause: {w}") for w, c in WHERE_COLOURS.items()]
    handles.append(Patch(facecolor="none", edgecolor="black", hatch="////", label="new process start-up"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # off the bars
    title = "Where the pause goes, and where each mode starts its new process"
    ax.set_title(title + (f"\n{textwrap.fill(note, 120)}" if note else ""), fontsize=9)
    return fig


def plot_results(results: list[Result]) -> Figure:
    """The figure, straight from Results."""
    return plot_pause_breakdown(breakdown_frame(results), summary_frame(results), huge_pages_note())


def write_frames(results: list[Result], prefix: str, command: str) -> list[str]:
    """Write `PREFIX-segments.csv` and `PREFIX-summary.csv`, each headed by a comment naming the command."""
    paths = []
    for name, frame in (("segments", breakdown_frame(results)), ("summary", summary_frame(results))):
        path = f"{prefix}-{name}.csv"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"# {command}\n")
            frame.to_csv(f, index=False)
        paths.append(path)
    return paths


def read_frames(prefix: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read what write_frames wrote: (segments, summary)."""
    from labkit.lab.report import read_csv

    return read_csv(f"{prefix}-segments.csv"), read_csv(f"{prefix}-summary.csv")


def main(argv: list[str] | None = None) -> int:
    """`python -m labkit.measure.pause_breakdown [--ram SIZE]... [--seed N] [--out PREFIX]`: sweep, write, draw."""
    import argparse
    import shlex
    import sys

    p = argparse.ArgumentParser(prog="python -m labkit.measure.pause_breakdown", description=__doc__.splitlines()[0])
    p.add_argument("--ram", action="append", help="repeatable (default 64M, 256M, 1G)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default="pause-breakdown", help="prefix of the CSV and PNG files written")
    args = p.parse_args(argv)
    rams = tuple(args.ram or ("64M", "256M", "1G"))
    results = sweep(rams, seed=args.seed)
    command = "python -m labkit.measure.pause_breakdown " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    paths = write_frames(results, args.out, command.strip())
    plot_results(results).savefig(f"{args.out}.png", dpi=110)
    print(summary_frame(results).to_string(index=False))
    print("wrote", ", ".join([*paths, f"{args.out}.png"]))
    return 0 if all(r.status == "completed" for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
