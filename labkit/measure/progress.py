"""plot_progress: the guest's own write rate across a migration, with the lab's phases and the pause.

guestperf's view of migration (the guest's progress over time) for the lab's runs: pre-copy slows the guest
while its pages are tracked and copied, before the pause; cpr-transfer barely touches it before, and makes it
pay page faults after RESUME instead. Several runs are drawn one above the other, each on its own clock with
0 at its STOP, so their pauses line up. A Figure, no pyplot (see labkit.measure.plots).
"""

from __future__ import annotations

from matplotlib.artist import Artist
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from labkit.lab.report import Result
from labkit.measure.plots import _draw_phases, _pause_window, conditions

SIDE_COLOURS = {"source": "tab:blue", "destination": "tab:green"}
BEFORE_MS = 100.0  # how much of the guest's steady state to show before `migrate`


def rate_unit(peak: float) -> tuple[str, float]:
    """A human unit for rates up to `peak` bytes/s: ("MiB/s", 2**20) or ("GiB/s", 2**30)."""
    return ("GiB/s", float(1 << 30)) if peak >= 2 << 30 else ("MiB/s", float(1 << 20))


def _migrate_ms(result: Result) -> float | None:
    return next((r.t_ms for r in result.timeline if r.kind == "qmp" and r.detail == "migrate"), None)


def _post_text(result: Result, unit: tuple[str, float]) -> str:
    p = result.post_resume or {}
    if not p.get("steady_bytes_per_s"):
        return p.get("note") or "nothing measured after RESUME"
    rec = p.get("recover_ms")
    rec_text = f"back to 90 % after {rec:.0f} ms" if rec is not None else "not back to 90 % in the window"
    lost = p.get("lost_ms")
    pre = p.get("precopy_lost_ms")
    return (
        f"after RESUME: {rec_text}, {lost:.0f} ms lost in {p.get('window_ms'):.0f} ms, "
        f"{p.get('pages_faulted')} page faults"
        + (f"; before STOP: {pre:.0f} ms lost" if pre is not None else "")
    )


def plot_progress(*results: Result, before_ms: float = BEFORE_MS) -> Figure:
    """The guest's write rate (5 ms windows) across each run: the source's RAM until RESUME, the
    destination's after, the lab's phases as bands, the pause (STOP to RESUME) in red and the guest's steady
    rate dashed. Pass two Results (a cpr-transfer and a normal run) to compare them one above the other."""
    if not results:
        raise ValueError("plot_progress needs at least one Result")
    fig = Figure(figsize=(11, 3.6 * len(results) + 0.6), layout="constrained")
    axes = fig.subplots(len(results), 1, squeeze=False)[:, 0]
    peak = max((r.bytes_per_s or 0.0 for res in results for r in res.progress), default=0.0)
    unit = rate_unit(peak)
    for ax, res in zip(axes, results, strict=True):
        pause = _pause_window(res)
        zero = pause[0] if pause else _migrate_ms(res) or 0.0
        start = (_migrate_ms(res) or zero) - zero - before_ms
        end = max((r.t_ms for r in res.progress), default=zero + 1.0) - zero
        phases = [h for h in _draw_phases(ax, res, zero, end)]
        for band in ax.patches:
            band.set_alpha(0.12)
        for side, colour in SIDE_COLOURS.items():
            pts = [(r.t_ms - zero, r.bytes_per_s) for r in res.progress if r.side == side]
            ax.plot(
                [t for t, v in pts if v is not None],
                [v / unit[1] for t, v in pts if v is not None],
                color=colour,
                linewidth=0.8,
            )
        handles: list[Artist] = [
            Line2D([], [], color=c, linewidth=1.5, label=f"read from the {s}'s RAM")
            for s, c in SIDE_COLOURS.items()
        ]
        steady = (res.post_resume or {}).get("steady_bytes_per_s")
        if steady:
            ax.axhline(steady / unit[1], color="black", linestyle="--", linewidth=1)
            handles.append(
                Line2D([], [], color="black", linestyle="--", label="steady rate (the source alone)")
            )
        if pause:
            ax.axvspan(0.0, pause[1] - pause[0], color="red", alpha=0.35, linewidth=0)
            handles.append(
                Patch(color="red", alpha=0.35, label=f"pause, STOP to RESUME ({pause[1] - pause[0]:.1f} ms)")
            )
        ax.set_xlim(start, end)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("time (ms from the source's STOP)")
        ax.set_ylabel(f"guest writes ({unit[0]})")
        ax.set_title(f"guest progress: {conditions(res)}\n{_post_text(res, unit)}", fontsize=9)
        ax.legend(
            handles=handles + phases,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            fontsize=7,
            title="lines, pause and phases",
            title_fontsize=7,
        )
    return fig
