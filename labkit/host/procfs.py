"""What /proc says about a process: its mappings, its fds, and which physical pages back them.

This is how a learner can *see* cpr-transfer: after the migration the new VM process maps the very
same memfd (same inode in ``/proc/PID/maps``) at a different virtual address, and the pages behind
both mappings are the same physical frames (same PFN in ``/proc/PID/pagemap``).

* ``/proc/PID/maps`` - one line per mapping: ``start-end perms offset dev inode path``
  (psutil's memory_maps drops offset and inode, hence the small parser here).
* ``/proc/PID/fd/N`` - a magic link: readlink gives ``/memfd:NAME (deleted)``, ``socket:[INODE]``,
  ``pipe:[INODE]``, ``anon_inode:[eventfd]`` or a path; stat() through it reaches the open file.
* ``/proc/PID/pagemap`` - 8 bytes per virtual page: bit 63 "present", bits 0-54 the page frame
  number.  Since Linux 4.2 the PFN reads as 0 without CAP_SYS_ADMIN, so PFNs need root.
"""

from __future__ import annotations

import mmap
import os
import re
import stat
import struct
from dataclasses import dataclass

__all__ = [
    "Mapping",
    "FdInfo",
    "parse_maps_line",
    "read_maps",
    "ram_block_mappings",
    "read_fds",
    "memfd_fds",
    "page_frames",
    "sample_frames",
    "PAGE_SIZE",
]

PAGE_SIZE = mmap.PAGESIZE
_PM_PRESENT = 1 << 63
_PM_PFN_MASK = (1 << 55) - 1

_MAPS_LINE = re.compile(
    r"^(?P<start>[0-9a-f]+)-(?P<end>[0-9a-f]+)\s+(?P<perms>\S{4})\s+(?P<offset>[0-9a-f]+)\s+"
    r"(?P<dev>[0-9a-f]+:[0-9a-f]+)\s+(?P<inode>\d+)\s*(?P<path>.*)$"
)


@dataclass
class Mapping:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    perms: str
    offset: int
    dev: str
    inode: int
    path: str

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def shared(self) -> bool:
        """``s`` in the permissions: writes reach the file (and every other mapping of it)."""
        return self.perms[3:4] == "s"


def _proc(pid: int | str) -> str:
    return f"/proc/{pid}"


def parse_maps_line(line: str) -> Mapping | None:
    """One line of /proc/PID/maps, or the header line of one mapping in /proc/PID/smaps (the same fields);
    None for any other line (smaps' ``Key: value kB`` lines)."""
    m = _MAPS_LINE.match(line.rstrip("\n"))
    if m is None:
        return None
    return Mapping(
        start=int(m["start"], 16),
        end=int(m["end"], 16),
        perms=m["perms"],
        offset=int(m["offset"], 16),
        dev=m["dev"],
        inode=int(m["inode"]),
        path=m["path"],
    )


def read_maps(pid: int | str) -> list[Mapping]:
    """Parse /proc/PID/maps (``pid`` may be ``"self"``)."""
    with open(f"{_proc(pid)}/maps") as f:
        return [m for m in map(parse_maps_line, f) if m is not None]


def _memfd_paths(name: str) -> tuple[str, ...]:
    return (f"/memfd:{name} (deleted)", f"/memfd:{name}", name, f"{name} (deleted)")


def ram_block_mappings(pid: int | str, names: list[str]) -> dict[str, Mapping]:
    """The mapping of each RAM block, found by path: ``/memfd:NAME (deleted)`` or a file path.

    When a memfd is mapped more than once, the largest mapping wins (then the lowest address).
    Names without a mapping are left out of the result.
    """
    maps = read_maps(pid)
    out: dict[str, Mapping] = {}
    for name in names:
        paths = _memfd_paths(name)
        found = [m for m in maps if m.path in paths]
        if found:
            out[name] = min(found, key=lambda m: (-m.size, m.start))
    return out


@dataclass
class FdInfo:
    """One open file descriptor of a process, as /proc shows it."""

    fd: int
    target: str
    inode: int | None
    size: int | None
    kind: str  # memfd | file | socket | pipe | anon | other

    @property
    def memfd_name(self) -> str | None:
        if self.kind != "memfd":
            return None
        return self.target[len("/memfd:") :].removesuffix(" (deleted)")


def _kind(target: str, mode: int | None) -> str:
    if target.startswith("/memfd:"):
        return "memfd"
    if target.startswith("socket:") or (mode is not None and stat.S_ISSOCK(mode)):
        return "socket"
    if target.startswith("pipe:") or (mode is not None and stat.S_ISFIFO(mode)):
        return "pipe"
    if target.startswith("anon_inode:"):
        return "anon"
    if mode is not None and stat.S_ISREG(mode):
        return "file"
    return "other"


def read_fds(pid: int | str) -> list[FdInfo]:
    """Every open fd of ``pid``: readlink of /proc/PID/fd/N, plus stat through it where permitted.

    Fds that close while we look are skipped; inode/size are None when stat is not permitted
    (size is only given for memfds and regular files).
    """
    base = f"{_proc(pid)}/fd"
    out = []
    for entry in os.listdir(base):
        try:
            fd = int(entry)
            target = os.readlink(f"{base}/{entry}")
        except (ValueError, FileNotFoundError):
            continue
        inode: int | None = None
        mode: int | None = None
        size: int | None = None
        try:
            st = os.stat(f"{base}/{entry}")
            inode, mode = st.st_ino, st.st_mode
            size = st.st_size if stat.S_ISREG(st.st_mode) else None
        except (FileNotFoundError, PermissionError):
            pass  # gone, or not ours to stat: the fd is still listed
        out.append(FdInfo(fd, target, inode, size, _kind(target, mode)))
    out.sort(key=lambda i: i.fd)
    return out


def memfd_fds(pid: int | str) -> list[FdInfo]:
    """Only the memfds among ``read_fds(pid)``."""
    return [i for i in read_fds(pid) if i.kind == "memfd"]


def page_frames(pid: int | str, addrs: list[int]) -> list[int | None]:
    """Physical page frame number behind each virtual address, from /proc/PID/pagemap.

    None when the page is not present in the process's page table (never touched, or swapped),
    or when the kernel hides PFNs (not root: they read as 0).
    """
    out: list[int | None] = []
    with open(f"{_proc(pid)}/pagemap", "rb", buffering=0) as f:
        for addr in addrs:
            f.seek((addr // PAGE_SIZE) * 8)
            raw = f.read(8)
            if len(raw) != 8:
                out.append(None)
                continue
            (entry,) = struct.unpack("<Q", raw)
            pfn = entry & _PM_PFN_MASK
            out.append(pfn if entry & _PM_PRESENT and pfn else None)
    return out


def sample_frames(pid: int | str, mapping: Mapping, n: int = 8) -> list[tuple[int, int | None]]:
    """``(page index, pfn)`` for ``n`` pages spread evenly over a mapping (first and last included)."""
    pages = mapping.size // PAGE_SIZE
    if pages <= 0 or n <= 0:
        return []
    if pages <= n:
        indexes = list(range(pages))
    elif n == 1:
        indexes = [0]
    else:
        indexes = sorted({round(i * (pages - 1) / (n - 1)) for i in range(n)})
    pfns = page_frames(pid, [mapping.start + i * PAGE_SIZE for i in indexes])
    return list(zip(indexes, pfns, strict=True))
