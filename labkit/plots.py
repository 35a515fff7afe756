"""Figures from Results, Snapshots and results frames. Each function returns a new Figure and touches no
global matplotlib state (no pyplot), so it works the same in a notebook, a widget and a headless test."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from labkit.results import MappingRow, Result

SIDES = ("source", "destination")
MODE_COLOURS = {"normal": "tab:orange", "cpr-reboot": "tab:green", "cpr-transfer": "tab:blue"}


def _human(n: float) -> str:
    for unit, mult in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= mult:
            return f"{n / mult:g} {unit}"
    return f"{int(n)} B"


def plot_timeline(result: Result) -> Figure:
    """Both sides' events on one clock, the lab's phases as bands, and the guest's pause shaded; below, when
    the Result has a pause breakdown, the pause itself with QEMU's checkpoints on both lanes."""
    fig = Figure(figsize=(10, 6.4 if result.pause_breakdown else 3.2))
    ax = fig.add_subplot(2, 1, 1) if result.pause_breakdown else fig.add_subplot()
    rows = {"source": 2, "destination": 1, "lab": 0}
    phases = [r for r in result.timeline if r.side == "lab" and r.kind == "phase"]
    end = max((r.t_ms for r in result.timeline), default=1.0)
    for i, ph in enumerate(phases):
        stop = phases[i + 1].t_ms if i + 1 < len(phases) else end
        ax.axvspan(ph.t_ms, stop, color=f"C{i % 10}", alpha=0.08, label=None)
        ax.text(max(ph.t_ms, 0), -0.35 - 0.28 * (i % 3), ph.detail, fontsize=7, va="top", clip_on=True)
    for r in result.timeline:
        if r.side not in rows or (r.side == "lab" and r.kind == "phase") or r.kind == "trace":
            continue
        if r.kind == "checkpoint":  # named in the zoom below; here a small tick on the lane
            ax.plot(r.t_ms, rows[r.side], marker="|", color="tab:purple", markersize=6, alpha=0.6)
            continue
        marker = {"STOP": "v", "RESUME": "^", "MIGRATION": "o", "MIGRATION_PASS": "|", "checkpoint": "."}.get(
            r.kind, "x"
        )
        ax.plot(
            r.t_ms,
            rows[r.side],
            marker=marker,
            color="black" if r.kind in ("STOP", "RESUME") else "tab:gray",
            markersize=8,
        )
        if r.kind in ("MIGRATION", "STOP", "RESUME"):
            ax.annotate(
                r.detail or r.kind,
                (r.t_ms, rows[r.side]),
                xytext=(2, 6),
                textcoords="offset points",
                fontsize=7,
            )
    stop = next((r.t_ms for r in result.timeline if r.side == "source" and r.kind == "STOP"), None)
    resume = next((r.t_ms for r in result.timeline if r.side == "destination" and r.kind == "RESUME"), None)
    if stop is not None and resume is not None:
        ax.axvspan(stop, resume, color="red", alpha=0.25, label=f"guest paused {resume - stop:.2f} ms")
        ax.legend(loc="upper left", fontsize=8)
    ax.set_yticks(list(rows.values()), list(rows.keys()))
    ax.set_ylim(-1.2, 2.6)
    # zoom on the migration itself: from the migrate command (or first MIGRATION event) to the end
    start = next((r.t_ms for r in result.timeline if r.kind in ("qmp", "MIGRATION")), None)
    if start is not None:
        span = max(end - start, 1.0)
        ax.set_xlim(start - 0.15 * span, end + 0.05 * span)
    ax.set_xlabel("time (ms, host CLOCK_MONOTONIC)")
    ax.set_title(f"{result.mode} migration timeline ({result.backend}, {_human(result.ram_bytes)})")
    if result.pause_breakdown:
        _plot_pause_breakdown(fig.add_subplot(2, 1, 2), result)
    fig.tight_layout()
    return fig


def _plot_pause_breakdown(ax, result: Result) -> None:
    """The pause, zoomed: each checkpoint (QEMU's names, both backends) on its process's lane, in ms from the
    source's STOP event; QEMU's per-section save/load trace points as dots; STOP -> RESUME shaded."""
    lanes = {"source": 1, "destination": 0}
    t_last = max(r.t_ms for r in result.pause_breakdown)
    start = min((r.t_ms for r in result.pause_breakdown if r.checkpoint == "src-downtime-start"), default=0.0)
    # a main channel connected long before (pre-copy) stays in the overview above
    rows = [r for r in result.pause_breakdown if r.t_ms >= min(start, 0.0) - 0.5 * max(t_last, 0.01)]
    t_first = min(r.t_ms for r in rows)
    span = max(t_last - t_first, 0.01)
    lo, hi = t_first - 0.05 * span, t_last + 0.05 * span
    resume = next((r.t_ms for r in rows if r.checkpoint == "RESUME"), None)
    if resume is not None:
        ax.axvspan(0.0, resume, color="red", alpha=0.15, label=f"STOP -> RESUME {resume:.3f} ms")
        ax.legend(loc="upper right", fontsize=7)
    stop_abs = next((r.t_ms for r in result.timeline if r.side == "source" and r.kind == "STOP"), None)
    if stop_abs is None:  # the guest was not running: times are from src-downtime-start
        stop_abs = next(
            (r.t_ms for r in result.timeline if r.kind == "checkpoint" and r.detail == "src-downtime-start"),
            0.0,
        )
    for r in result.timeline:
        t = r.t_ms - stop_abs
        if r.kind == "trace" and r.side in lanes and lo <= t <= hi:
            ax.plot(t, lanes[r.side], marker=".", color="tab:gray", markersize=3, alpha=0.5)
    last: dict[str, tuple[float, int]] = {}  # per lane: the last label's time and level, to stack close ones
    for r in sorted(rows, key=lambda r: r.t_ms):
        event = r.checkpoint in ("STOP", "RESUME")
        y = lanes.get(r.side, 0)
        prev_t, prev_level = last.get(r.side, (None, -1))
        level = (prev_level + 1) % 5 if prev_t is not None and r.t_ms - prev_t < 0.12 * (hi - lo) else 0
        last[r.side] = (r.t_ms, level)
        ax.plot(
            r.t_ms,
            y,
            marker="v" if r.checkpoint == "STOP" else "^" if event else "|",
            color="black" if event else "tab:purple",
            markersize=9,
        )
        ax.annotate(
            r.checkpoint,
            (r.t_ms, y),
            xytext=(3, 6 + 8 * level),
            textcoords="offset points",
            fontsize=6.5,
            color="black" if event else "tab:purple",
        )
    ax.set_yticks(list(lanes.values()), list(lanes.keys()))
    ax.set_ylim(-0.4, 2.0)
    ax.set_xlim(lo, hi)
    ax.set_xlabel("ms from the source's STOP event")
    ax.set_title("the pause by checkpoint (QEMU's trace-point names)", fontsize=9)


def plot_address_space(mappings: Iterable[MappingRow], title: str = "guest RAM in each process") -> Figure:
    """Each RAM block at its virtual address in source and destination, coloured by inode; a line joins
    the same inode across the two processes (cpr-transfer: same memory, new address)."""
    rows = list(mappings)
    fig = Figure(figsize=(9, 4.5))
    ax = fig.add_subplot()
    inodes = sorted({r.inode for r in rows})
    colour = {ino: f"C{i % 10}" for i, ino in enumerate(inodes)}
    centre: dict[tuple[str, int], tuple[float, float]] = {}
    x_of = {"source": 0.0, "destination": 2.0}
    for side in SIDES:
        blocks = sorted((r for r in rows if r.side == side), key=lambda r: r.start)
        # addresses are far apart: stack blocks in address order with heights by log size, labelled with
        # their real addresses, so a 4 KiB ROM and a 1 GiB RAM block are both visible
        y = 0.0
        for r in blocks:
            h = max(2.2, np.log2(max(r.size, 4096)) - 11)
            ax.add_patch(
                Rectangle((x_of[side], y), 1.0, h, facecolor=colour[r.inode], edgecolor="black", alpha=0.75)
            )
            if h >= 3:  # room for three lines
                label = f"{r.block}\n{r.start:#x}\n{_human(r.size)}, inode {r.inode}"
            else:
                label = f"{r.block}  {_human(r.size)}\n{r.start:#x}  inode {r.inode}"
            ax.text(x_of[side] + 0.5, y + h / 2, label, ha="center", va="center", fontsize=7)
            centre[(side, r.inode)] = (x_of[side], y + h / 2)
            y += h + 0.3
        ax.text(x_of[side] + 0.5, -0.6, side, ha="center", va="top", fontsize=10, weight="bold")
    for ino in inodes:
        if ("source", ino) in centre and ("destination", ino) in centre:
            (_, ys), (_, yd) = centre[("source", ino)], centre[("destination", ino)]
            ax.plot([1.0, 2.0], [ys, yd], color=colour[ino], linewidth=2, label=None)
    ax.set_xlim(-0.2, 3.2)
    ax.set_ylim(-1.5, max([v[1] for v in centre.values()] + [1]) + 3)
    ax.axis("off")
    shared = sum(1 for ino in inodes if ("source", ino) in centre and ("destination", ino) in centre)
    ax.set_title(f"{title}: {shared} block(s) share an inode across the two processes")
    fig.tight_layout()
    return fig


def plot_passes(result: Result) -> Figure:
    """Pages sent in each pre-copy pass (the last one is stop-and-copy, during the pause)."""
    fig = Figure(figsize=(6, 3.2))
    ax = fig.add_subplot()
    pages = result.pages_per_pass or [0]
    x = np.arange(1, len(pages) + 1)
    colours = ["tab:blue"] * (len(pages) - 1) + ["tab:red"]
    ax.bar(x, np.array(pages) * 4096 / (1 << 20), color=colours)
    ax.set_xlabel("pass")
    ax.set_ylabel("MiB of pages sent")
    ax.set_xticks(x)
    ax.set_title(f"{result.mode}: pages per pass (red: stop-and-copy, guest paused)")
    fig.tight_layout()
    return fig


def plot_pause(
    frame, x: str = "ram_bytes", y: str = "pause_ms_events", modes: Sequence[str] | None = None
) -> Figure:
    """Pause time against RAM size (x="ram_bytes") or dirty rate (x="dirty_rate"), one line per mode,
    median over repetitions with min-max whiskers."""
    fig = Figure(figsize=(6.5, 3.8))
    ax = fig.add_subplot()
    modes = modes or sorted(frame["mode"].unique())
    for mode in modes:
        sub = frame[(frame["mode"] == mode) & frame[y].notna()]
        if sub.empty:
            continue
        g = sub.groupby(x)[y]
        med, lo, hi = g.median(), g.min(), g.max()
        xs = med.index.to_numpy(dtype=float) / (1 << 20)
        ax.errorbar(
            xs,
            med.to_numpy(),
            yerr=[med - lo, hi - med],
            marker="o",
            capsize=3,
            label=mode,
            color=MODE_COLOURS.get(mode),
        )
    ax.set_xlabel({"ram_bytes": "guest RAM (MiB)", "dirty_rate": "guest dirty rate (MiB/s)"}.get(x, x))
    ax.set_ylabel(f"pause (ms, {y.removeprefix('pause_ms_')})")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("pause time by mode")
    fig.tight_layout()
    return fig


def precopy_model(
    ram: float, bandwidth: float, dirty_rate: float, downtime_limit_s: float, max_passes: int = 30
):
    """Clark et al.'s iterative pre-copy: pass i sends M*r^i (r = dirty rate / bandwidth) until what is left
    fits in the downtime limit. Returns (bytes per pass, total seconds, downtime seconds, converged)."""
    r = dirty_rate / bandwidth
    sent = [ram]
    while len(sent) < max_passes and sent[-1] / bandwidth > downtime_limit_s:
        nxt = sent[-1] * r
        if nxt >= sent[-1]:
            return sent, float("inf"), float("inf"), False
        sent.append(nxt)
    return sent, sum(sent) / bandwidth, sent[-1] / bandwidth, sent[-1] / bandwidth <= downtime_limit_s


def plot_precopy_model(
    ram: float, bandwidth: float, dirty_rates: Sequence[float], downtime_limit_s: float = 0.3, measured=None
) -> Figure:
    """The model's total time against dirty rate, with measured points drawn over it when given."""
    fig = Figure(figsize=(6.5, 3.8))
    ax = fig.add_subplot()
    totals = [precopy_model(ram, bandwidth, d, downtime_limit_s)[1] for d in dirty_rates]
    ax.plot(np.array(dirty_rates) / (1 << 20), np.array(totals) * 1000, label="model: sum of M*r^i / B")
    ax.axvline(
        bandwidth / (1 << 20), color="red", linestyle="--", label="dirty rate = bandwidth (never converges)"
    )
    if measured is not None and len(measured):
        ax.plot(measured["dirty_rate"] / (1 << 20), measured["total_ms"], "o", label="measured")
    ax.set_xlabel("guest dirty rate (MiB/s)")
    ax.set_ylabel("total migration time (ms)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(f"pre-copy convergence, {_human(ram)} at {_human(bandwidth)}/s")
    fig.tight_layout()
    return fig
