"""Figures from Results, Snapshots and results frames. Each function returns a new Figure and touches no
global matplotlib state (no pyplot), so it works the same in a notebook, a widget and a headless test.

One module per figure family: here the timeline, passes, pause by mode, the pre-copy model and two runs side
by side; the sequence diagram in plot_sequence, guest RAM's address space in plot_memory, what they share in
plot_style. This module names them all, so `labkit.plots.plot_sequence` still works."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from labkit.lab.report import Result
from labkit.measure.plot_memory import plot_address_space as plot_address_space
from labkit.measure.plot_sequence import plot_sequence as plot_sequence
from labkit.measure.plot_style import (
    MODE_COLOURS,
    PHASE_COLOURS,
    _human,
    _pause_window,
    _t0,
    conditions,
)
from labkit.qemu_syntax import SIDES

_MARKS = {
    "STOP": ("v", "black", 9, "STOP event (guest paused)"),
    "RESUME": ("^", "black", 9, "RESUME event (guest runs)"),
    "MIGRATION": ("o", "tab:gray", 6, "MIGRATION event (status change)"),
    "MIGRATION_PASS": ("|", "tab:brown", 10, "MIGRATION_PASS event (a pre-copy pass starts)"),
    "checkpoint": ("|", "tab:purple", 7, "QEMU checkpoint (named in the zoom below)"),
    "qmp": ("x", "tab:red", 8, "the lab sends `migrate` (QMP)"),
    "process": ("X", "tab:olive", 8, "process exits"),
}


def plot_timeline(result: Result) -> Figure:
    """The run on one clock, in ms since its first event: on top the whole run with the lab's phases as
    coloured bands (named in the legend below); then the migration itself, from the `migrate` command, with
    both sides' events as markers (explained in the legend) and the guest's pause in red; last, a panel
    zooming on the pause with each QEMU checkpoint on its own row, so no two names print over each other."""
    zoom = _pause_rows(result)
    fig = Figure(figsize=(11, 9.0 if zoom else 5.6), layout="constrained")
    ratios = [0.55, 1, 1.5] if zoom else [0.55, 1]
    axes = fig.subplots(len(ratios), 1, height_ratios=ratios)
    t0 = _t0(result)
    end = max((r.t_ms for r in result.timeline), default=t0 + 1.0) - t0
    sides = [s for s in SIDES if any(r.side == s and r.kind in _MARKS for r in result.timeline)]
    lane = {s: len(sides) - 1 - i for i, s in enumerate(sides)}
    start = next((r.t_ms - t0 for r in result.timeline if r.kind in ("qmp", "MIGRATION")), 0.0)
    window = (max(start - 0.05 * (end - start), 0.0), end + 0.02 * max(end - start, 1.0))
    phases = _draw_phases(axes[0], result, t0, end)
    _draw_phases(axes[1], result, t0, end)
    for ax in axes[:2]:
        seen = _draw_marks(ax, result, t0, lane)
        ax.set_yticks(list(lane.values()), list(lane.keys()))
        ax.set_ylim(-0.6, max(len(sides), 1) - 0.4)
    over, mig = axes[0], axes[1]
    over.set_xlim(0, max(end, 1.0) * 1.01)
    over.axvspan(*window, facecolor="none", edgecolor="black", linestyle="--", linewidth=1.2)
    over.set_title(
        f"migration timeline: {conditions(result)}\nthe whole run (dashed box: enlarged below)", fontsize=10
    )
    over.set_xlabel("time (ms since the first event)")
    mig.set_xlim(*window)
    mig.set_xlabel("time (ms since the first event)")
    mig.set_title("the migration, from the `migrate` command on", fontsize=10)
    mig.legend(
        list(seen.values()),
        list(seen.keys()),
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
        title="markers",
        title_fontsize=8,
    )
    if phases:
        fig.legend(
            handles=phases,
            loc="outside lower center",
            ncols=2,
            fontsize=8,
            title="phases (bands)",
            title_fontsize=8,
        )
    if zoom:
        _plot_pause_zoom(axes[2], result, zoom)
    return fig


def _draw_phases(ax, result: Result, t0: float, end: float) -> list:
    """The lab's phases as bands, one colour each; returns the legend handles (phase names live there:
    as text on the axes they would overlap or be clipped)."""
    phases = [r for r in result.timeline if r.side == "lab" and r.kind == "phase"]
    handles = []
    for i, ph in enumerate(phases):
        stop = phases[i + 1].t_ms - t0 if i + 1 < len(phases) else end
        handles.append(
            ax.axvspan(
                ph.t_ms - t0,
                max(stop, ph.t_ms - t0),
                color=PHASE_COLOURS[i % len(PHASE_COLOURS)],
                alpha=0.15,
                label=f"phase {i + 1}: {ph.detail}",
            )
        )
    return handles


def _draw_marks(ax, result: Result, t0: float, lane: dict[str, int]) -> dict[str, object]:
    """Each event and checkpoint as a marker on its process's lane; the pause in red. Returns the legend."""
    seen: dict[str, object] = {}
    for r in result.timeline:
        if r.side not in lane or r.kind not in _MARKS:
            continue
        marker, colour, size, text = _MARKS[r.kind]
        (h,) = ax.plot(r.t_ms - t0, lane[r.side], marker=marker, color=colour, markersize=size, linestyle="")
        seen.setdefault(text, h)
    pause = _pause_window(result)
    if pause is not None:
        # hatched, not filled: the phases behind it stay readable
        seen[f"guest paused, STOP -> RESUME: {pause[1] - pause[0]:.2f} ms"] = ax.axvspan(
            pause[0] - t0,
            pause[1] - t0,
            facecolor="none",
            edgecolor="red",
            hatch="//",
            linewidth=1.0,
            alpha=0.7,
        )
    return seen


def _pause_rows(result: Result) -> list:
    """The timeline rows the zoom draws: checkpoints and STOP/RESUME around the pause (not per-section trace
    points: they are many, and unnamed)."""
    pause = _pause_window(result)
    marks = [r for r in result.timeline if r.kind in ("checkpoint", "STOP", "RESUME") and r.side in SIDES]
    if pause is None or not marks:
        return []
    span = max(pause[1] - pause[0], 0.01)
    # from the `migrate` command on: the source's own boot-time RESUME is no part of this pause
    begun = next((r.t_ms for r in result.timeline if r.kind in ("qmp", "MIGRATION")), pause[0])
    lo, hi = max(pause[0] - 0.5 * span, begun), pause[1] + 0.5 * span
    return [r for r in marks if lo <= r.t_ms <= hi and not r.detail.startswith("labkit-cpr")]


def _plot_pause_zoom(ax, result: Result, rows) -> None:
    """The pause, zoomed: one row per checkpoint (QEMU's names, both backends), in ms from the source's STOP
    event, coloured by process; STOP -> RESUME shaded."""
    window = _pause_window(result)
    if window is None:  # _pause_rows finds no rows to zoom on without a pause
        return
    stop, resume = window
    colour = {"source": "tab:blue", "destination": "tab:green"}
    rows = sorted(rows, key=lambda r: r.t_ms)
    labels = []
    for i, r in enumerate(rows):
        name = r.kind if r.kind in ("STOP", "RESUME") else r.detail
        labels.append(f"{r.side}: {name}")
        marker = "v" if r.kind == "STOP" else "^" if r.kind == "RESUME" else "o"
        ax.plot(r.t_ms - stop, i, marker=marker, color=colour[r.side], markersize=7, linestyle="")
    ax.axvspan(0.0, resume - stop, color="red", alpha=0.15)
    ax.set_yticks(range(len(labels)), labels, fontsize=7.5)
    for tick, r in zip(ax.get_yticklabels(), rows, strict=True):
        tick.set_color(colour[r.side])
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.grid(axis="y", color="0.9")
    handles = [
        Patch(color="red", alpha=0.15, label=f"guest paused: {resume - stop:.2f} ms"),
        Line2D([], [], marker="o", color="tab:blue", linestyle="", label="source checkpoint"),
        Line2D([], [], marker="o", color="tab:green", linestyle="", label="destination checkpoint"),
        Line2D([], [], marker="v", color="0.3", linestyle="", label="STOP event"),
        Line2D([], [], marker="^", color="0.3", linestyle="", label="RESUME event"),
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.set_xlabel("ms from the source's STOP event")
    ax.set_title("zoom on the pause (hatched red above): QEMU's checkpoints in order", fontsize=10)


def plot_passes(result: Result) -> Figure:
    """Pages sent in each pre-copy pass (the last one is stop-and-copy, during the pause)."""
    fig = Figure(figsize=(6.5, 3.6), layout="constrained")
    ax = fig.add_subplot()
    pages = result.pages_per_pass or [0]
    x = np.arange(1, len(pages) + 1)
    colours = ["tab:blue"] * (len(pages) - 1) + ["tab:red"]
    ax.bar(x, np.array(pages) * 4096 / (1 << 20), color=colours)
    ax.set_xlabel("pass")
    ax.set_ylabel("MiB of pages sent")
    ax.set_xticks(x)
    ax.legend(
        handles=[
            Patch(color="tab:blue", label="pre-copy pass, guest running"),
            Patch(color="tab:red", label="stop-and-copy, guest paused"),
        ],
        fontsize=8,
    )
    ax.set_title(f"pages sent per pass\n{conditions(result)}", fontsize=10)
    return fig


_MEASURES = {
    "pause_ms_events": "pause, STOP -> RESUME",
    "pause_ms_reported": "pause QEMU reports (downtime)",
    "pause_ms_guest": "pause the guest saw",
    "total_ms": "total migration time",
}


def frame_conditions(frame, x: str) -> str:
    """What the runs in a frame held constant, in human units (the x axis says what varied)."""
    parts = []
    if "backend" in frame and frame["backend"].nunique() == 1:
        parts.append(f"{frame['backend'].iloc[0]} backend")
    if x != "dirty_rate" and "dirty_rate" in frame and frame["dirty_rate"].nunique() == 1:
        rate = float(frame["dirty_rate"].iloc[0])
        parts.append(f"guest writing {_human(rate)}/s" if rate else "idle guest")
    if x != "ram_bytes" and "ram_bytes" in frame and frame["ram_bytes"].nunique() == 1:
        parts.append(f"{_human(float(frame['ram_bytes'].iloc[0]))} guest RAM")
    return ", ".join(parts)


def plot_pause(
    frame,
    x: str = "ram_bytes",
    y: str = "pause_ms_events",
    modes: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Pause time against RAM size (x="ram_bytes") or dirty rate (x="dirty_rate"), one line per mode,
    median over repetitions with min-max whiskers, on linear axes (a log axis hides growth). The title says
    which measure and what the runs held constant, so two such figures never share one title."""
    fig = Figure(figsize=(7, 4.2), layout="constrained")
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
            label=f"{mode} (median, min-max)",
            color=MODE_COLOURS.get(mode),
        )
    ax.set_xlabel({"ram_bytes": "guest RAM (MiB)", "dirty_rate": "guest dirty rate (MiB/s)"}.get(x, x))
    measure = _MEASURES.get(y, y)
    ax.set_ylabel(f"{measure} (ms)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    against = {"ram_bytes": "guest RAM", "dirty_rate": "dirty rate"}.get(x, x)
    held = frame_conditions(frame, x)
    ax.set_title(title or f"{measure} against {against} by mode" + (f"\n{held}" if held else ""), fontsize=10)
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
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    totals = [precopy_model(ram, bandwidth, d, downtime_limit_s)[1] for d in dirty_rates]
    finite = np.array([t if np.isfinite(t) else np.nan for t in totals]) * 1000  # never converges: no point
    ax.plot(np.array(dirty_rates) / (1 << 20), finite, marker=".", label="model: sum of M*r^i / B")
    ax.axvline(
        bandwidth / (1 << 20), color="red", linestyle="--", label="dirty rate = bandwidth (never converges)"
    )
    if measured is not None and len(measured):
        ax.plot(measured["dirty_rate"] / (1 << 20), measured["total_ms"], "o", label="measured")
    ax.set_xlabel("guest dirty rate (MiB/s)")
    ax.set_ylabel("total migration time (ms)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.set_title(
        f"pre-copy model: total time against dirty rate\n{_human(ram)} guest RAM, "
        f"{_human(bandwidth)}/s bandwidth, {downtime_limit_s * 1000:g} ms downtime limit",
        fontsize=10,
    )
    return fig


def plot_backends(first: Result, second: Result) -> Figure:
    """Two runs' pauses cut at QEMU's checkpoints, step by step on one linear axis: a pair of bars per step
    (STOP -> src-vm-stopped -> ... -> RESUME; the steps of each run sum to its STOP -> RESUME pause), so the
    step where one pause is longer stands out. Made for one migration on each backend with the same
    settings (labels name the backend; the mode too when both runs share a backend)."""
    from labkit.lab.breakdown import compare_steps

    runs = {}
    for r in (first, second):
        label = f"{r.backend} backend" if first.backend != second.backend else f"{r.backend}, {r.mode}"
        runs[label] = r
    frame = compare_steps({label: r.pause_breakdown for label, r in runs.items()})
    fig = Figure(figsize=(10, 1.9 + 0.62 * max(len(frame), 2)), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(frame))
    height = 0.38
    for i, (label, r) in enumerate(runs.items()):
        values = frame[label].to_numpy(dtype=float)
        bars = ax.barh(
            y + (i - 0.5) * height,
            np.nan_to_num(values),
            height=height,
            color=("tab:blue", "tab:orange")[i],
            label=f"{label}: pause {_pause_text(r)}",
        )
        ax.bar_label(bars, labels=["" if v != v else f"{v:.2f}" for v in values], padding=3, fontsize=7.5)
    ax.set_yticks(y, list(frame["step"]), fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(float(np.nanmax(frame.iloc[:, 1:].to_numpy(dtype=float), initial=0.0)), 0.01) * 1.18)
    ax.set_xlabel("ms in this step (linear axis; each run's steps add up to its STOP -> RESUME pause)")
    ax.legend(loc="lower right", fontsize=8)
    same = [first.mode] if first.mode == second.mode else []  # the settings both runs share
    if first.ram_bytes == second.ram_bytes:
        same.append(_human(first.ram_bytes))
    if first.dirty_rate == second.dirty_rate:
        same.append(f"guest writing {_human(first.dirty_rate)}/s" if first.dirty_rate else "idle guest")
    ax.set_title(
        "the pause step by step, QEMU's checkpoints: " + " against ".join(runs) + "\n" + ", ".join(same),
        fontsize=10,
    )
    if not len(frame):
        ax.text(0.5, 0.5, "no run recorded both STOP and RESUME", ha="center", transform=ax.transAxes)
    return fig


def _pause_text(result: Result) -> str:
    events = result.pause_ms.get("events")
    return "n/a" if events is None else f"{events:.2f} ms"
