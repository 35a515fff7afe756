"""The sequence diagram of one migration: the two QEMU processes as lifelines, the cpr and main channels'
messages between them, on the run's own clock, from either backend's records (labkit-vm's marks or QEMU's
trace points)."""

from __future__ import annotations

from typing import Any

from matplotlib.artist import Artist
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from labkit.lab.report import Result
from labkit.measure.plot_style import (
    _human,
    _pause_window,
    _t0,
    conditions,
)

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
    # a run recorded through QEMU's own trace points has none at these steps (labkit-vm marks every one)
    traced = any(r.kind == "trace" for r in result.timeline)
    why = " (QEMU has no trace point there)" if traced else ""
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
    rows: list[tuple[float, str, Any]] = []  # (time, kind, payload)
    for sent, got, template, channel in _MESSAGES:
        t_sent = at[sent][0] if sent in at else None
        t_got = at[got][0] if got is not None and got in at else None
        first = t_sent if t_sent is not None else t_got
        label = _message_label(result, sent, template, at)
        if first is None or label is None:
            continue
        rows.append((first, "message", (t_sent, t_got, label, channel)))
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
    handles: list[Artist] = []
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
