"""The guest's progress series and post_resume: the maths on made-up series, the sampler on a real memfd, and
migrations on both backends (real processes) with the series, the faults and guest memory checked."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time

import pytest

from labkit.host.runners.qemu import qemu_missing
from labkit.lab import guest_progress as pg
from labkit.lab import post_resume as pr
from labkit.lab.engine import Lab
from labkit.lab.guest_progress import ProgressRow


# --------------------------------------------------------------------------------------------- the maths
def _series(side: str, t0_ms: float, t1_ms: float, rate_of, start_bytes: int = 0, step_ms: float = 0.5):
    """Rows of a counter sampled every step_ms, written at rate_of(t) bytes/s."""
    rows, v, t = [], start_bytes, t0_ms
    while t <= t1_ms:
        rows.append(ProgressRow(t, side, int(v), None))
        v += rate_of(t) * step_ms / 1000
        t = round(t + step_ms, 6)
    return rows


def _with_rates(rows: list[ProgressRow]) -> list[ProgressRow]:
    out = []
    for side in ("source", "destination"):
        part = [r for r in rows if r.side == side]
        ts = [int(r.t_ms * 1e6) for r in part]
        for r, rate in zip(part, pg.windowed_rate(ts, [r.bytes for r in part]), strict=True):
            out.append(ProgressRow(r.t_ms, r.side, r.bytes, rate))
    return out


def test_windowed_rate_is_the_slope_over_the_window() -> None:
    ts = [i * 500_000 for i in range(100)]  # every 0.5 ms
    vs = [i * 1000 for i in range(100)]  # 1000 B per 0.5 ms = 2 MB/s
    rates = pg.windowed_rate(ts, vs, window_ms=5.0)
    assert rates[:10] == [None] * 10  # no full window yet
    assert all(r == pytest.approx(2e6) for r in rates[10:])


def test_stitch_takes_the_source_before_resume_and_the_destination_after() -> None:
    src = ([i * 1_000_000 for i in range(20)], [i * 10 for i in range(20)])
    dst = ([i * 1_000_000 for i in range(20)], [0] * 10 + [100 + i for i in range(10)])
    rows = pg.stitch(src, dst, resume_ns=10_000_000, t0_ns=0, window_ms=2.0)
    assert [r.side for r in rows] == ["source"] * 10 + ["destination"] * 10
    assert [r.t_ms for r in rows] == [float(i) for i in range(20)]
    assert rows[9].bytes == 90 and rows[10].bytes == 100
    assert rows[10].bytes_per_s is None  # the destination's rate starts from its own samples only
    assert rows[12].bytes_per_s == pytest.approx(1000.0)
    assert [r.side for r in pg.stitch(src, dst, None, 0)] == ["source"] * 20  # no RESUME: the source alone


def test_sample_rate_hz_is_the_median_gap() -> None:
    assert pg.sample_rate_hz([0, 500_000, 1_000_000, 1_500_000, 9_000_000]) == pytest.approx(2000.0)
    assert pg.sample_rate_hz([0]) is None


def test_post_resume_on_a_guest_that_runs_at_half_speed_for_20_ms() -> None:
    steady = 1e9  # 1 GB/s before the migration and once recovered
    src = _series("source", 0, 100, lambda t: steady if t < 80 else 0.0)  # STOP at 80
    resume = 90.0
    at_resume = src[-1].bytes
    dst = _series(
        "destination", resume, resume + 100, lambda t: steady / 2 if t < resume + 20 else steady, at_resume
    )
    rows = _with_rates([r for r in src if r.t_ms < resume] + dst)
    stat = [(resume - 1, 1000, 3), (resume + 50, 1000 + 2441, 3), (resume + 100, 1000 + 4000, 4)]
    out = pr.post_resume(
        rows, migrate_ms=50.0, stop_ms=80.0, resume_ms=resume, window_ms=50.0, dst_stat=stat, sample_hz=2000.0
    )
    assert out.steady_bytes_per_s == pytest.approx(steady, rel=0.01)
    assert out.window_ms == 50.0
    assert out.lost_ms == pytest.approx(10.0, abs=0.6)  # half speed for 20 ms: 10 ms lost
    assert out.recover_ms == pytest.approx(20.0, abs=1.0)  # the first 5 ms window at >= 90 % starts ~20 ms in
    assert (out.minor_faults, out.major_faults, out.pages_faulted) == (2441, 0, 2441)
    assert out.precopy_lost_ms == pytest.approx(0.0, abs=0.6)  # the source kept its rate until STOP
    assert out.first_window_bytes_per_s == pytest.approx(0.8 * steady, rel=0.02)
    assert out.note is None


def test_post_resume_says_why_when_it_cannot_measure() -> None:
    rows = _with_rates(_series("source", 0, 50, lambda t: 0.0))
    assert "dirty rate" in pr.post_resume(rows, migrate_ms=40, stop_ms=45, resume_ms=48, window_ms=10).note
    assert "RESUME" in pr.post_resume(rows, migrate_ms=40, stop_ms=45, resume_ms=None, window_ms=10).note
    assert pr.faults_between([(5.0, 1, 0)], 1.0, 10.0) is None  # nothing known before the start


def test_the_emulated_counter_offset_is_the_guests_h_bytes() -> None:
    from labkit.vm.guest import H_BYTES

    assert pg.EMULATED_COUNTER_OFFSET == H_BYTES * 8


# ----------------------------------------------------------------------------------- the sampler, for real
def test_sampler_reads_a_counter_through_proc_pid_fd() -> None:
    """A memfd of this process stands in for guest RAM; the sampler finds it by name in /proc/self/fd."""
    fd = os.memfd_create("labkit-progress-test")
    try:
        os.ftruncate(fd, 3 * pg.PAGE)
        offset = pg.PAGE + 40  # not in the first page: the sampler maps only the page that holds it
        loc = pg.CounterLocation("labkit-progress-test", offset)
        assert pg.find_memfd(os.getpid(), loc) is not None
        sampler = pg.ProgressSampler()
        sampler.attach("source", os.getpid(), loc)
        sampler.start()
        try:
            for v in range(1, 51):
                os.pwrite(fd, struct.pack("<Q", v * 4096), offset)
                time.sleep(0.002)
        finally:
            sampler.stop()
        s = sampler.side("source")
        values = list(s.value)
        assert values and values == sorted(values) and values[-1] == 50 * 4096
        assert len(s.minflt) >= 1 and len(s.stat_t_ns) == len(s.minflt)
        assert list(s.t_ns) == sorted(s.t_ns)
    finally:
        os.close(fd)


def test_read_faults_counts_a_first_touch() -> None:
    import mmap

    before = pg.read_faults(os.getpid())
    m = mmap.mmap(-1, 64 * pg.PAGE)
    for i in range(64):
        m[i * pg.PAGE] = 1
    after = pg.read_faults(os.getpid())
    m.close()
    assert before is not None and after is not None
    assert after[0] - before[0] >= 64


# ------------------------------------------------------------------------------------ migrations, emulated
def _check_series(r) -> None:
    frame = r.progress_frame()
    assert list(frame.columns) == ["t_ms", "side", "bytes", "bytes_per_s"]
    resume = next(t.t_ms for t in r.timeline if t.side == "destination" and t.kind == "RESUME")
    src, dst = frame[frame.side == "source"], frame[frame.side == "destination"]
    assert len(src) > 10 and len(dst) > 10
    assert (src.t_ms < resume).all() and (dst.t_ms >= resume).all()
    assert src.bytes.is_monotonic_increasing and dst.bytes.is_monotonic_increasing
    assert dst.bytes.iloc[0] >= src.bytes.iloc[-1]  # the destination carries on from where the source stopped
    p = r.post_resume
    assert p["steady_bytes_per_s"] > 0 and p["window_ms"] > 0 and p["sample_hz"] > 0
    assert p["pages_faulted"] is not None and p["lost_ms"] is not None


def _written_pages(r, window_ms: float) -> int:
    frame = r.progress_frame()
    resume = next(t.t_ms for t in r.timeline if t.side == "destination" and t.kind == "RESUME")
    at = frame[frame.side == "source"].bytes.iloc[-1]
    dst = frame[(frame.side == "destination") & (frame.t_ms <= resume + window_ms)]
    return int((dst.bytes.iloc[-1] - at) // 4096)


@pytest.mark.timeout(180)
def test_cpr_transfer_faults_after_resume_unless_prealloc() -> None:
    """cpr-transfer's destination maps the same memfd with empty page tables: each page the guest writes
    after RESUME faults once. With prealloc=on it faulted them in at start (before the pause) instead."""
    faults = {}
    for prealloc in (False, True):
        with Lab(mode="cpr-transfer", ram="64M", dirty_rate="256M", prefill=True, prealloc=prealloc) as lab:
            r = lab.run()
            assert r.status == "completed" and r.guest_verified, r.error
            _check_series(r)
            written = _written_pages(r, r.post_resume["window_ms"])
            assert written > 100, "the guest wrote too little after RESUME to tell"
            faults[prealloc] = (r.post_resume["pages_faulted"], written)
            memdev = lab.dst.cmd("query-memdev")
            assert [m["prealloc"] for m in memdev if m["id"] == "ram0"] == [prealloc]
    (f_off, w_off), (f_on, w_on) = faults[False], faults[True]
    assert f_off >= w_off * 0.5, faults  # about one fault per page written (more: the guest's own tables)
    assert f_on < w_on * 0.25, faults


@pytest.mark.timeout(180)
def test_normal_mode_series_and_post_resume() -> None:
    with Lab(mode="normal", ram="64M", dirty_rate="32M", progress_after_ms=150) as lab:
        r = lab.run()
    assert r.status == "completed" and r.guest_verified, r.error
    _check_series(r)
    assert r.post_resume["precopy_lost_ms"] is not None


@pytest.mark.timeout(120)
def test_progress_off_records_nothing() -> None:
    with Lab(mode="cpr-transfer", ram="32M", dirty_rate="16M", progress=False) as lab:
        r = lab.run()
    assert r.status == "completed" and r.guest_verified
    assert r.progress == [] and "progress not recorded" in r.post_resume["note"]


@pytest.mark.timeout(120)
def test_migrate_json_carries_progress_and_post_resume() -> None:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run(
        [sys.executable, "-m", "labkit.cli", "migrate", "--ram", "32M", "--dirty-rate", "32M",
         "--progress-after", "100", "--json"],
        capture_output=True, text=True, timeout=110, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["guest_verified"] is True
    assert {"t_ms", "side", "bytes_per_s"} <= set(d["progress"][0])
    assert {r["side"] for r in d["progress"]} == {"source", "destination"}
    assert {"recover_ms", "pages_faulted", "lost_ms", "steady_bytes_per_s"} <= set(d["post_resume"])


# ------------------------------------------------------------------------------------------- real QEMU
_MISSING = qemu_missing()


@pytest.mark.qemu
@pytest.mark.skipif(_MISSING is not None, reason=f"{_MISSING}")
@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["cpr-transfer", "normal"])
def test_qemu_progress_and_post_resume(mode: str) -> None:
    """The tiny guest's progress_bytes, read through QEMU's memfd on both sides; after cpr-transfer the new
    QEMU faults the pages the guest writes (KVM rebuilds its EPT from the new process's page tables)."""
    with Lab(backend="qemu", mode=mode, ram="128M") as lab:
        r = lab.run()
    assert r.status == "completed" and r.guest_verified, (r.error, r.verify)
    _check_series(r)
    if mode == "cpr-transfer":
        written = _written_pages(r, r.post_resume["window_ms"])
        assert written > 100
        assert r.post_resume["pages_faulted"] >= min(written, 128 << 8) * 0.5, (r.post_resume, written)


@pytest.mark.timeout(180)
def test_cpr_exec_one_process_seen_before_and_after() -> None:
    """cpr-exec keeps the PID: the series runs on in the same process's RAM, and its faults after RESUME
    are the new program's (its address space was replaced by the exec)."""
    with Lab(mode="cpr-exec", ram="32M", dirty_rate="256M", prefill=True) as lab:
        r = lab.run()
    assert r.status == "completed" and r.guest_verified, r.error
    _check_series(r)
    written = _written_pages(r, r.post_resume["window_ms"])
    assert r.post_resume["pages_faulted"] >= min(written, 32 << 8) * 0.5, (r.post_resume, written)


def test_counter_reader_maps_a_hugetlb_memfd_at_its_page_size() -> None:
    """A hugetlb memfd maps only at 2 MiB offsets: the reader falls back to the huge page holding the counter
    (the tiny guest's, at 0x1FF328, lies in the first 2 MiB page)."""
    import mmap

    from labkit.teach.after_pause import huge_pages_free

    if (huge_pages_free() or 0) < 1:
        pytest.skip("no free 2 MiB page in the hugetlb pool (labkit hugepages --reserve sets one)")
    fd = os.memfd_create("labkit-progress-huge", os.MFD_HUGETLB)
    try:
        os.ftruncate(fd, 2 << 20)
        with mmap.mmap(fd, 2 << 20) as m:
            struct.pack_into("<Q", m, 0x1FF328, 12345 * 4096)
        reader = pg.CounterReader(f"/proc/self/fd/{fd}", 0x1FF328)
        try:
            assert reader.read() == 12345 * 4096
        finally:
            reader.close()
    finally:
        os.close(fd)


def test_steady_rate_counts_from_the_end_of_the_first_pass() -> None:
    """A guest's first pass over fresh RAM pays first touches too: slow until it has written 10 MB here."""
    rows = _with_rates(_series("source", 0, 100, lambda t: 2e8 if t < 50 else 1e9))  # 10 MB written by t=50
    assert pr.steady_rate(rows, 100.0) == pytest.approx(6e8, rel=0.7)  # a blend of both
    assert pr.steady_rate(rows, 100.0, from_bytes=10_000_000) == pytest.approx(1e9, rel=0.01)
    assert pr.steady_rate(rows, 40.0, from_bytes=10_000_000) is None  # not reached before `migrate`
