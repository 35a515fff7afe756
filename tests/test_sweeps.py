"""Sweeps, the pre-copy watch and the reference-data helpers, on real migrations."""

from __future__ import annotations

import pandas as pd
import pytest
from matplotlib.figure import Figure

from labkit.measure.sweeps import (
    model_vs_measured,
    plot_main_bytes,
    plot_reference,
    plot_total,
    reference_files,
    summarize,
    sweep,
    watch_precopy,
)

pytestmark = pytest.mark.timeout(120)


def test_sweep_one_row_per_run_with_the_swept_settings():
    frame = sweep({"mode": ["cpr-transfer", "normal"]}, repeat=1, progress=False, ram="32M", dirty_rate="8M")
    assert list(frame["mode"]) == ["cpr-transfer", "normal"]
    assert (frame["status"] == "completed").all()
    assert (frame["dirty_rate"] == 8 << 20).all() and (frame["ram_bytes"] == 32 << 20).all()
    assert list(frame["seed"]) == [1, 1]
    cpr, normal = frame["bytes_main"]
    assert cpr < 64 * 1024 < normal  # the RAM did not cross the main channel with cpr-transfer
    table = summarize(frame)
    assert list(table["runs"]) == [1, 1]
    assert isinstance(plot_total(frame), Figure)
    assert isinstance(plot_main_bytes(frame), Figure)


def test_sweep_records_non_size_settings_and_model_rows():
    frame = sweep(
        {"dirty_rate": ["0", "16M"]}, progress=False, mode="normal", ram="32M", max_bandwidth="128M", seed=7
    )
    assert list(frame["dirty_rate"]) == [0, 16 << 20] and list(frame["seed"]) == [7, 7]
    rows = model_vs_measured(frame)
    assert list(rows["r"]) == [0.0, 0.12]
    assert rows["model_passes"].notna().all()


def test_watch_precopy_does_not_converge_and_cancel_leaves_the_source_running():
    w = watch_precopy(ram="32M", dirty_rate="256M", max_bandwidth="64M", downtime_limit=50, passes=3)
    assert not w.converged and w.ratio == 4
    last = w.samples.iloc[-1]
    assert last["status"] == "active" and last["dirty_sync_count"] >= 3
    assert last["expected_downtime_ms"] > 50
    assert w.after_cancel == {
        "migration status": "cancelled",
        "source runstate": "running",
        "guest memory verified": True,
    }


def test_watch_precopy_that_converges():
    w = watch_precopy(ram="32M", dirty_rate="4M", max_bandwidth="1G", passes=10)
    assert w.converged and w.after_cancel == {}


def test_reference_files_found_from_a_subfolder(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "reference-emulated.csv").write_text("x\n")
    (tmp_path / "notebooks").mkdir()
    assert reference_files(tmp_path / "notebooks") == [tmp_path / "data" / "reference-emulated.csv"]


def test_plot_reference_reads_bench_summaries_and_per_run_rows():
    bench = pd.DataFrame(
        {
            "backend": ["emulated"] * 4,
            "mode": ["normal", "normal", "cpr-transfer", "cpr-transfer"],
            "ram_bytes": [256 << 20, 1 << 30] * 2,
            "dirty_rate": [0] * 4,
            "pause_ms_events_median": [50.0, 80.0, 3.0, 3.5],
            "pause_ms_events_min": [40.0, 70.0, 2.0, 3.0],
            "pause_ms_events_max": [60.0, 90.0, 4.0, 4.0],
        }
    )
    figs = plot_reference(bench)
    assert len(figs) == 1 and isinstance(figs[0][0], Figure) and "RAM size" in figs[0][1]
    per_run = bench.rename(columns={"pause_ms_events_median": "pause_ms_events"}).drop(columns="backend")
    assert isinstance(plot_reference(per_run)[0][0], Figure)
    fig, why = plot_reference(pd.DataFrame({"a": [1]}))[0]
    assert fig is None and "no column" in why
