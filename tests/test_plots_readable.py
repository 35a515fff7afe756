"""Every plot kind, drawn from real migrations, is readable: no two pieces of text overlap, none leaves the
figure or is clipped by its axes, timeline lanes are never empty, bars are on linear axes, and titles differ.

matplotlib's renderer lays the text out (fig.canvas.draw()); each visible Text's window extent is then
compared with every other's and with the figure's (or its clip box's) bounds.
"""

from __future__ import annotations

from itertools import combinations

import matplotlib
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.container import BarContainer
from matplotlib.text import Text

from labkit.host.runners.qemu import qemu_missing
from labkit.lab.engine import migrate
from labkit.lab.report import concat
from labkit.measure import plots
from labkit.measure.pause_breakdown import plot_results
from labkit.measure.progress import plot_progress
from labkit.measure.sweeps import headline_sweep, plot_headline, plot_main_bytes, plot_total

matplotlib.use("Agg")
pytestmark = pytest.mark.timeout(600)
MODES = ("cpr-transfer", "normal", "cpr-reboot")
SLACK_PX = 1.0  # a box may touch its neighbour by a pixel (antialiasing), not overlap it


def _shown_ticks(axis) -> set[int]:
    """ids of the tick labels the renderer actually draws: ticks inside the view interval."""
    lo, hi = sorted(axis.get_view_interval())
    eps = (hi - lo) * 1e-9
    return {
        id(label)
        for tick in axis.get_major_ticks() + axis.get_minor_ticks()
        if lo - eps <= tick.get_loc() <= hi + eps
        for label in (tick.label1, tick.label2)
    }


def text_problems(fig) -> list[str]:
    """What a reader would trip over: text boxes that overlap, or text outside the figure or its clip box."""
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    tick_ids: set[int] = set()
    all_tick_ids: set[int] = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            if ax.axison and axis.get_visible():  # ax.axis("off") hides the ticks, not their Text objects
                tick_ids |= _shown_ticks(axis)
            all_tick_ids |= {
                id(t)
                for tick in axis.get_major_ticks() + axis.get_minor_ticks()
                for t in (tick.label1, tick.label2)
            }
    texts = []
    for t in fig.findobj(Text):
        if not t.get_visible() or not t.get_text().strip():
            continue
        if id(t) in all_tick_ids and id(t) not in tick_ids:
            continue
        if t.axes is not None and not t.axes.get_visible():
            continue
        texts.append((t, t.get_window_extent(renderer)))
    problems = []
    page = fig.bbox
    for t, box in texts:
        if (
            box.x0 < page.x0 - SLACK_PX
            or box.y0 < page.y0 - SLACK_PX
            or box.x1 > page.x1 + SLACK_PX
            or (box.y1 > page.y1 + SLACK_PX)
        ):
            problems.append(f"leaves the figure: {t.get_text()!r}")
        clip = t.get_clip_box() if t.get_clip_on() else None
        if clip is not None and (
            box.x0 < clip.x0 - SLACK_PX
            or box.x1 > clip.x1 + SLACK_PX
            or box.y0 < clip.y0 - SLACK_PX
            or box.y1 > clip.y1 + SLACK_PX
        ):
            problems.append(f"clipped by its axes: {t.get_text()!r}")
    for (a, ba), (b, bb) in combinations(texts, 2):
        w = min(ba.x1, bb.x1) - max(ba.x0, bb.x0)
        h = min(ba.y1, bb.y1) - max(ba.y0, bb.y0)
        if w > SLACK_PX and h > SLACK_PX:
            problems.append(f"overlap: {a.get_text()!r} and {b.get_text()!r}")
    return problems


def assert_readable(fig, name: str, tmp_path) -> None:
    fig.savefig(tmp_path / f"{name}.png", dpi=100)  # on failure, look at it
    problems = text_problems(fig)
    assert not problems, f"{name}: " + "; ".join(problems[:12])
    for ax in fig.axes:  # a log axis makes a bar's length meaningless
        bars = any(isinstance(c, BarContainer) for c in ax.containers)
        assert not (bars and "log" in (ax.get_yscale(), ax.get_xscale())), f"{name}: bars on a log axis"


def assert_lanes_used(fig, name: str) -> None:
    """Every labelled lane of a timeline-like panel has something drawn on it."""
    for ax in fig.axes:
        labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
        if not ax.axison or not labels or any(lb.lstrip("−-").replace(".", "").isdigit() for lb in labels):
            continue  # lanes are named; a numeric axis has no lanes
        ys = {round(float(y), 3) for y in ax.get_yticks()}
        used = set()
        for line in ax.lines:
            for y in line.get_ydata():
                used.add(round(float(y), 3))
        for coll in ax.collections:
            for _, y in coll.get_offsets():
                used.add(round(float(y), 3))
        assert ys <= used, f"{name}: empty lane(s) {sorted(ys - used)} in {labels}"


def _title(fig) -> str:
    """The figure's own title: its suptitle where it has one (plot_headline), else its first axes' title."""
    sup = getattr(fig, "_suptitle", None)
    if sup is not None and sup.get_text():
        return sup.get_text()
    return next(ax.get_title() for ax in fig.axes if ax.get_title())


@pytest.fixture(scope="module")
def emulated_results():
    return {m: migrate(mode=m, ram="48M", dirty_rate="16M", max_bandwidth="1G") for m in MODES}


def render_all(results, tmp_path, prefix: str) -> list[str]:
    """Draw every plot kind; return the titles, so a test can check they differ."""
    titles = []
    for mode, r in results.items():
        assert r.status == "completed", r.error
        for kind, fig in (
            ("timeline", plots.plot_timeline(r)),
            ("sequence", plots.plot_sequence(r)),
            ("address-space", plots.plot_address_space(r.mappings, f"guest RAM: {plots.conditions(r)}")),
            ("passes", plots.plot_passes(r)),
        ):
            name = f"{prefix}-{kind}-{mode}"
            assert_readable(fig, name, tmp_path)
            if kind == "timeline":
                assert_lanes_used(fig, name)
            titles.append(_title(fig))
    frame = concat(list(results.values()))
    headline = frame[frame["mode"].isin(("normal", "cpr-transfer"))]
    for name, fig in (
        ("pause", plots.plot_pause(frame)),
        ("pause-guest", plots.plot_pause(frame, y="pause_ms_guest")),
        ("precopy-model", plots.plot_precopy_model(64 << 20, 128 << 20, [0, 32 << 20, 64 << 20, 200 << 20])),
        ("pause-breakdown", plot_results(list(results.values()))),
        ("total", plot_total(frame)),
        ("main-bytes", plot_main_bytes(frame)),
        ("headline", plot_headline(headline)),
        ("backends", plots.plot_backends(results["cpr-transfer"], results["normal"])),
        ("progress", plot_progress(results["cpr-transfer"], results["normal"])),
    ):
        assert_readable(fig, f"{prefix}-{name}", tmp_path)
        titles.append(_title(fig))
    return titles


def test_every_plot_kind_is_readable_emulated(emulated_results, tmp_path):
    titles = render_all(emulated_results, tmp_path, "emulated")
    assert len(titles) == len(set(titles)), f"titles repeat: {sorted(titles)}"
    assert not any(" B)" in t or "4294967296" in t for t in titles)


def test_headline_of_a_real_sweep_is_readable(tmp_path):
    """plot_headline as notebook 04 and `labkit demo` draw it: a headline sweep (two small sizes), whose title
    carries the guest's hot set, the bandwidth and the downtime limit."""
    frame = headline_sweep(("32M", "48M"), progress=False)
    assert (frame["status"] == "completed").all()
    fig = plot_headline(frame)
    assert "max-bandwidth" in _title(fig)
    assert_readable(fig, "emulated-headline-sweep", tmp_path)


def test_backends_figure_draws_each_run_s_steps_summing_to_its_pause(emulated_results, tmp_path):
    """plot_backends' bars are the runs' own checkpoint steps: each run's bars add up to its STOP -> RESUME."""
    a, b = emulated_results["cpr-transfer"], emulated_results["normal"]
    fig = plots.plot_backends(a, b)
    ax = fig.axes[0]
    for container, r in zip(ax.containers, (a, b), strict=True):
        total = sum(bar.get_width() for bar in container)
        assert total == pytest.approx(r.pause_ms["events"], abs=0.01), r.mode
    assert_readable(fig, "emulated-backends", tmp_path)


def test_times_start_at_zero_and_sequence_draws_the_real_channels(emulated_results):
    r = emulated_results["cpr-transfer"]
    fig = plots.plot_timeline(r)
    assert fig.axes[0].get_xlim()[0] <= 0 < fig.axes[0].get_xlim()[1]
    assert "since the first event" in fig.axes[0].get_xlabel()
    seq = plots.plot_sequence(r)
    words = " ".join(t.get_text() for t in seq.findobj(Text))
    for needed in ("cpr", "fds", "SHUT_WR", "hang-up", "main", "device state", "STOP", "RESUME"):
        assert needed in words, needed


def test_overlap_check_can_fail():
    """The checker itself: two labels at one spot overlap, a label past the edge leaves the figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3, 2))
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, "STOP")
    ax.text(0.5, 0.5, "active")
    ax.text(1.5, 0.5, "far away", transform=ax.transAxes)
    problems = text_problems(fig)
    assert any("overlap" in p for p in problems) and any("leaves" in p for p in problems)


@pytest.mark.qemu
@pytest.mark.skipif(qemu_missing() is not None, reason=f"{qemu_missing()}")
def test_every_plot_kind_is_readable_qemu(emulated_results, tmp_path):
    results = {
        m: migrate(backend="qemu", mode=m, ram="64M", dirty_rate="16M", max_bandwidth="1G") for m in MODES
    }
    render_all(results, tmp_path, "qemu")
    # the figure that compares the backends, as notebook 03 draws it
    fig = plots.plot_backends(emulated_results["cpr-transfer"], results["cpr-transfer"])
    assert "emulated backend against qemu backend" in _title(fig)
    assert_readable(fig, "both-backends", tmp_path)
