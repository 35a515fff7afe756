"""Huge pages: `--hugetlb 2M` (memory-backend-memfd,hugetlb=on,hugetlbsize=2M) on both backends.

The emulator must parse and refuse these options with QEMU 10.0.2's texts (checked against the real binary
where it is installed), its memfds must really be MFD_HUGETLB, and cpr-transfer must hand the same huge-page
memfd to the new process: same inode, guest verified, and 2048 kB pages in /proc/PID/smaps. The runs need a
pool of 2 MiB pages: as root the tests grow it for the test and put nr_hugepages back; as a plain user they
use what is free, or skip saying so.
"""

from __future__ import annotations

import fcntl
import gc
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labkit.host.hardware import VMConfig
from labkit.host.hugepages import (
    HugePageError,
    HugePagePool,
    kernel_page_size,
    pages_for,
    pool_for,
    pool_reserved,
    read_pools,
    read_smaps,
)
from labkit.host.runners import spawn
from labkit.host.runners.qemu import qemu_missing
from labkit.lab.engine import Lab, LabError
from labkit.qemu_syntax import MiB
from labkit.vm.memfd import MemfdError, memfd_flags
from labkit.vm.options import OptionError, parse_args

ROOT = Path(__file__).resolve().parents[1]
QEMU_MISSING = qemu_missing()
HUGE = 2 * MiB
HAS_2M = any(p.page_size == HUGE for p in read_pools())
needs_2m = pytest.mark.skipif(not HAS_2M, reason="this kernel has no 2 MiB huge page pool")


@pytest.fixture
def huge_pool():
    """A context manager factory: at least `pages` free 2 MiB pages for the block (root grows the pool and
    restores nr_hugepages afterwards), or a skip that says why none can be had."""
    import contextlib

    if not HAS_2M:
        pytest.skip("this kernel has no 2 MiB huge page pool")

    @contextlib.contextmanager
    def reserve(pages: int):
        pool = pool_for(HUGE)
        if os.geteuid() != 0 and pool.available < pages:
            pytest.skip(
                f"not root and the 2 MiB pool has {pool.available} pages available, {pages} needed "
                f"(as root: labkit hugepages --reserve {pages * 2}M)"
            )
        before = pool.total
        try:
            with pool_reserved(HUGE, pages) as p:
                yield p
        except HugePageError as e:
            pytest.skip(f"no 2 MiB pool can be had: {e}")
        # pages still mapped when the pool shrinks stay as surplus until their last user lets go
        gc.collect()
        deadline = time.monotonic() + 10
        while pool_for(HUGE).total != before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pool_for(HUGE).total == before, f"nr_hugepages was not restored: {pool_for(HUGE)}"

    return reserve


# ------------------------------------------------------------------------------------------ unit


def test_memfd_flags_are_qemus():
    seals = 0x7  # any seal: MFD_ALLOW_SEALING is set
    assert memfd_flags(True, 2 * MiB, seals) == os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | os.MFD_HUGETLB | os.MFD_HUGE_2MB
    assert memfd_flags(True, 4 * MiB, seals) == 0x58000007  # QEMU 10.0.2's text for hugetlbsize=4M
    assert memfd_flags(True, 4096, seals) == 0x30000007
    # hugetlbsize=1: bit 0 is its lowest set bit, so no size goes in the flags and the default size is used
    assert memfd_flags(True, 1, seals) == os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | os.MFD_HUGETLB
    assert memfd_flags(False, 2 * MiB, 0) == os.MFD_CLOEXEC  # hugetlbsize alone does nothing
    for size in (3 * MiB, 6 * MiB):
        with pytest.raises(MemfdError, match="^Hugepage size must be a power of 2$"):
            memfd_flags(False, size, 0)  # checked even with hugetlb=off, as QEMU does


def test_options_parse_hugetlb_for_memfd_only():
    base = ["-machine", "q35,memory-backend=r", "-object"]
    opts = parse_args([*base, "memory-backend-memfd,id=r,size=64M,hugetlb=on,hugetlbsize=2M"])
    assert (opts.objects["r"].hugetlb, opts.objects["r"].hugetlbsize) == (True, 2 * MiB)
    opts = parse_args([*base, "memory-backend-memfd,id=r,size=64M"])
    assert (opts.objects["r"].hugetlb, opts.objects["r"].hugetlbsize) == (False, None)
    with pytest.raises(OptionError, match="Parameter 'hugetlb' expects 'on' or 'off'$"):
        parse_args([*base, "memory-backend-memfd,id=r,size=64M,hugetlb=maybe"])
    with pytest.raises(OptionError, match="Parameter 'hugetlbsize' expects a size value$"):
        parse_args([*base, "memory-backend-memfd,id=r,size=64M,hugetlb=on,hugetlbsize=abc"])
    with pytest.raises(OptionError, match="hugetlb"):
        parse_args([*base, "memory-backend-ram,id=r,size=64M,hugetlb=on"])


def test_vmconfig_renders_the_hugetlb_backend():
    cfg = VMConfig(ram="256M", hugetlb="2M")
    assert cfg.object_option() == "memory-backend-memfd,id=ram0,size=256M,share=on,hugetlb=on,hugetlbsize=2M"
    assert "hugetlb" not in (VMConfig(ram="256M").object_option() or "")
    with pytest.raises(ValueError, match="memory_backend 'memfd'"):
        VMConfig(ram="256M", memory_backend="ram", hugetlb="2M")


def test_pools_are_read_from_sysfs():
    pools = read_pools()
    if not pools:
        pytest.skip("this kernel has no hugetlbfs")
    for p in pools:
        assert p.page_size in (2 * MiB, 1 << 30) or p.page_size & (p.page_size - 1) == 0
        with open(f"{p.path}/nr_hugepages") as f:
            assert int(f.read()) == p.total
        assert 0 <= p.reserved <= p.free <= p.total + p.surplus
    pool = HugePagePool(HUGE, total=10, free=8, reserved=3, surplus=0, overcommit=0)
    assert pool.available == 5 and pool.label == "2 MiB"
    assert pool.describe() == "2 MiB: 10 total, 8 free, 3 reserved"
    assert pages_for(257 * MiB, HUGE) == 129


# ----------------------------------------------------------------------------- emulator vs QEMU


def _start_error(prog: list[str], obj: str, ram: str = "256M") -> str:
    """The one error line a VM prints when it refuses to start, without the program's name."""
    argv = [*prog, "-m", ram, "-machine", "q35,memory-backend=ram0", "-object", obj, "-nodefaults",
            "-display", "none", "-serial", "none", "-S"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ": warning: " not in ln]
    assert len(lines) == 1, r.stderr
    return lines[0].split(": ", 1)[1]


BAD_HUGETLB = [
    ("memory-backend-memfd,id=ram0,size=256M,hugetlb=on,hugetlbsize=3M", "256M", "Hugepage size must be a power of 2"),
    ("memory-backend-memfd,id=ram0,size=256M,hugetlb=off,hugetlbsize=3M", "256M", "Hugepage size must be a power of 2"),
    ("memory-backend-memfd,id=ram0,size=256M,hugetlb=on,hugetlbsize=0", "256M",
     "Property 'memory-backend-memfd.hugetlbsize' doesn't take value '0'"),
    ("memory-backend-memfd,id=ram0,size=256M,hugetlb=on,hugetlbsize=abc", "256M",
     "-object memory-backend-memfd,id=ram0,size=256M,hugetlb=on,hugetlbsize=abc: "
     "Parameter 'hugetlbsize' expects a size value"),
    ("memory-backend-memfd,id=ram0,size=256M,hugetlb=maybe", "256M",
     "-object memory-backend-memfd,id=ram0,size=256M,hugetlb=maybe: Parameter 'hugetlb' expects 'on' or 'off'"),
    ("memory-backend-memfd,id=ram0,size=256M,hugetlb=on,hugetlbsize=4M", "256M",
     "failed to create memfd with flags 0x58000007: No such device"),  # a power of 2 with no pool
    ("memory-backend-memfd,id=ram0,size=257M,hugetlb=on,hugetlbsize=2M", "257M",
     "failed to resize memfd to 269484032: Invalid argument"),  # not a multiple of the page size
]  # fmt: skip


@needs_2m
@pytest.mark.parametrize("obj,ram,text", BAD_HUGETLB, ids=[c[0].split("size=256M,")[-1] for c in BAD_HUGETLB])
def test_emulator_refuses_bad_hugetlb_with_qemus_text(obj, ram, text):
    if "4M" in obj and any(p.page_size == 4 * MiB for p in read_pools()):
        pytest.skip("this kernel has a 4 MiB pool")
    assert _start_error([sys.executable, "-m", "labkit.vm"], obj, ram) == text


@needs_2m
def test_emulator_refuses_a_pool_too_small_with_qemus_text(huge_pool):
    with huge_pool(4) as pool:  # a 256 MiB guest needs 128 pages; leave the pool with fewer
        if pool.available >= 128:
            pytest.skip(f"the 2 MiB pool has {pool.available} pages free: a 256 MiB guest would fit")
        obj = "memory-backend-memfd,id=ram0,size=256M,hugetlb=on,hugetlbsize=2M"
        text = _start_error([sys.executable, "-m", "labkit.vm"], obj)
        assert text == "unable to map backing store for guest RAM: Cannot allocate memory"


@pytest.mark.qemu
@pytest.mark.skipif(QEMU_MISSING is not None, reason=f"{QEMU_MISSING}")
@needs_2m
@pytest.mark.parametrize("obj,ram,text", BAD_HUGETLB, ids=[c[0].split("size=256M,")[-1] for c in BAD_HUGETLB])
def test_real_qemu_gives_the_same_texts(obj, ram, text):
    if "4M" in obj and any(p.page_size == 4 * MiB for p in read_pools()):
        pytest.skip("this kernel has a 4 MiB pool")
    assert _start_error(["qemu-system-x86_64", "-accel", "tcg"], obj, ram) == text


# ------------------------------------------------------------------------------------- the lab


def test_lab_refuses_more_huge_pages_than_are_free(tmp_path, monkeypatch):
    if not HAS_2M:
        pytest.skip("this kernel has no 2 MiB huge page pool")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    pool = pool_for(HUGE)
    ram = max(16 * MiB, (pool.available + 1) * HUGE)
    with pytest.raises(LabError) as exc:
        Lab(mode="cpr-transfer", ram=ram, hugetlb="2M")
    text = str(exc.value)
    assert "\n" not in text and f"needs {ram // HUGE} huge pages of 2 MiB" in text, text
    assert "labkit hugepages --reserve" in text
    assert list(tmp_path.iterdir()) == []  # refused before anything was made


@pytest.mark.parametrize(
    "kwargs,expect",
    [
        (dict(ram="64M", hugetlb="3M"), "this host's huge page sizes are"),
        (dict(ram="65M", hugetlb="2M"), "is not a multiple of the 2 MiB huge page"),
        (dict(ram="64M", hugetlb="2M", memory_backend="ram"), "needs --memory-backend memfd"),
        (dict(ram="64M", hugetlb="2M", share=False), "--share off"),
        (dict(ram="64M", hugetlb="lots"), "hugetlb (--hugetlb): invalid size"),
    ],
)
def test_lab_refuses_bad_hugetlb_requests(kwargs, expect):
    if not HAS_2M:
        pytest.skip("this kernel has no 2 MiB huge page pool")
    with pytest.raises(LabError) as exc:
        Lab(mode="cpr-transfer", **kwargs)
    assert "\n" not in str(exc.value) and expect in str(exc.value), str(exc.value)


def _huge_cpr_transfer(**kwargs) -> None:
    """One cpr-transfer with 2 MiB pages, checked while both processes live. The Lab is this function's own,
    so nothing of it (a sampler's mapping of guest RAM) outlives the call and keeps huge pages in use."""
    with Lab(mode="cpr-transfer", hugetlb="2M", **kwargs) as lab:
        _check_huge_cpr_transfer(lab)
        blocks = lab.dst.cmd("x-query-ramblock")["human-readable-text"]
        ram0 = next(ln for ln in blocks.splitlines() if ln.split()[0] == "ram0")
        assert ram0.split()[1:3] == ["2", "MiB"], blocks  # PSize, as QEMU prints it


def _check_huge_cpr_transfer(lab: Lab) -> None:
    """Same inode on both sides, guest verified, and 2 MiB pages behind guest RAM in both processes."""
    r = lab.run()
    assert r.status == "completed", r.error
    assert r.guest_verified, r.verify
    ram = [m for m in r.mappings if m.block == lab.config.backend_id]
    assert {m.side for m in ram} == {"source", "destination"}, r.mappings
    (inode,) = {m.inode for m in ram}  # the same memfd, mapped by both processes
    for side in ("source", "destination"):
        assert kernel_page_size(r.pids[side], inode) == HUGE, side
    smaps = [e for e in read_smaps(r.pids["destination"]) if e.inode == inode]
    assert smaps and all(e.kernel_page_size == HUGE and e.mmu_page_size == HUGE for e in smaps)
    assert sum(e.hugetlb_bytes for e in smaps) > 0  # the guest's pages are really there, and huge


@needs_2m
@pytest.mark.timeout(180)
def test_cpr_transfer_with_2m_pages_emulated(huge_pool):
    with huge_pool(pages_for(64 * MiB, HUGE)):
        _huge_cpr_transfer(ram="64M", dirty_rate="32M")


@pytest.mark.qemu
@pytest.mark.skipif(QEMU_MISSING is not None, reason=f"{QEMU_MISSING}")
@needs_2m
@pytest.mark.timeout(300)
def test_cpr_transfer_with_2m_pages_real_qemu(huge_pool):
    with huge_pool(pages_for(64 * MiB, HUGE)):
        _huge_cpr_transfer(backend="qemu", ram="64M")


@needs_2m
@pytest.mark.timeout(60)
def test_emulator_memfd_is_hugetlb_and_sealed(huge_pool):
    with huge_pool(pages_for(32 * MiB, HUGE)):
        with spawn(VMConfig(ram=32 * MiB, hugetlb="2M")) as m:
            ram0 = next(b for b in m.cmd("x-labkit-ram-blocks") if b["name"] == "ram0")
            fd = os.open(f"/proc/{m.pid}/fd/{ram0['fd']}", os.O_RDONLY | os.O_CLOEXEC)  # the same inode
            try:
                st = os.fstat(fd)
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            finally:
                os.close(fd)
            assert st.st_blksize == HUGE  # hugetlbfs: the file's pages are 2 MiB
            assert seals == fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL  # QEMU's seal=on
            assert kernel_page_size(m.pid, st.st_ino) == HUGE


# ----------------------------------------------------------------------------------------- the sweep


def _row(backend, page, ram, rep, events, **extra):
    return {"backend": backend, "page": page, "ram_bytes": ram, "rep": rep, "status": "completed",
            "guest_verified": True, "same_inode": True, "dst_kernel_page_size": 4096 if page == "4K" else HUGE,
            "load_1m": 1.0, "pause_ms_reported": 1, "pause_ms_events": events, "pause_ms_guest": None,
            **extra}  # fmt: skip


def test_sweep_summary_and_flatness_from_rows():
    from labkit.measure.hugetlb_sweep import flatness, format_summary, summarize_sweep

    rows = [
        _row("emulated", "4K", 256 * MiB, 0, 2.0, post_resume_pages_faulted=100),
        _row("emulated", "4K", 256 * MiB, 1, 4.0, post_resume_pages_faulted=300),
        _row("emulated", "4K", 8 << 30, 0, 3.0),
        _row("emulated", "4K", 8 << 30, 1, 4.0),
        _row("emulated", "2M", 256 * MiB, 0, 2.0),
        _row("emulated", "2M", 8 << 30, 0, 5.0),
        {"backend": "qemu", "page": "2M", "ram_bytes": 8 << 30, "rep": None, "status": "skipped", "error": "no pool"},
    ]
    summary = summarize_sweep(rows)
    cell = next(c for c in summary if (c["page"], c["ram_bytes"]) == ("4K", 256 * MiB))
    assert cell["pause_ms_events_median"] == 3.0 and cell["pause_ms_events_min"] == 2.0
    assert cell["post_resume_pages_faulted_median"] == 200 and cell["pause_ms_guest_median"] is None
    assert cell["dst_kernel_page_size"] == [4096] and cell["completed"] == 2
    skipped = next(c for c in summary if c["backend"] == "qemu")
    assert skipped["completed"] == 0 and skipped["skipped"] == "no pool"
    verdicts = {(f.page, f.figure): f for f in flatness(summary) if f.backend == "emulated"}
    assert verdicts[("4K", "events")].ratio == round(3.5 / 3.0, 3) and verdicts[("4K", "events")].flat
    assert verdicts[("2M", "events")].ratio == 2.5 and verdicts[("2M", "events")].flat is False
    assert verdicts[("4K", "guest")].flat is None  # no figure, no verdict
    text = format_summary(summary, flatness(summary))
    assert "skipped: no pool" in text and "x2.5 grows" in text


@needs_2m
@pytest.mark.timeout(240)
def test_sweep_runs_both_page_sizes(huge_pool):
    from labkit.measure.hugetlb_sweep import HugetlbSweepPlan, run_hugetlb_sweep

    plan = HugetlbSweepPlan(rams=[32 * MiB], pages=["4K", "2M"], backends=["emulated"], reps=1, dirty_rate="32M")
    with huge_pool(pages_for(32 * MiB, HUGE)):  # root: the sweep grows and restores the pool itself too
        rows = run_hugetlb_sweep(plan)
    assert [(r["page"], r["status"]) for r in rows] == [("4K", "completed"), ("2M", "completed")], rows
    assert [r["dst_kernel_page_size"] for r in rows] == [4096, HUGE]
    assert all(r["same_inode"] and r["guest_verified"] and r["pause_ms_events"] > 0 for r in rows)
