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
    """cpr-transfer cells with a given median pause per (backend, MiB) (the ratios themselves are checked in
    tests/test_bench_ceilings.py)."""
    rows = [
        run(backend=k.rsplit("_", 1)[0], ram=int(k.rsplit("_", 1)[1]) * MiB, pause_ms_events=v)
        for k, v in pauses.items()
    ]
    return bench.summarize(rows)


def _ceilings():
    """Ceilings as measure_ceilings() reports them: each with the method that won and every method's median."""

    def c(name, unit, value, method, **methods):
        return {
            "name": name,
            "unit": unit,
            "value": value,
            "method": method,
            "methods": {method: value, **methods},
        }

    return {
        "copy": c("copy", "bytes/s", 4 << 30, "numpy copyto", memcpy=3 << 30),
        "socket": c("socket", "bytes/s", 2 << 30, "sendfile"),
        "fd_pass": c("fd_pass", "s", 0.00025, "send_fds"),
        "pause_floor": {
            "unit": "s",
            "value": 0.0005,
            "min": 0.0004,
            "method": "two processes",
            "steps_ms_median": {"stop": 0.01, "send": 0.2},
            "n": 30,
        },  # fmt: skip
    }


def _report(summary, ratios):
    return {
        "machine": {"cpu": "Test CPU", "cores": 2, "kernel": "6.1", "kvm": True, "qemu": "10.0.2"},
        "ceilings": _ceilings(),
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
    text = bench.format_report(_report(summary, bench.compute_ratios(summary, _ceilings())))
    lines = text.splitlines()
    assert lines[0] == "machine: Test CPU x2, kernel 6.1, KVM True, QEMU 10.0.2"
    copy = next(line for line in lines if line.strip().startswith("copy"))
    assert "4.0 GiB/s" in copy and "numpy copyto" in copy and "memcpy 3.0 GiB/s" in copy
    assert any("memfd pass + map round trip" in line and "0.250 ms" in line for line in lines)
    assert any("pause floor" in line and "0.500 ms" in line and "min 0.400 ms" in line for line in lines)
    assert "spawn to QMP 200 ms" in text and "stop quiesced in n/a ms" in text
    assert "skipped backend qemu: qemu-system-x86_64 >= 10.0 not installed" in text
    cell = next(line for line in lines if line.startswith("emulated  cpr-transfer") and "1G" in line)
    assert "3.00/3.00/3.00" in cell and "1/1" in cell
    # 3.0 ms at the largest RAM over 2.0 at the smallest misses <= 1.3; no pre-copy was run: n/a, never 0
    assert "cpr_pause_largest_over_smallest_emulated" in text and "NOT met" in text
    assert "precopy_emulated_over_socket_ceiling" in text and "n/a" in text
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
    assert quick.backends == ["emulated"]
    assert len(quick.rams) < len(full.rams) and quick.reps < full.reps
    assert len(quick.cells()) < len(bench.BenchPlan(backends=["emulated"]).cells())
