"""Figures from Results, Snapshots and results frames. Each function returns a new Figure and touches no
global matplotlib state (no pyplot), so it works the same in a notebook, a widget and a headless test."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from labkit.lab.report import MappingRow, Result

SIDES = ("source", "destination")
# phase bands: every default colour but red, which means "guest paused" in every figure here
PHASE_COLOURS = ("C0", "C1", "C2", "C4", "C5", "C6", "C7", "C8", "C9")
MODE_COLOURS = {"normal": "tab:orange", "cpr-reboot": "tab:green", "cpr-transfer": "tab:blue"}


def _human(n: float) -> str:
    for unit, mult in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= mult:
            return f"{n / mult:.3g} {unit}"
    return f"{int(n)} B"


def conditions(result: Result) -> str:
    """The run's conditions in human units, for titles: "cpr-transfer, 1 GiB, guest writing 256 MiB/s"."""
    guest = f"guest writing {_human(result.dirty_rate)}/s" if result.dirty_rate else "idle guest"
    return f"{result.mode}, {_human(result.ram_bytes)}, {guest}, {result.backend} backend"


def _t0(result: Result) -> float:
    """The first event's time: every time axis counts from it (the timeline's own clock is arbitrary)."""
    return min((r.t_ms for r in result.timeline), default=0.0)


def _pause_window(result: Result) -> tuple[float, float] | None:
    """The guest's pause on the timeline's clock: the source's STOP to the destination's RESUME."""
    stop = next((r.t_ms for r in result.timeline if r.side == "source" and r.kind == "STOP"), None)
    resume = next((r.t_ms for r in result.timeline if r.side == "destination" and r.kind == "RESUME"), None)
    return (stop, resume) if stop is not None and resume is not None and resume >= stop else None


# how each kind of timeline row is drawn: (marker, colour, size, legend text)
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
    stop, resume = _pause_window(result)
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


# -- the sequence diagram ------------------------------------------------------------------------------------
# (side, kind, detail prefix) -> the step it marks; both backends' names (labkit-vm's "labkit-cpr-*" marks,
# QEMU's trace points) map to the same steps, so one diagram reads both. A step the run did not record is
# not drawn.
_STEPS: tuple[tuple[str, str, str, str], ...] = (
    ("source", "qmp", "migrate", "migrate"),
    ("source", "trace", "cpr_state_save", "cpr-save"),
    ("source", "checkpoint", "labkit-cpr-connected", "cpr-connect"),
    ("source", "trace", "cpr_transfer_output", "cpr-connect"),
    ("destination", "checkpoint", "labkit-cpr-accepted", "cpr-accept"),
    ("destination", "trace", "cpr_transfer_input", "cpr-accept"),
    ("source", "checkpoint", "labkit-cpr-fds-sent", "fds"),
    ("destination", "checkpoint", "labkit-cpr-loaded", "fds-in"),
    ("destination", "trace", "cpr_state_load", "fds-in"),
    ("source", "checkpoint", "labkit-cpr-shut-wr", "shut-wr"),
    ("destination", "checkpoint", "labkit-cpr-closed", "hup"),
    ("source", "checkpoint", "labkit-cpr-hup", "hup-in"),
    ("source", "checkpoint", "migration_socket_outgoing_connected", "main-connect"),
    ("destination", "checkpoint", "migration_socket_incoming_accepted", "main-accept"),
    ("source", "MIGRATION_PASS", "", "pass"),
    ("source", "STOP", "", "STOP"),
    ("source", "checkpoint", "src-non-iterable-saved", "device"),
    ("destination", "checkpoint", "dst-precopy-loadvm-completed", "device-in"),
    ("destination", "RESUME", "", "RESUME"),
    ("source", "MIGRATION", "completed", "completed"),
    ("source", "process", "quit", "quit"),
    ("destination", "MIGRATION", "setup", "incoming"),
)
# messages: (sent step, received step, label, channel); notes: (step, label)
_MESSAGES = (
    ("cpr-connect", "cpr-accept", "cpr channel: connect (UNIX socket)", "cpr"),
    ("fds", "fds-in", "cpr state: the RAM fds (SCM_RIGHTS), {cpr}", "cpr"),
    ("shut-wr", None, "SHUT_WR: source half-closes, waits for the hang-up", "cpr"),
    ("hup", "hup-in", "hang-up (HUP): RAM mapped, destination listens on main", "cpr"),
    ("main-connect", "main-accept", "main channel: connect", "main"),
    ("pass", None, "RAM pages", "main"),
    ("device", "device-in", "device state", "main"),
)
_NOTES = {
    "migrate": ("source", "`migrate` (QMP)"),
    "cpr-save": ("source", "cpr_state_save starts"),
    "STOP": ("source", "STOP: vCPUs paused"),
    "RESUME": ("destination", "RESUME: guest runs here"),
    "completed": ("source", "MIGRATION completed (source: postmigrate)"),
    "quit": ("source", "the source process exits"),
    "incoming": ("destination", "MIGRATION setup: incoming starts"),
}
_CHANNEL_COLOURS = {"cpr": "tab:green", "main": "tab:blue"}


def _step_times(result: Result) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {}
    for r in result.timeline:
        for side, kind, prefix, step in _STEPS:
            if r.side == side and r.kind == kind and r.detail.startswith(prefix):
                times.setdefault(step, []).append(r.t_ms)
    return times


def _size_of(result: Result, channel: str) -> str:
    n = (result.bytes or {}).get(channel)
    return "size not measured on this backend" if n is None else _human(n)


def _unrecorded_steps(result: Result, at: dict[str, list[float]]) -> str:
    """The cpr channel's steps a cpr-transfer run has no mark for (QEMU has no trace point at SHUT_WR or at
    the hang-up), named so that a reader knows the gap is in the record, not in the protocol."""
    if result.mode != "cpr-transfer":
        return ""
    names = {"shut-wr": "SHUT_WR", "hup": "the hang-up (HUP)", "fds": "the send of the fds"}
    gone = [text for step, text in names.items() if step not in at and not (step == "hup" and "hup-in" in at)]
    if not gone:
        return ""
    why = " (QEMU has no trace point there)" if result.backend == "qemu" else ""
    return ", ".join(gone) + why


def _message_label(result: Result, step: str, label: str, at: dict[str, list[float]]) -> str | None:
    """A message's label for this run's mode, with its sizes; None when the mode sends no such message."""
    stop = at.get("STOP", [None])[0]
    passes = at.get("pass", [])
    running = [t for t in passes if stop is None or t < stop]  # passes that began before the guest paused
    if step == "pass":
        if result.mode == "cpr-transfer" or not passes:
            return None
        if result.mode == "cpr-reboot":
            return f"RAM pages into the file, {len(passes)} pass(es), guest already paused"
        if not running:
            return None
        return (
            f"RAM pages, pre-copy pass(es) 1-{len(running)}, guest running; main channel in all: "
            + _size_of(result, "main")
        )
    if step == "device":
        if result.mode == "cpr-reboot":
            return "device state via the file: the source writes it, a new process reads it"
        if result.mode == "cpr-transfer":
            return f"device state; main channel in all: {_size_of(result, 'main')}"
        last = len(passes) - len(running)
        return f"stop-and-copy: the last dirty pages ({last} pass(es)) and device state"
    return label.format(cpr=_size_of(result, "cpr"), main=_size_of(result, "main"))


def plot_sequence(result: Result) -> Figure:
    """A sequence diagram of this run, from its recorded timeline: source and destination as lifelines, a
    row per message on the cpr and main channels (arrows) and per STOP/RESUME (notes), in the order they
    happened, with each one's time (ms since the first event). Steps the backend did not record are left out,
    never drawn from what they should have been."""
    t0 = _t0(result)
    at = _step_times(result)
    rows: list[tuple[float, str, object]] = []  # (time, kind, payload)
    for sent, got, label, channel in _MESSAGES:
        t_sent = at[sent][0] if sent in at else None
        t_got = at[got][0] if got is not None and got in at else None
        label = _message_label(result, sent, label, at)
        if (t_sent is None and t_got is None) or label is None:
            continue
        rows.append((t_sent if t_sent is not None else t_got, "message", (t_sent, t_got, label, channel)))
    for step, (side, label) in _NOTES.items():
        if step in at:
            rows.append((at[step][0], "note", (side, label)))
    rows.sort(key=lambda row: row[0])
    n = len(rows)
    fig = Figure(figsize=(10, 1.6 + 0.42 * max(n, 3)), layout="constrained")
    ax = fig.add_subplot()
    x_src, x_dst = 0.0, 1.0
    # a lifeline ends where its process exits (cpr-reboot's source quits before the new process starts)
    quit_row = next(
        (i for i, r in enumerate(rows) if r[1] == "note" and r[2][1].startswith("the source process")), None
    )
    ax.plot([x_src, x_src], [-0.6, n - 0.4 if quit_row is None else quit_row], color="0.35", linewidth=1.5)
    ax.plot([x_dst, x_dst], [-0.6, n - 0.4], color="0.35", linewidth=1.5)
    pause = _pause_window(result)
    stop_row = next((i for i, r in enumerate(rows) if r[1] == "note" and r[2][1].startswith("STOP")), None)
    resume_row = next(
        (i for i, r in enumerate(rows) if r[1] == "note" and r[2][1].startswith("RESUME")), None
    )
    handles = []
    if pause is not None and stop_row is not None and resume_row is not None:
        ax.axhspan(stop_row - 0.45, resume_row + 0.45, color="red", alpha=0.12)
        handles.append(Patch(color="red", alpha=0.12, label=f"guest paused: {pause[1] - pause[0]:.2f} ms"))
    used_channels = set()
    for i, (t, kind, payload) in enumerate(rows):
        ax.text(-0.42, i, f"{t - t0:.2f}", ha="right", va="center", fontsize=8, family="monospace")
        if i:
            ax.text(
                -0.2,
                i,
                f"+{t - rows[i - 1][0]:.2f}",
                ha="right",
                va="center",
                fontsize=8,
                family="monospace",
                color="0.35",
            )
        if kind == "message":
            t_sent, t_got, label, channel = payload
            colour = _CHANNEL_COLOURS[channel]
            used_channels.add(channel)
            if t_got is None and label.startswith("SHUT_WR"):  # EOF reaches the reader: no receive mark
                ax.annotate(
                    "",
                    (x_dst - 0.02, i),
                    (x_src, i),
                    arrowprops={"arrowstyle": "-|>", "color": colour, "linestyle": "--"},
                )
            else:
                back = label.startswith("hang-up")
                a, b = (x_dst, x_src) if back else (x_src, x_dst)
                ax.annotate("", (b, i), (a, i), arrowprops={"arrowstyle": "-|>", "color": colour, "lw": 1.6})
            if t_sent is not None and t_got is not None and abs(t_got - t_sent) >= 0.01:
                label += f" (in at {t_got - t0:.2f})"
            ax.text(0.5, i - 0.08, label, ha="center", va="bottom", fontsize=8, color=colour)
        else:
            side, label = payload
            x, ha, dx = (x_src, "left", 0.02) if side == "source" else (x_dst, "right", -0.02)
            marker = "v" if label.startswith("STOP") else "^" if label.startswith("RESUME") else "s"
            ax.plot(x, i, marker=marker, color="black", markersize=7)
            ax.text(
                x + dx,
                i,
                label,
                ha=ha,
                va="center",
                fontsize=8,
                bbox={"boxstyle": "round,pad=0.2", "facecolor": "lightyellow", "edgecolor": "0.6"},
            )
    for channel in sorted(used_channels):
        main = (
            "migration stream (into a file)"
            if result.mode == "cpr-reboot"
            else "main channel (migration stream)"
        )
        text = {"cpr": "cpr channel (UNIX socket: fds, then hang-up)", "main": main}
        handles.append(Line2D([], [], color=_CHANNEL_COLOURS[channel], label=text[channel]))
    handles.append(Line2D([], [], marker="s", color="black", linestyle="", label="QMP command or event"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 3), fontsize=8)
    missing = _unrecorded_steps(result, at)
    if missing:
        ax.text(
            0.5,
            n - 0.1,
            f"not recorded by this run, so not drawn: {missing}",
            ha="center",
            va="top",
            fontsize=7.5,
            color="0.35",
            wrap=True,
        )
    ax.set_xlim(-0.65, 1.2)
    ax.set_ylim(n + (0.5 if missing else -0.4), -1.2)
    ax.text(-0.42, -0.9, "ms since\nfirst event", ha="right", va="center", fontsize=8)
    ax.text(-0.2, -0.9, "ms since\nthe row above", ha="right", va="center", fontsize=8, color="0.35")
    pids = result.pids or {}
    for x, side in ((x_src, "source"), (x_dst, "destination")):
        pid = pids.get(side)
        ax.text(
            x,
            -0.9,
            f"{side}" + (f" (pid {pid})" if pid else ""),
            ha="center",
            va="center",
            fontsize=9,
            weight="bold",
        )
    ax.axis("off")
    ax.set_title(f"sequence: {conditions(result)}")
    return fig


def plot_address_space(mappings: Iterable[MappingRow], title: str = "guest RAM in each process") -> Figure:
    """Each RAM block at its virtual address in source and destination, coloured by inode (the memory file);
    the blocks sit in the same order on both sides, and a line joins a block whose inode is the same in the
    two processes (cpr-transfer: the same memory at a new address). A caption states what the figure shows."""
    rows = list(mappings)
    fig = Figure(figsize=(9, 5), layout="constrained")
    ax = fig.add_subplot()
    inodes = sorted({r.inode for r in rows})
    palette = (
        [f"C{i}" for i in range(10)]
        if len(inodes) <= 10
        else [matplotlib.colormaps["tab20"](i) for i in range(20)]
    )
    colour = {
        ino: palette[i % len(palette)] for i, ino in enumerate(inodes)
    }  # one colour per inode, if <= 20
    centre: dict[tuple[str, str], tuple[float, float, int]] = {}
    x_of = {"source": 0.0, "destination": 2.0}
    # one order for both sides: the source's address order (the destination's own may differ), so a line
    # joining a block to itself never crosses another
    order: list[str] = []
    for side in SIDES:
        order += [
            r.block
            for r in sorted((r for r in rows if r.side == side), key=lambda r: r.start)
            if r.block not in order
        ]
    for side in SIDES:
        by_block = {r.block: r for r in rows if r.side == side}
        # addresses are far apart: stack blocks in one order with heights by log size, labelled with their
        # real addresses, so a 4 KiB ROM and a 1 GiB RAM block are both visible
        y = 0.0
        for block in order:
            r = by_block.get(block)
            h = max(2.6, np.log2(max(r.size if r else 4096, 4096)) - 11)
            if r is not None:
                ax.add_patch(
                    Rectangle(
                        (x_of[side], y), 1.0, h, facecolor=colour[r.inode], edgecolor="black", alpha=0.75
                    )
                )
                if h >= 3:  # room for three lines
                    label = f"{r.block}\n{r.start:#x}\n{_human(r.size)}, inode {r.inode}"
                else:
                    label = f"{r.block}  {_human(r.size)}\n{r.start:#x}  inode {r.inode}"
                ax.text(x_of[side] + 0.5, y + h / 2, label, ha="center", va="center", fontsize=7)
                centre[(side, block)] = (x_of[side], y + h / 2, r.inode)
            y += h + 0.3
        ax.text(x_of[side] + 0.5, -0.6, side, ha="center", va="top", fontsize=10, weight="bold")
    shared = 0
    for block in order:
        src, dst = centre.get(("source", block)), centre.get(("destination", block))
        if src and dst and src[2] == dst[2]:
            shared += 1
            ax.plot([1.0, 2.0], [src[1], dst[1]], color=colour[src[2]], linewidth=2)
    ax.set_xlim(-0.2, 3.2)
    ax.set_ylim(-1.5, max([v[1] for v in centre.values()] + [1]) + 3)
    ax.axis("off")
    ax.set_title(
        f"{title}\n{shared} of {len(order)} block(s) share an inode across the two processes", fontsize=11
    )
    if shared:
        point = (
            "A line joins a block to itself: the same inode on both sides is the same memory, mapped by "
            "the new process at a new address."
        )
    else:
        point = "No line: no block shares an inode; the destination's RAM is new memory, the pages copied in."
    fig.text(
        0.5,
        0.01,
        f"{point}\nColour = inode (one colour per memory file); blocks in the same order on "
        "both sides; height grows with the log of the size.",
        ha="center",
        va="bottom",
        fontsize=8.5,
        wrap=True,
    )
    fig.get_layout_engine().set(h_pad=0.1, rect=(0, 0.08, 1, 0.92))
    return fig


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
