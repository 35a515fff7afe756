"""`labkit bench`'s pure parts, on rows whose answer is worked out by hand: the per-cell summary (median, min
and max over completed runs only), the ratios against their targets, and the report and CSV a reader gets.
The measuring parts (ceilings, the VM, the matrix) run real processes and live in `labkit bench` itself."""

from __future__ import annotations

import io

import pandas as pd
import pytest

from labkit.measure import bench
from labkit.qemu_syntax import MiB


def run(backend="emulated", mode="cpr-transfer", ram=256 * MiB, dirty=0, status="completed", **figures):
    """One flattened Result row as run_matrix makes it: the cell's coordinates and the figures summarised."""
    row = {"backend": backend, "mode": mode, "ram_bytes": ram, "dirty_rate": dirty, "status": status,
           "guest_verified": status == "completed"}  # fmt: skip
    row.update(figures)
    return row


def test_stats_skip_missing_values_and_say_so_when_none_is_left():
    assert bench._stats([3.0, None, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert bench._stats([None]) == {"median": None, "min": None, "max": None, "n": 0}


def test_summarize_is_per_cell_and_counts_only_completed_runs_in_its_figures():
    rows = [
        run(pause_ms_events=4.0, total_ms=100),
        run(pause_ms_events=6.0, total_ms=140),
        run(pause_ms_events=500.0, total_ms=9000, status="failed"),  # counted as a run, not in the figures
        run(ram=1024 * MiB, pause_ms_events=5.0),
        run(backend="qemu", pause_ms_events=2.0),
    ]
    cells = {(c["backend"], c["ram_bytes"]): c for c in bench.summarize(rows)}
    assert set(cells) == {("emulated", 256 * MiB), ("emulated", 1024 * MiB), ("qemu", 256 * MiB)}
    small = cells[("emulated", 256 * MiB)]
    assert (small["runs"], small["completed"], small["verified"]) == (3, 2, 2)
    assert (small["pause_ms_events_median"], small["pause_ms_events_min"], small["pause_ms_events_max"]) == (
        5.0,
        4.0,
        6.0,
    )
    assert small["total_ms_median"] == 120
    assert small["bytes_main_median"] is None  # never measured: no number made up
    assert cells[("qemu", 256 * MiB)]["pause_ms_events_median"] == 2.0


def _summary(**pauses):
    """cpr-transfer cells with a given median pause per (backend, MiB), and normal cells with throughputs."""
    rows = []
    for key, value in pauses.items():
        backend, mib = key.rsplit("_", 1)
        rows.append(run(backend=backend, ram=int(mib) * MiB, pause_ms_events=value))
    rows.append(run(backend="emulated", mode="normal", ram=1024 * MiB, precopy_bytes_per_s=2e9))
    rows.append(run(backend="qemu", mode="normal", ram=1024 * MiB, precopy_bytes_per_s=1e9))
    return bench.summarize(rows)


def test_ratios_are_computed_from_the_cells_and_judged_against_their_targets():
    summary = _summary(emulated_256=2.0, emulated_1024=3.0, qemu_256=4.0, qemu_1024=4.4)
    ceilings = {"socket_sendfile_bytes_per_s": 8e9, "fd_pass_round_trip_s": 0.0005}
    r = bench.compute_ratios(summary, ceilings)
    assert set(r) == set(bench.RATIO_TARGETS)
    # the same RAM on both backends (the smallest common one): 2.0 / 4.0
    assert r["cpr_pause_emulated_over_qemu"] == {"value": 0.5, "target": "<= 1.0", "met": True}
    # largest RAM's pause over the smallest's: 3.0 / 2.0 misses <= 1.3, 4.4 / 4.0 meets it
    assert r["cpr_pause_largest_over_smallest_emulated"]["value"] == 1.5
    assert r["cpr_pause_largest_over_smallest_emulated"]["met"] is False
    assert r["cpr_pause_largest_over_smallest_qemu"]["value"] == 1.1
    assert r["cpr_pause_largest_over_smallest_qemu"]["met"] is True
    assert r["precopy_throughput_emulated_over_qemu"]["value"] == 2.0
    assert r["precopy_throughput_over_socket_ceiling"]["value"] == 0.25
    # the smallest emulated cpr pause (2.0 ms) over the fd-pass floor (0.5 ms)
    assert r["cpr_pause_over_fd_pass_floor"] == {"value": 4.0, "target": "<= 5.0", "met": True}


def test_a_ratio_without_its_measurements_is_not_applicable_never_zero():
    r = bench.compute_ratios(_summary(emulated_256=2.0), {})
    assert r["cpr_pause_emulated_over_qemu"] == {"value": None, "target": "<= 1.0", "met": None}
    assert r["precopy_throughput_over_socket_ceiling"]["met"] is None
    assert r["cpr_pause_over_fd_pass_floor"]["value"] is None


def _report(summary, ratios):
    return {
        "machine": {"cpu": "Test CPU", "cores": 2, "kernel": "6.1", "kvm": True, "qemu": "10.0.2"},
        "ceilings": {"memcpy_bytes_per_s": 4 << 30, "socket_sendfile_bytes_per_s": 2 << 30,
                     "fd_pass_round_trip_s": 0.00025},  # fmt: skip
        "vm": {
            "spawn_to_qmp_s": {"median": 0.2},
            "stop_quiesce_ms": {"median": None},
            "dirty_rate_bytes_per_s": {"median": 512 * MiB},
            "rss_beyond_guest_ram_bytes": {"median": 30 * MiB},
        },
        "skipped_backends": {"qemu": "qemu-system-x86_64 >= 10.0 not installed (scripts/install-qemu)"},
        "cells": summary,
        "pause_breakdown": [],
        "runs": [{}] * 7,
        "ratios": ratios,
        "seconds": 12.5,
    }


def test_the_report_shows_every_cell_ratio_and_skip_in_words():
    summary = _summary(emulated_256=2.0, emulated_1024=3.0, qemu_256=4.0, qemu_1024=4.4)
    text = bench.format_report(_report(summary, bench.compute_ratios(summary, {})))
    lines = text.splitlines()
    assert lines[0] == "machine: Test CPU x2, kernel 6.1, KVM True, QEMU 10.0.2"
    assert "memcpy 4.0 GiB/s" in lines[1] and "round trip 0.250 ms" in lines[1]
    assert "spawn to QMP 200 ms" in text and "stop quiesced in n/a ms" in text
    assert "skipped backend qemu: qemu-system-x86_64 >= 10.0 not installed" in text
    cell = next(line for line in lines if line.startswith("emulated  cpr-transfer") and "1G" in line)
    assert "3.00/3.00/3.00" in cell and "1/1" in cell
    assert "cpr_pause_largest_over_smallest_emulated" in text and "NOT met" in text
    assert "cpr_pause_over_fd_pass_floor" in text and "n/a" in text  # no floor measured
    assert lines[-1] == "7 migrations in 12.5 s"


def test_the_csv_is_the_summary_headed_by_the_command_and_the_machine(tmp_path):
    summary = _summary(emulated_256=2.0, qemu_256=4.0)
    path = tmp_path / "bench.csv"
    bench.write_csv(_report(summary, {}), str(path), "labkit bench --quick")
    text = path.read_text()
    head = text.splitlines()[:3]
    assert head[0] == "# command: labkit bench --quick"
    assert head[1].startswith("# machine: {") and '"cpu": "Test CPU"' in head[1]
    assert head[2].startswith("# ceilings: {")
    frame = pd.read_csv(io.StringIO(text), comment="#")
    assert len(frame) == len(summary)
    assert sorted(frame["pause_ms_events_median"].dropna()) == pytest.approx([2.0, 4.0])


def test_the_quick_plan_is_smaller_than_the_full_one():
    full, quick = bench.BenchPlan(), bench.BenchPlan.quick(["emulated"])
    assert quick.backends == ["emulated"] and quick.dirty_rates == [0]
    assert len(quick.rams) < len(full.rams) and quick.reps < full.reps
