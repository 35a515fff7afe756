"""Lab: stepping through each mode, Snapshots at every phase, the timeline, Results as frames, plots, demo."""

from __future__ import annotations

import os
import subprocess
import sys

import matplotlib
import pytest

from labkit.lab.engine import PHASES, Lab, LabError, migrate
from labkit.lab.report import concat, read_csv
from labkit.measure import plots

matplotlib.use("Agg")
pytestmark = pytest.mark.timeout(120)
ROOT = os.geteuid() == 0


def ram0(snap, side):
    return next((m for m in snap.mappings if m.side == side and m.block == "ram0"), None)


def test_cpr_transfer_step_by_step_shows_fds_in_flight_then_the_same_inode():
    with Lab(mode="cpr-transfer", ram="64M", dirty_rate="16M") as lab:
        assert lab.phases == PHASES["cpr-transfer"]
        snaps = [lab.step() for _ in lab.phases]
        with pytest.raises(StopIteration):
            lab.step()
        r = lab.run()  # nothing left to run: just the result
    s = {snap.phase: snap for snap in snaps}
    waiting = s["destination waiting on the cpr channel"]
    assert waiting.states["destination"] == "(no monitor yet)" and not waiting.fds.get("destination")
    in_flight = s["cpr state sent (fds in flight)"]
    assert in_flight.states == {"source": "running", "destination": "(no monitor yet)"}
    assert in_flight.migration["source"]["status"] == "setup" and in_flight.bytes["cpr"] > 0
    assert not in_flight.fds.get("destination")  # sent, not yet received: in the socket, in flight
    mapped = s["destination mapped guest RAM, listening on main"]
    assert mapped.states == {"source": "running", "destination": "inmigrate"}
    src, dst = ram0(mapped, "source"), ram0(mapped, "destination")
    assert src.inode == dst.inode and src.start != dst.start
    assert {f["inode"] for f in mapped.fds["source"]} == {f["inode"] for f in mapped.fds["destination"]}
    stopped = s["main channel connected, source stopped"]
    assert stopped.states["source"] == "finish-migrate" and stopped.bytes["main"] == 0
    sent = s["device state sent"]
    assert (
        sent.states == {"source": "postmigrate", "destination": "inmigrate"}
        and 0 < sent.bytes["main"] < 65536
    )
    done = s["destination running, source in postmigrate"]
    assert done.states == {"source": "postmigrate", "destination": "running"}
    assert r.status == "completed" and r.guest_verified


def test_normal_step_by_step_and_frames_differ():
    with Lab(mode="normal", ram="64M", dirty_rate="16M") as lab:
        snaps = [lab.step() for _ in lab.phases]
        r = lab.run()
    by = {snap.phase: snap for snap in snaps}
    precopy = by["pre-copy passes"]
    assert precopy.states["source"] == "running" and precopy.migration["source"]["status"] == "active"
    assert precopy.bytes["main"] > 0
    assert by["stop and copy"].states == {"source": "postmigrate", "destination": "inmigrate"}
    end = by["destination running, source in postmigrate"]
    src, dst = ram0(end, "source"), ram0(end, "destination")
    assert src.inode != dst.inode
    if ROOT:
        both = [(a, b) for a, b in zip(src.frames, dst.frames, strict=True) if a and b]
        assert both and all(a != b for a, b in both)
    assert r.status == "completed" and r.guest_verified


def test_cpr_reboot_steps():
    with Lab(mode="cpr-reboot", ram="64M") as lab:
        snaps = [lab.step() for _ in lab.phases]
        r = lab.run()
    assert snaps[1].states["source"] == "postmigrate"
    assert snaps[2].states["source"] == "(exited)"
    assert snaps[3].states["destination"] == "inmigrate"
    assert snaps[4].states["destination"] == "running"
    assert r.status == "completed" and r.guest_verified


def test_run_without_stepping_holds_nowhere():
    with Lab(mode="cpr-transfer", ram="64M") as lab:
        r = lab.run()
        assert lab.src.cmd("x-labkit-hold") == {"points": [], "held-at": None}
        assert lab.dst.cmd("x-labkit-hold") == {"points": [], "held-at": None}
    assert r.status == "completed"


def test_result_timeline_pause_and_frames():
    with Lab(mode="cpr-transfer", ram="64M", dirty_rate="16M") as lab:
        r = lab.run()
    tl = r.timeline_frame()
    assert list(tl.columns) == ["t_ms", "side", "kind", "detail"]
    assert tl["t_ms"].is_monotonic_increasing
    stop = tl[(tl.side == "source") & (tl.kind == "STOP")].t_ms.iloc[0]
    resume = tl[(tl.side == "destination") & (tl.kind == "RESUME")].t_ms.iloc[0]
    assert stop < resume
    assert set(tl.side) >= {"source", "destination", "lab"}
    durations = r.phase_durations()
    assert list(durations.phase) == PHASES["cpr-transfer"] and (durations.duration_ms >= 0).all()
    for how in ("reported", "events", "guest"):
        assert r.pause_ms[how] is not None and r.pause_ms[how] >= 0
    # the guest's longest heartbeat gap spans the pause it lived through, within its own tick
    assert r.pause_ms["guest"] + 2.0 >= r.pause_ms["events"] * 0.5
    row = r.to_frame()
    for col in (
        "backend",
        "mode",
        "ram_bytes",
        "status",
        "pause_ms_reported",
        "pause_ms_events",
        "pause_ms_guest",
        "bytes_main",
        "bytes_cpr",
        "total_ms",
        "passes",
        "guest_verified",
    ):
        assert col in row.columns
    assert len(row) == 1 and row.bytes_main[0] == r.bytes["main"]


def test_results_csv_round_trip(tmp_path):
    rs = [migrate(mode=m, ram="32M") for m in ("cpr-transfer", "normal")]
    frame = concat(rs)
    path = tmp_path / "r.csv"
    frame.to_csv(path, index=False)
    back = read_csv(path)
    assert list(back.columns) == list(frame.columns) and back.pause_ms_events[0] == pytest.approx(
        frame.pause_ms_events[0]
    )


def test_plots_render_with_expected_artists(tmp_path):
    with Lab(mode="normal", ram="32M", dirty_rate="16M") as lab:
        r = lab.run()
    fig = plots.plot_timeline(r)
    ax = fig.axes[0]
    assert "timeline" in ax.get_title() and ax.get_xlabel().startswith("time (ms")
    legends = [a.get_legend() for a in fig.axes if a.get_legend() is not None]
    assert any("paused" in t.get_text() for lg in legends for t in lg.get_texts())
    fig = plots.plot_address_space(r.mappings)
    assert len(fig.axes[0].patches) == len(r.mappings)
    fig = plots.plot_passes(r)
    assert len(fig.axes[0].patches) == len(r.pages_per_pass)
    frame = concat([r])
    fig = plots.plot_pause(frame)
    assert fig.axes[0].get_legend() is not None
    fig = plots.plot_precopy_model(64 << 20, 128 << 20, [0, 32 << 20, 64 << 20, 200 << 20])
    assert len(fig.axes[0].lines) >= 2
    fig.savefig(tmp_path / "x.png")
    assert (tmp_path / "x.png").stat().st_size > 1000


def test_precopy_model():
    sent, total, down, ok = plots.precopy_model(1 << 30, 1 << 30, 256 << 20, 0.3)
    assert ok and sent[1] == pytest.approx(sent[0] / 4)
    assert not plots.precopy_model(1 << 30, 1 << 30, 2 << 30, 0.3)[3]


def test_bad_mode_is_refused():
    with pytest.raises(LabError):
        Lab(mode="cpr-bogus")


def test_labkit_demo_writes_figures(tmp_path):
    out = tmp_path / "demo"
    p = subprocess.run(
        [sys.executable, "-m", "labkit.cli.main", "demo", "--ram", "64M", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "cpr-transfer" in p.stdout and "normal" in p.stdout and "verified" in p.stdout
    pngs = list(out.glob("*.png"))
    assert len(pngs) >= 4 and (out / "results.csv").exists()
