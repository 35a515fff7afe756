"""RAM migration: which blocks are sent, the dirty bitmaps of each pass, and bandwidth (QEMU's migration/ram.c).

Pass 1 sends every page (ram_list_init_bitmaps starts with all bits set); each later pass sends the pages the
guest dirtied since the previous bitmap sync. Contiguous dirty pages go out as runs straight from the mapping
(numpy finds the runs and the zero pages; no per-page Python work). max-bandwidth is enforced per 100 ms
window (BUFFER_DELAY), as QEMU's rate limiter does.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from labkit.vm.memory import PAGE_SIZE, RAMBlock
from labkit.vm.migration.stream import QEMUFileOut, ram_save_pages

BUFFER_DELAY = 0.1  # seconds: the rate limiter's window (migration.h BUFFER_DELAY 100 ms)
CHUNK_PAGES = 1024  # 4 MiB: the most sent between two checks of the rate limit and of cancel


class MigrationCancelled(Exception):
    pass


def migrate_ram_is_ignored(block: RAMBlock, mode: str, ignore_shared: bool) -> bool:
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

    def to_qmp(self) -> dict:
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

    def __init__(self, blocks: list[RAMBlock], stats: RAMStats):
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
