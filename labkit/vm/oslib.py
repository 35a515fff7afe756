"""qemu_prealloc_mem() (QEMU's util/oslib-posix.c): fault a mapping in ahead of its first use.

A leaf, so both the RAM blocks (prealloc=on at creation) and the incoming migration (a receive that writes every
page anyway) can call it without importing each other.
"""

from __future__ import annotations

import mmap

#: MADV_POPULATE_WRITE (linux/mman.h, 5.14+): pre-faults a mapping so the first writes do not fault page by page.
MADV_POPULATE_WRITE = 23


def qemu_prealloc_mem(mm: mmap.mmap | None) -> None:
    """Fault the whole mapping in, where the kernel allows it (older kernels: the first touch faults instead)."""
    if mm is None:
        return
    try:
        mm.madvise(MADV_POPULATE_WRITE)
    except OSError:
        pass
