"""The host's huge page pools (/sys/kernel/mm/hugepages) and the page size a mapping really got (smaps).

A hugetlb memfd (memory-backend-memfd,hugetlb=on) takes its pages from a pool that root sets aside in
advance (`nr_hugepages`), never from ordinary free memory. A shared mapping reserves all of its pages when it
is mapped, so a guest larger than the pool's free pages fails at start: QEMU says "unable to map backing store
for guest RAM: Cannot allocate memory". The lab reads the pools before it starts anything, `labkit doctor`
shows them and `labkit hugepages` sets one.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from labkit.errors import LabkitError
from labkit.host.procfs import Mapping, parse_maps_line
from labkit.qemu_syntax import KiB, SizeError, format_size, human_size, parse_size

SYSFS_HUGEPAGES = "/sys/kernel/mm/hugepages"
_POOL_DIR = re.compile(r"^hugepages-(\d+)kB$")


class HugePageError(LabkitError):
    """A pool that cannot be read or set as asked; its text is the one line a user sees."""


@dataclass(frozen=True)
class HugePagePool:
    """One /sys/kernel/mm/hugepages/hugepages-<size>kB directory: pages of one size, as the kernel counts them.

    `free` still counts pages that a mapping has reserved but not yet touched; `reserved` are those. What a
    new mapping can still reserve is therefore free - reserved, plus what overcommit may add on demand."""

    page_size: int  # bytes
    total: int  # nr_hugepages: the persistent pool
    free: int  # free_hugepages
    reserved: int  # resv_hugepages: promised to existing mappings, not yet faulted
    surplus: int  # surplus_hugepages: allocated beyond the pool through overcommit
    overcommit: int  # nr_overcommit_hugepages: how many surplus pages the kernel may allocate on demand

    @property
    def available(self) -> int:
        """Pages a new shared mapping can reserve now."""
        return max(0, self.free - self.reserved) + max(0, self.overcommit - self.surplus)

    @property
    def path(self) -> str:
        return f"{SYSFS_HUGEPAGES}/hugepages-{self.page_size // KiB}kB"

    @property
    def label(self) -> str:
        """'2 MiB', '1 GiB': how the lab names a page size to people."""
        return human_size(self.page_size).replace(".0 ", " ")

    def describe(self) -> str:
        extra = f", overcommit {self.overcommit}" if self.overcommit else ""
        return f"{self.label}: {self.total} total, {self.free} free, {self.reserved} reserved{extra}"

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "available": self.available}

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> HugePagePool:
        """The inverse of to_dict (what `labkit doctor --json` carries)."""
        return cls(**{k: v for k, v in d.items() if k != "available"})


def _read_int(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())


def read_pools(root: str = SYSFS_HUGEPAGES) -> list[HugePagePool]:
    """Every huge page size this kernel offers, smallest first; [] where the kernel has no hugetlbfs."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    pools = []
    for name in names:
        m = _POOL_DIR.match(name)
        if not m:
            continue
        d = os.path.join(root, name)
        try:
            pools.append(
                HugePagePool(
                    page_size=int(m.group(1)) * KiB,
                    total=_read_int(f"{d}/nr_hugepages"),
                    free=_read_int(f"{d}/free_hugepages"),
                    reserved=_read_int(f"{d}/resv_hugepages"),
                    surplus=_read_int(f"{d}/surplus_hugepages"),
                    overcommit=_read_int(f"{d}/nr_overcommit_hugepages"),
                )
            )
        except (OSError, ValueError):
            continue
    return sorted(pools, key=lambda p: p.page_size)


def parse_page_size(text: str | int, what: str = "hugetlb (--hugetlb)") -> int:
    """A huge page size as QEMU's hugetlbsize= takes it ('2M', '1G'), checked against this host's pools."""
    try:
        size = parse_size(text, "m") if isinstance(text, str) else parse_size(text)
    except SizeError as e:
        raise HugePageError(f"{what}: {e}") from None
    pools = read_pools()
    if not any(p.page_size == size for p in pools):
        have = ", ".join(format_size(p.page_size) for p in pools) or "none (no hugetlbfs in this kernel)"
        raise HugePageError(f"{what} {format_size(size)}: this host's huge page sizes are {have}")
    return size


def pool_for(page_size: int) -> HugePagePool:
    """The pool of one page size; HugePageError if this kernel has none."""
    for p in read_pools():
        if p.page_size == page_size:
            return p
    raise HugePageError(f"no {human_size(page_size)} huge page pool in {SYSFS_HUGEPAGES}")


def pages_for(size: int, page_size: int) -> int:
    """Huge pages needed to hold `size` bytes (rounded up)."""
    return -(-size // page_size)


def reserve_command(pool: HugePagePool, pages: int) -> str:
    """The exact shell command that sets a pool to `pages` pages, for a user who is not root."""
    return f"echo {pages} | sudo tee {pool.path}/nr_hugepages"


def set_pool(page_size: int, pages: int) -> HugePagePool:
    """Set a pool's persistent size (root only) and return it as the kernel left it.

    The kernel may give fewer pages than asked when free memory is too fragmented to find contiguous
    huge pages; the caller compares `total` with what it asked for."""
    pool = pool_for(page_size)
    try:
        with open(f"{pool.path}/nr_hugepages", "w") as f:
            f.write(f"{pages}\n")
    except PermissionError:
        raise HugePageError(
            f"setting the {pool.label} pool needs root ({pool.path}/nr_hugepages is writable by root only): "
            f"run `{reserve_command(pool, pages)}`"
        ) from None
    except OSError as e:
        raise HugePageError(f"cannot set {pool.path}/nr_hugepages to {pages}: {e.strerror}") from None
    return pool_for(page_size)


@contextlib.contextmanager
def pool_reserved(page_size: int, pages: int) -> Iterator[HugePagePool]:
    """Make at least `pages` pages of this size available for the block's duration, then put nr_hugepages
    back as it was (root only). Pages already free count: the pool grows only by what is missing."""
    before = pool_for(page_size)
    missing = pages - before.available
    if missing <= 0:
        yield before
        return
    try:
        after = set_pool(page_size, before.total + missing)
        if after.available < pages:
            raise HugePageError(
                f"asked the kernel for {before.total + missing} {after.label} pages, it gave {after.total} "
                "(free memory too fragmented for contiguous huge pages)"
            )
        yield after
    finally:
        with contextlib.suppress(HugePageError):
            set_pool(page_size, before.total)


# ------------------------------------------------------------------------------------------ smaps


@dataclass
class SmapsEntry(Mapping):
    """One mapping in /proc/PID/smaps: its maps line (smaps' header line has the same fields, parsed once in
    labkit.host.procfs), and the page-size facts smaps adds below it."""

    kernel_page_size: int  # bytes: the page size the kernel backs this mapping with
    mmu_page_size: int
    hugetlb_bytes: int  # Shared_Hugetlb + Private_Hugetlb: huge pages mapped now


def read_smaps(pid: int | str) -> list[SmapsEntry]:
    """Every mapping of a process with its KernelPageSize: 4 kB for ordinary memory, 2048 kB for a 2 MiB
    hugetlb mapping. This is where one sees which page size guest RAM really got."""
    entries: list[SmapsEntry] = []
    cur: dict[str, int] = {}
    head: Mapping | None = None

    def flush() -> None:
        if head is not None:
            entries.append(
                SmapsEntry(
                    **vars(head),
                    kernel_page_size=cur.get("KernelPageSize", 4) * KiB,
                    mmu_page_size=cur.get("MMUPageSize", 4) * KiB,
                    hugetlb_bytes=(cur.get("Shared_Hugetlb", 0) + cur.get("Private_Hugetlb", 0)) * KiB,
                )
            )

    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            mapping = parse_maps_line(line)
            if mapping is not None:
                flush()
                head, cur = mapping, {}
                continue
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[-1] == "kB":
                cur[key] = int(parts[0])
    flush()
    return entries


def kernel_page_size(pid: int | str, inode: int) -> int | None:
    """KernelPageSize of the process's mappings of one file (a guest RAM memfd), or None if not mapped."""
    sizes = {e.kernel_page_size for e in read_smaps(pid) if e.inode == inode and inode}
    return max(sizes) if sizes else None
