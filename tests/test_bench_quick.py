"""`labkit bench --quick`: its plan keeps every figure the issue asks of a quick run, its ceilings are measured
by the methods it names, and a run says where its wall time went (durations are reported, never asserted)."""

from __future__ import annotations

import time

import numpy as np
import psutil
import pytest

from labkit.measure import bench, bench_plan, bench_timing, ceilings
from labkit.qemu_syntax import MiB

pytestmark = pytest.mark.timeout(120)


def test_the_quick_plan_keeps_every_cell_the_ratios_need():
    quick = bench.BenchPlan.quick(["emulated", "qemu"])
    cells = quick.cells()
    assert quick.reps == 3  # medians of 3
    for backend in ("emulated", "qemu"):
        cpr = {r for b, m, r, _ in cells if b == backend and m == "cpr-transfer"}
        assert bench.TARGET_RAM in cpr and len(cpr) >= 2  # the pause at 1 GiB, and largest over smallest
        pre = {(r, d) for b, m, r, d in cells if b == backend and m == "normal"}
        assert {d for _, d in pre} == {bench.IDLE_RATE, bench.WRITING_RATE}  # idle and writing
    # pre-copy at one RAM size, the same on both backends: the emulated/QEMU ratios compare like with like
    assert len({r for _, m, r, _ in cells if m == "normal"}) == 1
    full = bench.BenchPlan()
    assert full.name == "full" and full.ceiling_methods is None and full.ceilings_after == "all"


def test_the_plan_a_run_used_is_in_its_output_and_says_quick_is_not_the_reference():
    quick = bench.BenchPlan.quick(["emulated"]).describe()
    assert quick["name"] == "quick" and quick["reps"] == 3 and quick["precopy_rams"] == [1024 * MiB]
    assert quick["ceiling_methods"]["socket"] and quick["ceilings_after"] == "winner"
    text = "\n".join(quick["text"])
    assert "plan quick (NOT the reference run" in text
    assert "pre-copy at 1G" in text and "cpr at 256M+1G" in text and "the winning method only" in text
    assert "numpy copyto" in text and "sendfile, 4096 KiB socket buffers" in text
    full = "\n".join(bench.BenchPlan(backends=["emulated"]).describe()["text"])
    assert full.startswith("plan full:") and "every method" in full and "NOT" not in full


def test_quick_ceiling_methods_are_methods_labkit_measures():
    known_socket = {ceilings.socket_method_name(s, b) for s in ceilings.SENDERS for b in ceilings.SOCKET_BUFFERS}
    assert set(bench_plan.QUICK_CEILING_METHODS["socket"]) < known_socket
    assert set(bench_plan.QUICK_CEILING_METHODS["copy"]) == {"memcpy (ctypes)", "numpy copyto"}


def test_a_ceiling_measures_only_the_methods_asked_and_refuses_an_unknown_one():
    copy = ceilings.copy_ceiling(size=8 * MiB, reps=1, methods_wanted=["numpy copyto"])
    assert set(copy.methods) == {"numpy copyto"} and copy.method == "numpy copyto"
    wanted = ["sendfile, 256 KiB socket buffers", "splice via a pipe, 4096 KiB socket buffers"]
    sock = ceilings.socket_ceiling(size=8 * MiB, reps=1, methods_wanted=wanted)
    assert set(sock.methods) | set(sock.errors) == set(wanted)
    with pytest.raises(ValueError, match="unknown ceiling method"):
        ceilings.socket_ceiling(size=8 * MiB, reps=1, methods_wanted=["carrier pigeon"])


def test_after_the_migrations_quick_measures_each_winner_again_and_keeps_the_better_run():
    plan = bench.BenchPlan.quick(["emulated"])
    clock = bench_timing.PhaseClock()
    before = bench.measure_ceilings(floor_runs=3, size=8 * MiB, clock=clock, plan=plan)
    assert set(before["copy"]["methods"]) == set(bench_plan.QUICK_CEILING_METHODS["copy"])
    after = bench.measure_ceilings(before, floor_runs=3, size=8 * MiB, clock=clock, plan=plan)
    for k in ("copy", "socket"):
        # every method measured before is still listed; the value is the better of the two runs
        assert set(after[k]["methods"]) == set(before[k]["methods"])
        assert after[k]["value"] >= before[k]["value"]
    assert after["pause_floor"]["n"] == 6  # both halves of the floor together
    assert list(clock.seconds) == [
        "ceilings before (copy, socket, fd pass)",
        "pause floor before (3 runs)",
        "ceilings after (copy, socket, fd pass)",
        "pause floor after (3 runs)",
    ]
    assert all(s > 0 for s in clock.seconds.values())


def test_phase_clock_adds_up_by_name_in_first_seen_order():
    clock = bench_timing.PhaseClock()
    clock.add("b", 1.0)
    with clock.phase("a"):
        time.sleep(0.01)
    clock.add("b", 0.5)
    assert list(clock.seconds) == ["b", "a"] and clock.seconds["b"] == 1.5 and clock.seconds["a"] >= 0.01


def test_one_migration_splits_into_parts_that_add_up_to_its_wall_time():
    t0 = time.monotonic()
    res, parts = bench_timing.timed_migrate(
        backend="emulated", mode="cpr-transfer", ram=64 * MiB, dirty_rate=4096, prefill=True, warmup=0.05
    )
    wall = time.monotonic() - t0
    assert res.status == "completed" and res.guest_verified
    assert list(parts) == list(bench_timing.CELL_PARTS)
    assert all(v >= 0 for v in parts.values())
    assert parts["source_spawn"] > 0 and parts["migration"] > 0 and parts["teardown"] > 0
    assert parts["warmup"] == pytest.approx(0.05, abs=0.02)
    assert sum(parts.values()) == pytest.approx(wall, abs=0.05)  # nothing of the wall time is lost


def test_in_the_background_a_teardown_ends_before_the_next_cell_migrates():
    teardowns = bench_timing.Teardowns()
    first, parts1 = bench_timing.timed_migrate(
        teardowns, backend="emulated", mode="cpr-transfer", ram=64 * MiB, dirty_rate=4096, warmup=0.05
    )
    assert parts1["teardown"] == 0.0 and teardowns.thread is not None  # still closing, in the background
    second, parts2 = bench_timing.timed_migrate(
        teardowns, backend="emulated", mode="normal", ram=64 * MiB, dirty_rate=4096, warmup=0.05
    )
    assert parts1["teardown"] > 0  # the second cell waited for it before its destination started
    assert parts2["previous_teardown"] >= 0 and parts2["migration"] > 0
    teardowns.wait()
    assert parts2["teardown"] > 0 and teardowns.thread is None
    assert first.status == second.status == "completed" and first.guest_verified and second.guest_verified
    # the first cell's VMs were reaped before the second's destination was spawned
    assert not any(psutil.pid_exists(pid) for pid in first.pids.values() if pid)


def test_cells_sum_their_runs_and_the_report_shows_where_the_time_went():
    parts = dict.fromkeys(bench_timing.CELL_PARTS, 0.5)
    rows = [
        {"backend": "emulated", "mode": "normal", "ram_bytes": 512 * MiB, "dirty_rate": 4096, "seconds_by_part": parts},
        {"backend": "emulated", "mode": "normal", "ram_bytes": 512 * MiB, "dirty_rate": 4096, "seconds_by_part": parts},
        {"backend": "qemu", "mode": "normal", "ram_bytes": 512 * MiB, "dirty_rate": 4096},  # no parts: skipped
    ]
    (cell,) = bench_timing.summarize_cells(rows)
    assert cell["runs"] == 2 and cell["seconds"]["migration"] == 1.0
    assert cell["seconds"]["total"] == pytest.approx(len(bench_timing.CELL_PARTS))
    lines = bench_timing.format_phases({"migrations emulated": 8.0, "ceilings before": 2.0}, [cell])
    assert lines[1].split()[-2:] == ["8.0", "80%"]
    assert "emul normal 512M 4K/s x2" in lines[-1]
    assert lines[-1].split()[-1] == f"{len(bench_timing.CELL_PARTS):.1f}"


def test_the_real_guests_prefill_writes_the_same_pages_in_place():
    from labkit.host.runners.qemu_prefill import gen0_pages

    pfns = np.arange(0x100, 0x140, dtype=np.uint64) | np.uint64(1 << 32)  # above 4 GiB: both header words
    ram = np.zeros(len(pfns) * 1024 + 7, dtype=np.uint32)  # as guest RAM: a flat view, pages written in place
    view = ram[7:].reshape(-1, 1024)
    assert gen0_pages(pfns, out=view) is view
    assert (view == gen0_pages(pfns)).all() and not ram[:7].any()
