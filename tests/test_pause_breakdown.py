"""The three CPR modes' pauses cut at every checkpoint: contiguous pieces, the new process's start-up on the
right side of STOP for each mode, frames that round-trip through CSV, and the figure drawn from them."""

from __future__ import annotations

import pytest

from labkit.measure import pause_breakdown as pb

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def results():
    return pb.sweep(rams=("32M",), prefill=False)


def test_each_pause_is_cut_into_contiguous_pieces(results):
    assert [r.mode for r in results] == list(pb.CPR_MODES)
    for r in results:
        assert r.status == "completed" and r.guest_verified, (r.mode, r.error)
        segs = pb.pause_segments(r)
        assert segs[0].frm == "STOP" and segs[-1].to == "RESUME"
        for a, b in zip(segs, segs[1:], strict=False):
            assert a.to == b.frm and a.start_ms + a.duration_ms == pytest.approx(b.start_ms, abs=0.01)
        assert sum(s.duration_ms for s in segs) == pytest.approx(r.pause_ms["events"], abs=0.05)


def test_new_process_start_up_falls_where_each_design_puts_it(results):
    by_mode = {r.mode: r for r in results}
    transfer = pb.new_process_window(by_mode["cpr-transfer"])
    assert transfer[1] < 0  # started and mapped RAM before the guest stopped
    for mode in ("cpr-exec", "cpr-reboot"):
        start, end = pb.new_process_window(by_mode[mode])
        assert 0 < start < end < by_mode[mode].pause_ms["events"], mode
    summary = pb.summary_frame(results).set_index("mode")
    assert summary.loc["cpr-transfer", "start_up_inside_pause_ms"] == 0
    assert summary.loc["cpr-exec", "start_up_inside_pause_ms"] > 0
    assert summary.same_pid.to_dict() == {"cpr-reboot": False, "cpr-transfer": False, "cpr-exec": True}
    exec_names = [s.to for s in pb.pause_segments(by_mode["cpr-exec"])]
    assert exec_names.index("cpr-exec") < exec_names.index("dst-exec-entered")


def test_frames_round_trip_and_draw(results, tmp_path):
    paths = pb.write_frames(results, str(tmp_path / "pb"), "pytest")
    assert open(paths[0]).readline() == "# pytest\n"
    segments, summary = pb.read_frames(str(tmp_path / "pb"))
    assert len(segments) == len(pb.breakdown_frame(results)) and len(summary) == 3
    fig = pb.plot_pause_breakdown(segments, summary, pb.huge_pages_note())
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"{m}, 32.0 MiB" for m in pb.CPR_MODES]
    assert len(ax.patches) >= len(segments) + 3  # every piece, and one start-up bar per migration
    assert "new process start-up" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_reference_sweep_is_stored_with_three_sizes():
    segments, summary = pb.read_frames(pb.reference_prefix())
    assert set(summary["mode"]) == set(pb.CPR_MODES) and summary.ram_bytes.nunique() >= 3
    assert (summary.status == "completed").all()
    grows = pb.grows_with_ram(summary.assign(pause_ms=summary.pause_ms - summary.start_up_inside_pause_ms))
    assert grows["cpr-reboot"] and not grows["cpr-transfer"]
