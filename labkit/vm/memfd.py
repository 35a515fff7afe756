"""Huge-page memfds as QEMU creates them: backends/hostmem-memfd.c's hugetlb properties and util/memfd.c.

`-object memory-backend-memfd,hugetlb=on,hugetlbsize=2M` makes QEMU call memfd_create() with MFD_HUGETLB and
the page size's log2 in the flags' top bits (MFD_HUGE_2MB), then ftruncate() the file and mmap() it shared.
Each step can fail, and QEMU 10.0.2 reports each with its own text, all reproduced here (the errno text is
the kernel's, so the emulator fails for the same reasons QEMU does):

- hugetlbsize=0 is refused when the property is set: "Property 'memory-backend-memfd.hugetlbsize' doesn't
  take value '0'";
- a hugetlbsize that is not a power of two: "Hugepage size must be a power of 2" (checked even with
  hugetlb=off; a size whose lowest set bit is bit 0, such as 1, counts as 'the default size');
- a power of two this kernel has no pool for: "failed to create memfd with flags 0x58000007: No such device";
- a size that is not a multiple of the page size: "failed to resize memfd to 269484032: Invalid argument";
- a pool with too few free pages: "unable to map backing store for guest RAM: Cannot allocate memory".
"""

from __future__ import annotations

import fcntl
import mmap
import os

MFD_HUGE_SHIFT = 26  # linux/memfd.h: log2(page size) sits in flags bits 26..31
# QEMU seals a memfd backend by default (seal=on): it may neither grow nor shrink, and no seal may be added
MEMFD_BACKEND_SEALS = fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL


class MemfdError(Exception):
    """memfd creation or mapping failed; the text is QEMU's."""


def check_hugetlbsize(value: int) -> None:
    """memfd_backend_set_hugetlbsize(): 0 is refused when the property is set."""
    if value == 0:
        raise MemfdError("Property 'memory-backend-memfd.hugetlbsize' doesn't take value '0'")


def memfd_flags(hugetlb: bool, hugetlbsize: int, seals: int) -> int:
    """The flags qemu_memfd_create() passes to memfd_create(). The page size goes in as its number of
    trailing zero bits; a size that is not a power of two is refused before hugetlb is even looked at."""
    htsize = (hugetlbsize & -hugetlbsize).bit_length() - 1 if hugetlbsize else 0
    if htsize and 1 << htsize != hugetlbsize:
        raise MemfdError("Hugepage size must be a power of 2")
    flags = os.MFD_CLOEXEC
    if seals:
        flags |= os.MFD_ALLOW_SEALING
    if hugetlb:
        flags |= os.MFD_HUGETLB | (htsize << MFD_HUGE_SHIFT)
    return flags


def qemu_memfd_create(name: str, size: int, hugetlb: bool, hugetlbsize: int, seals: int) -> int:
    """util/memfd.c's qemu_memfd_create(): create, size and seal a memfd; QEMU's texts on failure."""
    flags = memfd_flags(hugetlb, hugetlbsize, seals)
    try:
        fd = os.memfd_create(name, flags)
    except OSError as e:
        raise MemfdError(f"failed to create memfd with flags 0x{flags:x}: {e.strerror}") from None
    try:
        try:
            os.ftruncate(fd, size)
        except OSError as e:
            raise MemfdError(f"failed to resize memfd to {size}: {e.strerror}") from None
        if seals:
            try:
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            except OSError as e:
                raise MemfdError(f"failed to add seals 0x{seals:x}: {e.strerror}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def map_backing_store(fd: int, length: int) -> mmap.mmap:
    """qemu_ram_mmap() of a shared fd. For hugetlb the kernel reserves every page here, so an empty or too
    small pool fails now, as file_ram_alloc() reports it."""
    try:
        return mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as e:
        raise MemfdError(f"unable to map backing store for guest RAM: {e.strerror}") from None


def fd_page_size(fd: int) -> int:
    """The page size a file's memory comes in: st_blksize is the huge page size on hugetlbfs, and the base
    page size elsewhere. A destination uses it to learn what an fd adopted over CPR holds."""
    return os.fstat(fd).st_blksize
