"""labkit bench's ceilings: the ratio and breach logic on hand-made cells, and the real ceilings, quickly.

No timed assertions: the speeds themselves belong to `labkit bench`; these tests check that each ceiling is
measured by the methods it claims, that a rate above a ceiling is reported as a broken ceiling, and that the
ratios are computed from the cells they name."""

from __future__ import annotations

import numpy as np
import pytest

from labkit.host.runners import qemu_guest as qg
from labkit.host.runners.qemu_prefill import gen0_pages
from labkit.measure import bench, ceilings, pause_floor

MiB = 1 << 20
pytestmark = pytest.mark.timeout(120)


def cell(backend, mode, ram, dirty, pause=None, pause_min=None, precopy=None, first_pass=None):
    return {
        "backend": backend,
        "mode": mode,
        "ram_bytes": ram,
        "dirty_rate": dirty,
        "pause_ms_events_median": pause,
        "pause_ms_events_min": pause_min if pause_min is not None else pause,
        "precopy_bytes_per_s_median": precopy,
        "first_pass_bytes_per_s_median": first_pass,
    }


def ceiling_set(socket=2e9, copy=8e9, floor_ms=0.5, floor_min_ms=0.4):
    return {
        "copy": {"name": "copy", "unit": "bytes/s", "value": copy, "method": "numpy copyto", "methods": {}},
        "socket": {"name": "socket", "unit": "bytes/s", "value": socket, "method": "sendfile", "methods": {}},
        "fd_pass": {"name": "fd_pass", "unit": "s", "value": 1e-4, "method": "send_fds", "methods": {}},
        "pause_floor": {
            "unit": "s",
            "value": floor_ms / 1e3,
            "min": floor_min_ms / 1e3,
            "method": "two processes",
            "steps_ms_median": {},
            "n": 3,
        },
    }


SUMMARY = [
    cell("emulated", "cpr-transfer", 256 * MiB, 4096, pause=0.55),
    cell("emulated", "cpr-transfer", 1024 * MiB, 4096, pause=0.6),
    cell("qemu", "cpr-transfer", 256 * MiB, 4096, pause=3.0),
    cell("qemu", "cpr-transfer", 1024 * MiB, 4096, pause=4.0),
    cell("emulated", "normal", 1024 * MiB, 4096, pause=2.0, precopy=1.5e9, first_pass=1.6e9),
    cell("qemu", "normal", 1024 * MiB, 4096, pause=9.0, precopy=1.0e9),
    cell("emulated", "normal", 1024 * MiB, 256 * MiB, pause=5.0, precopy=1.2e9, first_pass=1.4e9),
    cell("qemu", "normal", 1024 * MiB, 256 * MiB, pause=20.0, precopy=0.6e9),
]


def test_ratios_come_from_the_cells_they_name():
    r = bench.compute_ratios(SUMMARY, ceiling_set(), {"dirty_rate_bytes_per_s": {"median": 1e9}})
    assert r["cpr_pause_emulated_over_floor"]["value"] == pytest.approx(0.6 / 0.5, abs=1e-4)
    assert r["cpr_pause_emulated_over_floor"]["met"] is True  # 1.2 <= 1.25
    assert r["cpr_pause_emulated_over_qemu"]["value"] == pytest.approx(0.6 / 4.0, abs=1e-4)
    assert r["cpr_pause_largest_over_smallest_emulated"]["value"] == pytest.approx(0.6 / 0.55, abs=1e-4)
    assert r["cpr_pause_largest_over_smallest_qemu"]["value"] == pytest.approx(4.0 / 3.0, abs=1e-4)
    assert r["cpr_pause_largest_over_smallest_qemu"]["met"] is False
    assert r["precopy_emulated_over_socket_ceiling"]["value"] == pytest.approx(0.75, abs=1e-4)
    assert r["precopy_idle_emulated_over_qemu"]["value"] == pytest.approx(1.5, abs=1e-4)
    assert r["precopy_writing_emulated_over_qemu"]["value"] == pytest.approx(2.0, abs=1e-4)
    # the largest ratio to any ceiling: pass 1 at 1.6 GB/s against a 2 GB/s socket
    assert r["ceiling_largest_ratio"]["value"] == pytest.approx(0.8, abs=1e-4)
    assert r["ceiling_largest_ratio"]["met"] is True
    assert bench.ceiling_breaches(SUMMARY, ceiling_set(), None) == []


def test_missing_sides_give_no_ratio_rather_than_a_wrong_one():
    only_emulated = [c for c in SUMMARY if c["backend"] == "emulated"]
    r = bench.compute_ratios(only_emulated, ceiling_set(), None)
    assert r["cpr_pause_emulated_over_qemu"] == {"value": None, "target": "<= 0.25", "met": None}
    assert r["precopy_idle_emulated_over_qemu"]["value"] is None
    one_ram = [c for c in SUMMARY if c["ram_bytes"] == 1024 * MiB]
    assert bench.compute_ratios(one_ram, ceiling_set(), None)["cpr_pause_largest_over_smallest_emulated"][
        "value"
    ] is None


def test_a_rate_above_its_ceiling_breaks_the_run_with_one_line_that_says_why():
    lines = bench.ceiling_breaches(SUMMARY, ceiling_set(socket=1.5e9), None)
    assert len(lines) == 1  # only pass 1 (1.6 GB/s) beat 1.5 GB/s; 1.5 itself does not
    assert "\n" not in lines[0]
    assert "emulated normal at 1G, guest writing 4K/s: pre-copy pass 1 1.600 GB/s exceeds" in lines[0]
    assert "socket ceiling 1.500 GB/s (sendfile)" in lines[0] and "ceiling is not measured" in lines[0]
    r = bench.compute_ratios(SUMMARY, ceiling_set(socket=1.5e9), None)
    assert r["ceiling_largest_ratio"]["met"] is False


def test_an_emulated_pause_below_the_floor_breaks_the_floor():
    lines = bench.ceiling_breaches(SUMMARY, ceiling_set(floor_min_ms=0.56), None)
    assert [line.split(":")[1].strip() for line in lines] == ["emulated cpr-transfer at 256M, guest writing 4K/s"]
    assert "fastest STOP->RESUME 0.550 ms is below the pause_floor_min ceiling 0.560 ms" in lines[0]


def test_the_guests_dirty_rate_is_held_against_the_copy_ceiling():
    vm = {"dirty_rate_bytes_per_s": {"median": 9e9}}
    lines = bench.ceiling_breaches([], ceiling_set(copy=8e9), vm)
    assert len(lines) == 1 and lines[0].startswith("ceiling broken: emulated guest's dirty rate 9.000 GB/s")


def test_check_and_ratio_to_ceiling_directions():
    rate = {"unit": "bytes/s", "value": 100.0, "method": "m"}
    floor = {"unit": "s", "value": 0.002, "method": "f"}
    assert ceilings.ratio_to_ceiling(50.0, rate) == 0.5
    assert ceilings.ratio_to_ceiling(0.004, floor) == 0.5  # a time twice the floor
    assert ceilings.ratio_to_ceiling(None, rate) is None and ceilings.ratio_to_ceiling(1.0, None) is None
    got = ceilings.check([("a", 100.0, "r"), ("b", 101.0, "r"), ("c", 0.001, "f"), ("d", None, "r"),
                          ("e", 1.0, "absent")], {"r": rate, "f": floor})  # fmt: skip
    assert [b.figure for b in got] == ["b", "c"]


def test_best_of_takes_the_best_run_and_names_methods_the_host_refused():
    seq = iter([1.0, 5.0, 3.0])

    def refused() -> float:
        raise OSError(22, "Invalid argument")

    c = ceilings.best_of("x", "bytes/s", {"a": lambda: next(seq), "b": lambda: 2.0, "no": refused}, reps=3)
    assert (c.value, c.method) == (5.0, "a")
    assert c.methods == {"a": 3.0, "b": 2.0} and "no" in c.errors
    t = ceilings.best_of("t", "s", {"a": lambda: 0.3, "b": lambda: 0.2}, reps=2)
    assert (t.value, t.method) == (0.2, "b")


def test_plan_runs_cpr_at_the_idle_rate_and_precopy_at_both():
    plan = bench.BenchPlan.quick(["emulated", "qemu"])
    cells = plan.cells()
    assert {(m, d) for _, m, _, d in cells} == {
        ("cpr-transfer", bench.IDLE_RATE),
        ("normal", bench.IDLE_RATE),
        ("normal", bench.WRITING_RATE),
    }
    assert {r for _, m, r, _ in cells if m == "normal"} == {1024 * MiB}
    assert {r for _, m, r, _ in cells if m == "cpr-transfer"} == {256 * MiB, 1024 * MiB}
    assert {b for b, *_ in cells} == {"emulated", "qemu"}


def test_prefill_pages_are_data_the_verifier_counts_as_not_yet_written():
    pfns = np.arange(0x200, 0x210, dtype=np.uint64)
    words = gen0_pages(pfns)
    ok, untouched, gen = qg._check_pages(words, pfns)
    assert not ok.any() and not untouched.any() and (gen == 0).all()
    assert words[:, 3:].any(axis=1).all() and len({w.tobytes() for w in words}) == len(pfns)
    # the same body at generation 1 is a page the guest wrote: the pattern is the guest's own
    words[:, 2] = 1
    body = (pfns.astype(np.uint32) * np.uint32(qg.PATTERN_MUL_PFN)) + np.uint32(qg.PATTERN_MUL_GEN)
    words[:, 3:] = body[:, None] ^ qg._IDX_MUL[None, :]
    assert qg._check_pages(words, pfns)[0].all()


def test_the_real_ceilings_measure_quickly_with_every_method():
    copy = ceilings.copy_ceiling(size=8 * MiB, reps=1)
    assert copy.unit == "bytes/s" and copy.value > 0
    assert {"memcpy (ctypes)", "numpy copyto"} <= set(copy.methods)
    sock = ceilings.socket_ceiling(size=8 * MiB, reps=1)
    assert set(sock.methods) | set(sock.errors) == {
        f"{s}, {b >> 10} KiB socket buffers" for s in ceilings.SENDERS for b in ceilings.SOCKET_BUFFERS
    }
    assert sock.value == max(sock.methods.values())  # one run each: the best run is the best median
    fd = ceilings.fd_pass_round_trip(nfds=2, size=1 * MiB, reps=2)
    assert fd.unit == "s" and fd.value > 0
    floor = pause_floor.measure(runs=3)
    assert floor["n"] == 3 and 0 < floor["min"] <= floor["value"] <= floor["max"]
    assert set(floor["steps_ms_median"]) == set(pause_floor.STEPS)
    for r in floor["runs_ms"]:  # the steps add up to the whole pause
        assert sum(r[k] for k in pause_floor.STEPS) == pytest.approx(r["STOP->RESUME"], abs=1e-3)
