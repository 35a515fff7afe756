"""Prefill for the tiny real guest: the host writes the pages the guest has not reached yet, through its memfd.

The emulated guest's `prefill=on` writes every page once at boot, so pre-copy moves real pages rather than
skipping zero ones. The real guest writes its RAM in address order at its paced rate, so a slow (or idle)
guest leaves most pages zero, which QEMU sends as a flag: a pre-copy comparison between the two would
compare page copying with zero-page skipping. This fills every page the guest has not written yet with
the guest's own pattern at generation 0 (non-zero, different in every page), which the verifier counts as
"not yet written" during the guest's first pass, so it never hides a lost write. It works top-down and
stops a safe margin above the guest's cursor, so it never overwrites a page the guest has written.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable

import numpy as np

from labkit.host.runners import qemu_guest as qg

CHUNK_PAGES = 4096  # 16 MiB per step; the cursor is read again before each


def gen0_pages(pfns: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The guest's page pattern (guest/README.md) at generation 0 for these pfns: n x 1024 uint32, written
    into `out` (e.g. a view of guest RAM) when given: one pass, no temporary (a 1 GiB prefill in well under
    a second rather than seconds of copies, which `labkit bench` paid on every real-QEMU migration)."""
    words = np.empty((len(pfns), qg.PAGE_SIZE // 4), dtype=np.uint32) if out is None else out
    words[:, 0] = (pfns & 0xFFFFFFFF).astype(np.uint32)
    words[:, 1] = (pfns >> 32).astype(np.uint32)
    words[:, 2] = 0
    seed = pfns.astype(np.uint32) * np.uint32(qg.PATTERN_MUL_PFN)
    np.bitwise_xor(seed[:, None], qg._IDX_MUL[None, :], out=words[:, qg.PAGE_HEADER_WORDS :])
    return words


def prefill_ahead_of_guest(
    path: str, size: int, read_heartbeat: Callable[[], qg.Heartbeat], rate: int
) -> int:
    """Fill the guest's not-yet-written pages of the shared RAM file `path`; returns the pages filled.

    `rate` is the guest's dirty rate in bytes/s (0: unpaced, it writes everything within a second on its
    own, so nothing is filled). The margin above the cursor is what the guest writes in one second."""
    if rate <= 0:
        return 0
    margin = rate // qg.PAGE_SIZE + CHUNK_PAGES
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    below_4g = qg.q35_below_4g(size)
    words = np.frombuffer(mm, dtype=np.uint32)
    filled = 0
    try:
        hb = read_heartbeat()
        if hb.passes:
            return 0  # every page already holds a real generation
        for start, end in sorted(hb.ranges, reverse=True):
            for c1 in range(end, start, -CHUNK_PAGES):
                c0 = max(start, c1 - CHUNK_PAGES)
                hb = read_heartbeat()
                if hb.passes or c0 <= hb.cur_pfn + margin:
                    return filled
                phys = c0 << qg.PAGE_SHIFT
                off = phys if phys < qg.FOUR_GIB else phys - qg.FOUR_GIB + below_4g
                w0 = off // 4
                gen0_pages(np.arange(c0, c1, dtype=np.uint64), out=words[w0 : w0 + (c1 - c0) * 1024].reshape(-1, 1024))
                filled += c1 - c0
        return filled
    finally:
        del words
        mm.close()
