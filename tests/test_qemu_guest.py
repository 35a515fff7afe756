"""labkit.host.runners.qemu_guest without QEMU: the guest builds, and the memory checker tells intact pages
from torn, lost and foreign ones, on a real memfd laid out the way the guest lays out its RAM."""

from __future__ import annotations

import os
import shutil
import struct

import numpy as np
import pytest

from labkit.host.runners import qemu_guest as qg

RAM = 8 << 20  # pages 0x200..0x800 patterned


def _page(pfn: int, gen: int) -> np.ndarray:
    w = np.zeros(1024, dtype=np.uint32)
    seed = np.uint32((pfn * qg.PATTERN_MUL_PFN + gen * qg.PATTERN_MUL_GEN) & 0xFFFFFFFF)
    w[3:] = seed ^ (np.arange(3, 1024, dtype=np.uint32) * np.uint32(qg.PATTERN_MUL_IDX))
    w[0], w[1], w[2] = pfn & 0xFFFFFFFF, pfn >> 32, gen
    return w


def _heartbeat(generation: int, passes: int, cur_pfn: int, end_pfn: int) -> bytes:
    head = qg._HB_HEAD.pack(
        qg.HEARTBEAT_MAGIC, qg.HEARTBEAT_VERSION, 0, 1000, 12345, 0, 0, 5000, 0, 0, 0,
        generation, passes, cur_pfn, 0, 0, 1, 0,
    )  # fmt: skip
    buf = bytearray(qg.HEARTBEAT_SIZE)
    buf[: len(head)] = head
    struct.pack_into("<2Q", buf, qg._HB_RANGES_OFF, qg.FIRST_PFN, end_pfn)
    return bytes(buf)


@pytest.fixture
def memfd():
    fd = os.memfd_create("memory-backend-memfd")
    os.ftruncate(fd, RAM)
    yield fd
    os.close(fd)


def _lay_out(fd: int, generation: int, cur_pfn: int) -> None:
    """A stopped guest in pass `generation`, about to write cur_pfn."""
    end = RAM >> 12
    for pfn in range(qg.FIRST_PFN, end):
        gen = generation if pfn < cur_pfn else generation - 1
        if gen:
            os.pwrite(fd, _page(pfn, gen).tobytes(), pfn << 12)
    os.pwrite(fd, _heartbeat(generation, generation - 1, cur_pfn, end), qg.HEARTBEAT_ADDR)


def test_intact_memory_is_all_ok(memfd: int) -> None:
    _lay_out(memfd, generation=3, cur_pfn=0x500)
    res = qg.verify_guest_memory(memfd, stopped=True)
    assert res["bad"] == res["stale"] == res["untouched"] == 0
    assert res["ok"] == res["pages"] == (RAM >> 12) - qg.FIRST_PFN
    assert (res["generation_min"], res["generation_max"]) == (2, 3)
    hb = qg.read_heartbeat(memfd)
    assert hb.valid and hb.ranges == [(qg.FIRST_PFN, RAM >> 12)] and hb.max_gap_ms == 5.0


def test_checker_finds_torn_lost_and_foreign_pages(memfd: int) -> None:
    _lay_out(memfd, generation=3, cur_pfn=0x500)
    os.pwrite(memfd, b"\xff" * 16, (0x300 << 12) + 100)  # torn body
    os.pwrite(memfd, _page(0x301, 2).tobytes(), 0x301 << 12)  # a lost write: old generation
    os.pwrite(memfd, _page(0x999, 3).tobytes(), 0x302 << 12)  # another page's content
    os.pwrite(memfd, b"\0" * 4096, 0x303 << 12)  # never written, though it should have been
    os.pwrite(memfd, b"\x01" * 4096, 0x500 << 12)  # the page in progress may be anything
    res = qg.verify_guest_memory(memfd, stopped=True)
    assert res["bad"] == 2 and res["bad_pfns"] == [0x300, 0x302]
    assert res["stale"] == 2 and res["in_progress"] == 1


def test_first_pass_leftovers_count_as_untouched(memfd: int) -> None:
    _lay_out(memfd, generation=1, cur_pfn=0x400)
    os.pwrite(memfd, b"BIOS" * 1024, 0x600 << 12)
    res = qg.verify_guest_memory(memfd, stopped=True)
    assert res["bad"] == 0 and res["untouched"] == (RAM >> 12) - 0x400  # from the page in progress on


@pytest.mark.skipif(
    not all(shutil.which(t) for t in ("gcc", "ld", "objcopy")), reason="needs gcc and binutils"
)
def test_build_guest_is_cached_and_a_multiboot_elf32(tmp_path) -> None:
    elf = qg.build_guest(cache_dir=tmp_path)
    assert qg.build_guest(cache_dir=tmp_path) == elf
    data = elf.read_bytes()
    assert data[:5] == b"\x7fELF\x01"  # ELF32: what QEMU's Multiboot loader takes
    assert struct.pack("<I", 0x1BADB002) in data[:8192]
