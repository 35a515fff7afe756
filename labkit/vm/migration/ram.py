"""RAM migration (QEMU's migration/ram.c): which blocks are sent, the dirty bitmaps of each pass, the bandwidth
limit, and RAM's records on the main stream, written and read.

Pass 1 sends every page (ram_list_init_bitmaps starts with all bits set); each later pass sends the pages the
guest dirtied since the previous bitmap sync. Contiguous dirty pages go out as runs straight from the mapping
(numpy finds the runs and the zero pages; no per-page Python work). max-bandwidth is enforced per 100 ms
window (BUFFER_DELAY), as QEMU's rate limiter does. On the wire, each page is one record (see stream.py's
layout): the writer builds a chunk's record headers in one numpy step; runs of plain page records go both
ways in one numpy step (ram_runs.py), and the reader takes everything else record by record.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from labkit.errors import LabkitError
from labkit.vm.migration.interface import MigratableRAMBlock
from labkit.vm.migration.qapi import MigMode
from labkit.vm.migration.qemu_file import QEMUFileIn, QEMUFileOut, StreamError, counted_string
from labkit.vm.migration.ram_runs import load_page_run, load_zero_run, put_page_run
from labkit.vm.migration.savevm import (
    QEMU_VM_SECTION_END,
    QEMU_VM_SECTION_PART,
    QEMU_VM_SECTION_START,
    LoadStats,
    SectionRecord,
    save_section_footer,
    save_section_header,
)

PAGE_SIZE = 4096  # TARGET_PAGE_SIZE on x86
TARGET_PAGE_BITS = 12
TARGET_PAGE_MASK = ~(PAGE_SIZE - 1)
BUFFER_DELAY = 0.1  # seconds: the rate limiter's window (migration.h BUFFER_DELAY 100 ms)
CHUNK_PAGES = 1024  # 4 MiB: the most sent between two checks of the rate limit and of cancel


class MigrationCancelled(LabkitError):
    """migrate_cancel (or quit) reached the migration thread: it stops where it is and unwinds to its
    cleanup, which restarts a guest it stopped and reports `cancelled`."""


def migrate_ram_is_ignored(block: MigratableRAMBlock, mode: MigMode, ignore_shared: bool) -> bool:
    """migrate_ram_is_ignored(): every block in cpr-transfer and cpr-exec; shared named files with x-ignore-shared."""
    return mode in ("cpr-transfer", "cpr-exec") or (ignore_shared and block.shared and block.named_file)


@dataclass
class RAMStats:
    """The counters query-migrate shows under "ram"."""

    total: int = 0
    transferred: int = 0
    duplicate: int = 0
    normal: int = 0
    dirty_sync_count: int = 0
    remaining: int = 0
    dirty_pages_rate: int = 0
    mbps: float = 0.0
    precopy_bytes: int = 0
    downtime_bytes: int = 0
    pages_per_pass: list[int] = field(default_factory=list)
    bytes_per_pass: list[int] = field(default_factory=list)
    seconds_per_pass: list[float] = field(default_factory=list)

    def to_qmp(self) -> dict[str, Any]:
        return {
            "transferred": self.transferred,
            "remaining": self.remaining,
            "total": self.total,
            "duplicate": self.duplicate,
            "normal": self.normal,
            "normal-bytes": self.normal * PAGE_SIZE,
            "dirty-pages-rate": self.dirty_pages_rate,
            "mbps": round(self.mbps, 3),
            "dirty-sync-count": self.dirty_sync_count,
            "page-size": PAGE_SIZE,
            "multifd-bytes": 0,
            "pages-per-second": 0,
            "precopy-bytes": self.precopy_bytes,
            "downtime-bytes": self.downtime_bytes,
            "postcopy-bytes": 0,
            "postcopy-requests": 0,
            "dirty-sync-missed-zero-copy": 0,
        }


class RateLimiter:
    """At most max_bandwidth bytes per second, counted in 100 ms windows; 0 disables the limit."""

    def __init__(self, max_bandwidth: int, cancelled: threading.Event):
        self.max_bandwidth = max_bandwidth
        self.cancelled = cancelled
        self.window_start = time.monotonic()
        self.window_bytes = 0

    def __call__(self, nbytes: int) -> None:
        if self.cancelled.is_set():
            raise MigrationCancelled()
        if not self.max_bandwidth:
            return
        now = time.monotonic()
        if now - self.window_start >= BUFFER_DELAY:
            self.window_start, self.window_bytes = now, 0
        quota = self.max_bandwidth * BUFFER_DELAY
        if self.window_bytes and self.window_bytes + nbytes > quota:
            wait = self.window_start + BUFFER_DELAY - now
            if wait > 0:
                self.cancelled.wait(wait)
                if self.cancelled.is_set():
                    raise MigrationCancelled()
            self.window_start, self.window_bytes = time.monotonic(), 0
        self.window_bytes += nbytes


class RAMState:
    """The source's view of RAM during one migration: blocks sent, their migration bitmaps, the counters."""

    def __init__(self, blocks: list[MigratableRAMBlock], stats: RAMStats):
        self.blocks = blocks
        self.stats = stats
        self.bitmaps = {b.idstr: np.ones(b.npages, dtype=np.uint8) for b in blocks}
        self.last_sync = time.monotonic()
        stats.total = sum(b.size for b in blocks)
        stats.remaining = stats.total

    def bitmap_sync(self) -> int:
        """migration_bitmap_sync(): fold the guest's dirty log into the migration bitmaps; returns new pages."""
        now = time.monotonic()
        new = 0
        for b in self.blocks:
            taken = b.dirty_sync()
            new += int(np.count_nonzero(taken & (self.bitmaps[b.idstr] == 0)))
            np.bitwise_or(self.bitmaps[b.idstr], taken, out=self.bitmaps[b.idstr])
        elapsed = max(now - self.last_sync, 1e-6)
        self.stats.dirty_pages_rate = int(new / elapsed)
        self.last_sync = now
        self.stats.dirty_sync_count += 1
        self.stats.remaining = self.dirty_pages() * PAGE_SIZE
        return new

    def dirty_pages(self) -> int:
        return int(sum(np.count_nonzero(bm) for bm in self.bitmaps.values()))

    def save_dirty(self, f: QEMUFileOut, downtime: bool, cancelled: threading.Event) -> int:
        """Send every page marked in the migration bitmaps, as runs; clear the bits as they go. Returns pages."""
        sent_pages = 0
        t0, b0 = time.monotonic(), f.bytes_sent
        for b in self.blocks:
            bm = self.bitmaps[b.idstr]
            idx = np.flatnonzero(bm)
            if idx.size == 0:
                continue
            view = b.view()
            breaks = np.flatnonzero(np.diff(idx) != 1)
            starts = idx[np.concatenate(([0], breaks + 1))]
            ends = idx[np.concatenate((breaks, [idx.size - 1]))] + 1
            for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
                for first in range(start, end, CHUNK_PAGES):
                    if cancelled.is_set():
                        raise MigrationCancelled()
                    last = min(end, first + CHUNK_PAGES)
                    bm[first:last] = 0  # clear before sending: a write after this point dirties it again
                    before = f.bytes_sent
                    normal, zero = ram_save_pages(
                        f, b.idstr, first, view[first * PAGE_SIZE : last * PAGE_SIZE]
                    )
                    self._count(f.bytes_sent - before, normal, zero, downtime)
                    self.stats.remaining = max(0, self.stats.remaining - (last - first) * PAGE_SIZE)
                    sent_pages += last - first
        f.flush()
        self.stats.pages_per_pass.append(sent_pages)
        self.stats.bytes_per_pass.append(f.bytes_sent - b0)
        self.stats.seconds_per_pass.append(time.monotonic() - t0)
        return sent_pages

    def _count(self, nbytes: int, normal: int, zero: int, downtime: bool) -> None:
        s = self.stats
        s.transferred += nbytes
        s.normal += normal
        s.duplicate += zero
        if downtime:
            s.downtime_bytes += nbytes
        else:
            s.precopy_bytes += nbytes

# ------------------------------------------------------------------------------------------------------------
# RAM's records on the main stream (ram_save_setup / ram_save_target_page / ram_load_precopy)

# ram.c / ram.h
RAM_SAVE_FLAG_ZERO = 0x002
RAM_SAVE_FLAG_MEM_SIZE = 0x004
RAM_SAVE_FLAG_PAGE = 0x008
RAM_SAVE_FLAG_EOS = 0x010
RAM_SAVE_FLAG_CONTINUE = 0x020
RAM_SECTION_IDSTR = "ram"
RAM_SECTION_VERSION = 4  # register_savevm_live("ram", 0, 4, ...)

#: Pages examined for zero pages, then sent, in one step: about the size of a core's L2 cache, so the
#: bytes numpy has just read are still in cache when the kernel copies them into the socket.
RAM_SAVE_CHUNK_PAGES = 256
#: Most RAM blocks a START section may list (a guard against hostile streams).
MAX_RAM_BLOCKS = 4096

_HDR = np.dtype(">u8")


def ram_save_setup(f: QEMUFileOut, blocks: list[tuple[str, int]]) -> None:
    """The RAM START section: total size, then every migratable block's name and used length (ram_save_setup()).

    Ignored blocks are listed too (cpr-transfer ignores them all): QEMU lists every migratable block."""
    if f.savevm.ram_section is not None:
        raise ValueError("a RAM section is still open")
    names = [n for n, _ in blocks]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate RAM block names in {names}")
    for name, length in blocks:
        if length < 0 or length % PAGE_SIZE:
            raise ValueError(f"RAM block {name} length {length:#x} is not a multiple of {PAGE_SIZE}")
    sid = save_section_header(f, QEMU_VM_SECTION_START, RAM_SECTION_IDSTR, 0, RAM_SECTION_VERSION)
    f.put_be64(sum(length for _, length in blocks) | RAM_SAVE_FLAG_MEM_SIZE)
    for name, length in blocks:
        f.put_counted_string(name)
        f.put_be64(length)
    f.put_be64(RAM_SAVE_FLAG_EOS)
    save_section_footer(f, sid)
    f.savevm.ram_blocks = dict(blocks)
    f.savevm.ram_started = True
    f.savevm.last_sent_block = None  # ram_state_reset(); from here on the chain spans sections, as QEMU's


def _ram_section_open(f: QEMUFileOut, section_type: int) -> None:
    if f.savevm.ram_section is not None:
        if f.savevm.ram_section != section_type:
            raise ValueError("another RAM section is still open")
        return
    if not f.savevm.ram_started:
        raise ValueError("ram_save_setup() must come first")
    save_section_header(f, section_type, RAM_SECTION_IDSTR, 0, RAM_SECTION_VERSION)
    f.savevm.ram_section = section_type


def _ram_section_close(f: QEMUFileOut) -> None:
    f.put_be64(RAM_SAVE_FLAG_EOS)
    save_section_footer(f, f.savevm.section_id(RAM_SECTION_IDSTR, 0))
    f.savevm.ram_section = None


def ram_save_iterate_end(f: QEMUFileOut) -> None:
    """EOS and footer close the pass's PART section (an empty PART is sent if nothing was, as QEMU does)."""
    if f.savevm.ram_section is None:
        _ram_section_open(f, QEMU_VM_SECTION_PART)
    _ram_section_close(f)


def ram_save_complete_start(f: QEMUFileOut) -> None:
    """Open the QEMU_VM_SECTION_END that carries the last dirty pages while the VM is stopped."""
    _ram_section_open(f, QEMU_VM_SECTION_END)


def ram_save_complete_end(f: QEMUFileOut) -> None:
    """Close the END section (ram_save_complete()); an END with no page is still sent, as QEMU sends it."""
    if f.savevm.ram_section is None:
        _ram_section_open(f, QEMU_VM_SECTION_END)
    _ram_section_close(f)


def _nonzero_pages(pages: np.ndarray) -> np.ndarray:
    """Per page (a row of uint64 words): does it hold any nonzero byte? (QEMU's buffer_is_zero(), negated.)

    A page whose first or last word is nonzero is decided without reading the rest, which settles almost
    every page of real data at the cost of two strided reads; only the other pages are scanned in full.
    """
    nz = (pages[:, 0] != 0) | (pages[:, -1] != 0)
    if nz.all():
        return cast(np.ndarray, nz)
    undecided = np.flatnonzero(~nz)
    if len(undecided) * 4 > len(nz):  # mostly zero-looking: one pass over the chunk beats gathering rows
        return cast(np.ndarray, pages.any(axis=1))
    if len(undecided):
        nz[undecided] = pages[undecided].any(axis=1)
    out: np.ndarray = nz
    return out


def _chunk_records(first_page: int, nz: np.ndarray, name: bytes | None) -> tuple[np.ndarray, list[int]]:
    """Every record of a chunk but the page data, laid out as on the wire, in one buffer.

    Per page: ``be64 offset|flags``, the counted block name on the first record when ``name`` is given
    (otherwise RAM_SAVE_FLAG_CONTINUE), then a fill byte 0 for a zero page (save_zero_page()). Returns the
    buffer and, for each normal page, where its header ends (where its 4 KiB go on the wire)."""
    n = len(nz)
    lens = np.where(nz, 8, 9)
    if name is not None:
        lens[0] += len(name)
    ends = np.cumsum(lens)
    starts = ends - lens
    meta = np.zeros(int(ends[-1]), dtype=np.uint8)
    flags = np.where(nz, RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_ZERO) | RAM_SAVE_FLAG_CONTINUE
    if name is not None:
        flags[0] &= ~RAM_SAVE_FLAG_CONTINUE
    offsets = np.arange(first_page, first_page + n, dtype=np.uint64) * np.uint64(PAGE_SIZE)
    hdr = (offsets | flags.astype(np.uint64)).astype(_HDR).view(np.uint8).reshape(n, 8)
    meta[starts[:, None] + np.arange(8)] = hdr
    if name is not None:
        meta[8 : 8 + len(name)] = np.frombuffer(name, dtype=np.uint8)
    return meta, ends[nz].tolist()


def ram_save_pages(
    f: QEMUFileOut, block: str, first_page: int, data: memoryview, *, detect_zero: bool = True
) -> tuple[int, int]:
    """Send ``len(data) // PAGE_SIZE`` contiguous pages of ``block`` starting at page ``first_page``.

    One record per page, as ram_save_target_page() sends it: zero pages as a header and a fill byte
    (save_zero_page()), the rest as a header and the page. The headers of a chunk are built in one numpy
    step; the pages go to the kernel straight from guest RAM, between them (one ``sendmsg``, no copy).
    Returns (normal_pages, zero_pages).
    """
    data = memoryview(data).cast("B")
    if len(data) % PAGE_SIZE:
        raise ValueError(f"data length {len(data)} is not a multiple of {PAGE_SIZE}")
    npages = len(data) // PAGE_SIZE
    length = f.savevm.ram_blocks.get(block)
    if length is None:
        raise ValueError(f"Unknown RAM block {block}")
    if first_page < 0 or (first_page + npages) * PAGE_SIZE > length:
        raise ValueError(f"pages {first_page}..{first_page + npages} are beyond RAM block {block}")
    if f.savevm.ram_section is None:
        _ram_section_open(f, QEMU_VM_SECTION_PART)
    normal = zero = 0
    step = RAM_SAVE_CHUNK_PAGES  # also without zero detection, so rate_limit() sees chunk-sized sends
    for c0 in range(0, npages, step):
        c1 = min(c0 + step, npages)
        chunk = data[c0 * PAGE_SIZE : c1 * PAGE_SIZE]
        name = None if f.savevm.last_sent_block == block else counted_string(block)
        f.savevm.last_sent_block = block
        # real pages only: one buffer, one send (ram_runs.py); tried first while the chunks before had no
        # zero page, as it finds zero pages in its copy (a chunk with one is copied for nothing)
        if name is None and f.real_pages:
            nonzero = _nonzero_pages if detect_zero else None
            if put_page_run(f, first_page + c0, chunk, RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE, nonzero):
                normal += c1 - c0
                continue
        if detect_zero:
            nz = _nonzero_pages(np.frombuffer(chunk, dtype=np.uint64).reshape(c1 - c0, PAGE_SIZE // 8))
        else:
            nz = np.ones(c1 - c0, dtype=bool)
        f.real_pages = bool(nz.all())
        if name is None and f.real_pages:
            put_page_run(f, first_page + c0, chunk, RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE, None)
            normal += c1 - c0
            continue
        meta, header_ends = _chunk_records(first_page + c0, nz, name)
        mv = memoryview(meta)  # type: ignore[arg-type]  # numpy arrays are buffers; numpy's stubs say otherwise
        iov: list[bytes | memoryview] = []
        prev = 0
        for end, page in zip(header_ends, np.flatnonzero(nz).tolist(), strict=True):
            iov.append(mv[prev:end])
            iov.append(chunk[page * PAGE_SIZE : (page + 1) * PAGE_SIZE])
            prev = end
        normal += len(header_ends)
        zero += (c1 - c0) - len(header_ends)
        if iov:
            f.put_iov(iov)
        if prev < len(meta):  # trailing zero records wait in the small buffer for the next send
            f.put_bytes(mv[prev:])
    return normal, zero



@dataclass
class RamLoad:
    """Per-stream RAM state on the destination (ram_load_precopy()'s view of the RAM blocks)."""

    ram: Callable[[str], memoryview | None]
    zero_page_needs_write: Callable[[str], bool] | None
    lengths: dict[str, int] = field(default_factory=dict)
    views: dict[str, memoryview | None] = field(default_factory=dict)
    zero_check: dict[str, bool] = field(default_factory=dict)
    last_block: str | None = (
        None  # mis->last_recv_block: a CONTINUE may refer to the previous section's block
    )


_ZERO_PAGE = bytes(PAGE_SIZE)
_CONFIG_SUBSECTIONS = ("configuration/capabilities", "configuration/uuid")

def parse_ramblocks(
    f: QEMUFileIn,
    rl: RamLoad,
    stats: LoadStats,
    on_ram_blocks: Callable[[list[tuple[str, int]]], None] | None,
) -> None:
    """The block list of the START section; every block must exist here with the same length."""
    addr = f.get_be64()
    flags = addr & ~TARGET_PAGE_MASK
    total = addr & TARGET_PAGE_MASK
    if flags != RAM_SAVE_FLAG_MEM_SIZE:
        raise StreamError(f"Unknown combination of migration flags: 0x{flags:x}")
    blocks: list[tuple[str, int]] = []
    while total:
        if len(blocks) >= MAX_RAM_BLOCKS:
            raise StreamError(f"Too many RAM blocks (more than {MAX_RAM_BLOCKS})")
        name = f.get_counted_string()
        length = f.get_be64()
        if length > total or length % PAGE_SIZE:
            raise StreamError(f"Bad length 0x{length:x} for RAM block {name}")
        if name in rl.lengths:
            raise StreamError(f"RAM block {name} listed twice")
        rl.lengths[name] = length
        blocks.append((name, length))
        total -= length
    if f.get_be64() != RAM_SAVE_FLAG_EOS:
        raise StreamError("RAM setup section does not end with EOS")
    stats.ram_blocks = blocks
    if on_ram_blocks is not None:
        on_ram_blocks(blocks)
    for name, length in blocks:
        try:
            mv = rl.ram(name)
        except (KeyError, LookupError) as e:
            raise StreamError(f"Unknown RAM block {name}") from e
        if mv is not None:
            mv = memoryview(mv).cast("B")
            if mv.readonly:
                raise StreamError(f"RAM block {name} is read-only here")
            if len(mv) != length:
                raise StreamError(f"Length mismatch: {name}: 0x{length:x} in != 0x{len(mv):x}")
        rl.views[name] = mv
        rl.zero_check[name] = rl.zero_page_needs_write(name) if rl.zero_page_needs_write else True


def ram_load_precopy(f: QEMUFileIn, rl: RamLoad, rec: SectionRecord) -> None:
    """ram_load_precopy(): one record per page until EOS; a page lands straight in the block's memory.

    A ZERO page is written only where the memory is not zero already or the fill byte is not 0
    (ram_handle_zero()); a fresh mapping is known to be zero and is not even read."""
    name = rl.last_block
    limit = rl.lengths.get(name, 0) if name is not None else 0
    view = rl.views.get(name) if name is not None else None
    zero_check = rl.zero_check.get(name, True) if name is not None else True
    normal = zero = 0
    get_be64, get_byte, read_into = f.get_be64, f.get_byte, f.read_into  # one lookup, not one per page
    page_mask, continue_flag = TARGET_PAGE_MASK, RAM_SAVE_FLAG_CONTINUE
    run = RAM_SAVE_FLAG_PAGE  # the kind of run (ram_runs.py) worth trying: that of the last record
    try:
        while True:
            if run == RAM_SAVE_FLAG_PAGE and view is not None:
                normal += load_page_run(f, view, limit, RAM_SAVE_FLAG_PAGE | continue_flag)
            elif run and view is not None:
                zero += load_zero_run(f, view, limit, RAM_SAVE_FLAG_ZERO | continue_flag, zero_check)
            run = 0  # the run stopped at a record it does not take: that one goes the exact way
            addr = get_be64()
            flags = addr & ~page_mask
            addr &= page_mask
            if flags == RAM_SAVE_FLAG_PAGE | continue_flag and view is not None and addr + PAGE_SIZE <= limit:
                read_into(view[addr : addr + PAGE_SIZE])  # the common record, checked in one test
                normal += 1
                run = RAM_SAVE_FLAG_PAGE
                continue
            if flags == RAM_SAVE_FLAG_EOS:
                return
            kind = flags & ~RAM_SAVE_FLAG_CONTINUE
            if kind != RAM_SAVE_FLAG_PAGE and kind != RAM_SAVE_FLAG_ZERO:
                raise StreamError(f"Unknown combination of migration flags: 0x{flags:x}")
            if not flags & RAM_SAVE_FLAG_CONTINUE:
                name = f.get_counted_string()
                if name not in rl.lengths:
                    raise StreamError(f"Unknown RAM block {name}")
                limit, view, zero_check = rl.lengths[name], rl.views[name], rl.zero_check[name]
            elif name is None:
                raise StreamError("Ack, bad migration stream!")
            if addr + PAGE_SIZE > limit:
                raise StreamError(f"Illegal RAM offset {addr:x}")
            if kind == RAM_SAVE_FLAG_PAGE:
                if view is None:
                    f.skip(PAGE_SIZE)
                else:
                    f.read_into(view[addr : addr + PAGE_SIZE])
                normal += 1
                run = RAM_SAVE_FLAG_PAGE
            else:
                ch = get_byte()
                if view is not None and (ch or zero_check):
                    page = view[addr : addr + PAGE_SIZE]
                    if ch:
                        page[:] = bytes([ch]) * PAGE_SIZE
                    elif bytes(page) != _ZERO_PAGE:
                        page[:] = _ZERO_PAGE
                zero += 1
                run = RAM_SAVE_FLAG_ZERO
    finally:
        rl.last_block = name
        rec.normal_pages += normal
        rec.zero_pages += zero

