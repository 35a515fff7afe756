"""The emulated guest: a vCPU thread that writes guest RAM at a set rate, marks what it writes, and can prove it.

Guest memory layout (system RAM block, 4 KiB pages):

    page 0                 header: magic, heartbeat (seq, CLOCK_MONOTONIC ns, longest gap), counters,
                           the generation-table checksum, where the table and data pages start
    pages 1 .. 1+T         generation table: one uint32 per page of the block
    pages data0 .. end     data pages: a page p with generation g > 0 is filled with the uint64 (p << 32) | g;
                           generation 0 means never written, i.e. all zero

Everything needed to check the memory lives in the memory itself, so any process that holds the RAM (the
destination after migration, or a tool mapping the memfd through /proc/PID/fd) can prove that every page is
exactly what the guest wrote. Every write marks its page in the block's dirty bitmap *after* the write, under the
vCPU lock, so a migration pass that syncs the bitmap can never miss one (KVM's dirty log gives the same promise).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from labkit.qemu_syntax import GuestConfig
from labkit.vm.memory import PAGE_SIZE, RAMBlock

MAGIC = 0x31474B4954494B4C  # b"LKITKG1" little-endian-ish tag: marks a formatted guest header
U64_PER_PAGE = PAGE_SIZE // 8
TICK_S = 0.0005  # the vCPU wakes every 0.5 ms: the heartbeat's resolution
MAX_WRITE_PER_TICK = (
    256 << 10
)  # bytes: one tick stays ~0.1 ms, so `stop` quiesces fast; 256 KiB also stays in cache

# header fields: index of each uint64 in page 0
H_MAGIC, H_SEQ, H_HEARTBEAT_NS, H_MAX_GAP_NS, H_LAST_GAP_NS, H_BYTES, H_PAGES, H_GEN_SUM = range(8)
H_TABLE_FIRST, H_TABLE_PAGES, H_DATA_FIRST, H_NPAGES, H_TICKS = range(8, 13)
H_INFLIGHT = 13  # 1 while a slice of writes is under way: pages may be one generation ahead of the table


@dataclass
class CPUState:
    """The vCPU's registers as far as migration cares: what must travel in the "cpu" device section."""

    ticks: int = 0
    position: int = 0  # next page of the sequential pattern (relative to the working set)
    rng_state: dict[str, Any] | None = None
    budget: float = 0.0  # bytes owed to the dirty rate, carried between ticks


class Guest:
    """The workload running in one VM's system RAM block."""

    def __init__(self, block: RAMBlock, cfg: GuestConfig, fresh: bool = True):
        self.block = block
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)
        self.cpu = CPUState()
        npages = block.npages
        table_pages = (npages * 4 + PAGE_SIZE - 1) // PAGE_SIZE
        self.table_first = 1
        self.data_first = 1 + table_pages
        if self.data_first >= npages:
            raise ValueError(f"guest RAM of {block.size} bytes is too small for the guest's own tables")
        ws = cfg.working_set if cfg.working_set else block.size
        self.ws_pages = max(1, min(npages - self.data_first, ws // PAGE_SIZE))
        self.console: list[str] = []
        self.console_sink: Callable[[str], None] | None = None  # set by the serial device
        self.vm_clock_ns = 0
        self._attach()
        if fresh and self.header[H_MAGIC] != MAGIC:
            self._format()

    def _attach(self) -> None:
        arr = self.block.array()
        self.pages = arr.view(np.uint64).reshape(self.block.npages, U64_PER_PAGE)
        self.header = self.pages[0]
        start = self.table_first * PAGE_SIZE
        self.gen = arr[start : start + self.block.npages * 4].view(np.uint32)

    def _format(self) -> None:
        """What the guest's 'kernel' does at first boot: lay out its header."""
        h = self.header
        h[:] = 0
        h[H_MAGIC] = MAGIC
        h[H_TABLE_FIRST] = self.table_first
        h[H_TABLE_PAGES] = self.data_first - self.table_first
        h[H_DATA_FIRST] = self.data_first
        h[H_NPAGES] = self.block.npages
        self.block.mark_dirty(slice(0, 1))
        if self.cfg.prefill:  # a guest that has touched all its memory: no zero pages left to skip
            for start in range(self.data_first, self.block.npages, 4096):
                self.write_pages(slice(start, min(start + 4096, self.block.npages)))

    # -- the work of one tick -------------------------------------------------------------------------------
    def _pick_pages(self, n: int) -> np.ndarray | slice:
        ws = self.ws_pages
        n = min(n, ws)
        if self.cfg.pattern == "sequential":
            start = self.cpu.position
            end = start + n
            if end <= ws:
                self.cpu.position = end % ws
                return slice(self.data_first + start, self.data_first + end)
            idx = (np.arange(start, end) % ws) + self.data_first
            self.cpu.position = end % ws
            return idx
        if self.cfg.pattern == "random":
            idx = self.rng.integers(0, ws, n)
        else:  # hotset: four writes in five land in the first fifth of the working set
            hot = max(1, ws // 5)
            nhot = (n * 4) // 5
            idx = np.concatenate([self.rng.integers(0, hot, nhot), self.rng.integers(0, ws, n - nhot)])
        return np.unique(idx) + self.data_first

    def write_pages(self, sel: np.ndarray | slice) -> int:
        """Write a new generation into the selected pages; returns how many pages were written."""
        if isinstance(sel, slice):
            pnums = np.arange(sel.start, sel.stop, dtype=np.uint64)
        else:
            pnums = sel.astype(np.uint64)
        if pnums.size == 0:
            return 0
        old = self.gen[sel].astype(np.uint64)
        new = (old % 0xFFFFFFFF) + 1  # generations run 1..2^32-1; 0 stays "never written"
        h = self.header
        # Crash-consistent order, like a journal: flag, pages, table, checksum, unflag. A process killed in the
        # middle leaves pages at most one generation ahead of the table, with the flag telling verify so.
        h[H_INFLIGHT] = 1
        self.pages[sel] = ((pnums << np.uint64(32)) | new)[:, None]
        self.gen[sel] = new.astype(np.uint32)
        h[H_GEN_SUM] = (int(h[H_GEN_SUM]) + int(new.sum()) - int(old.sum())) & 0xFFFFFFFFFFFFFFFF
        h[H_PAGES] += np.uint64(pnums.size)
        h[H_BYTES] += np.uint64(pnums.size * PAGE_SIZE)
        h[H_INFLIGHT] = 0
        # mark after writing: a sync that races with us sees the page now or at the next sync, never not at all
        self.block.mark_dirty(sel)
        first_t = self.table_first + int(pnums.min()) * 4 // PAGE_SIZE
        last_t = self.table_first + int(pnums.max()) * 4 // PAGE_SIZE
        self.block.mark_dirty(slice(first_t, last_t + 1))
        return int(pnums.size)

    def heartbeat(self, now_ns: int) -> None:
        h = self.header
        last = int(h[H_HEARTBEAT_NS])
        if last:
            gap = now_ns - last
            h[H_LAST_GAP_NS] = gap
            if gap > int(h[H_MAX_GAP_NS]):
                h[H_MAX_GAP_NS] = gap
        h[H_HEARTBEAT_NS] = now_ns
        h[H_SEQ] += np.uint64(1)
        h[H_TICKS] = self.cpu.ticks
        self.block.mark_dirty(slice(0, 1))

    def tick(self, dt_s: float) -> None:
        """One slice of guest execution: dirty RAM at the configured rate and beat the heart."""
        self.cpu.ticks += 1
        self.vm_clock_ns += int(dt_s * 1e9)
        rate = self.cfg.dirty_rate
        if rate:
            self.cpu.budget = min(self.cpu.budget + rate * dt_s, float(MAX_WRITE_PER_TICK) * 4)
            n = int(min(self.cpu.budget, MAX_WRITE_PER_TICK) // PAGE_SIZE)
            if n:
                self.write_pages(self._pick_pages(n))
                self.cpu.budget -= n * PAGE_SIZE
        self.heartbeat(time.monotonic_ns())
        if self.vm_clock_ns // 1_000_000_000 != (self.vm_clock_ns - int(dt_s * 1e9)) // 1_000_000_000:
            self.serial_line(
                f"[{self.vm_clock_ns / 1e9:8.3f}] labkit guest: tick {self.cpu.ticks}, "
                f"heartbeat {int(self.header[H_SEQ])}, {int(self.header[H_BYTES]) >> 20} MiB written"
            )

    def serial_line(self, line: str) -> None:
        self.console.append(line)
        del self.console[:-200]
        if self.console_sink:
            self.console_sink(line)

    # -- what a host tool can ask ---------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        h = self.header
        return {
            "ticks": self.cpu.ticks,
            "heartbeat-seq": int(h[H_SEQ]),
            "heartbeat-ns": int(h[H_HEARTBEAT_NS]),
            "max-gap-ns": int(h[H_MAX_GAP_NS]),
            "last-gap-ns": int(h[H_LAST_GAP_NS]),
            "bytes-written": int(h[H_BYTES]),
            "pages-written": int(h[H_PAGES]),
            "dirty-rate": self.cfg.dirty_rate,
            "pattern": self.cfg.pattern,
            "working-set": self.ws_pages * PAGE_SIZE,
            "vm-clock-ns": self.vm_clock_ns,
        }

    def reset_gap(self) -> None:
        """Forget the longest gap seen so far, so the next one measured is the migration's pause."""
        self.header[H_MAX_GAP_NS] = 0


def verify_guest_memory(block: RAMBlock, chunk_pages: int = 16384) -> dict[str, Any]:
    """Check every page of the guest's RAM against the guest's own generation table and checksum.

    Works in any process that maps the block; the caller must make sure the vCPU is not writing meanwhile.
    """
    arr = block.array()
    pages = arr.view(np.uint64).reshape(block.npages, U64_PER_PAGE)
    h = pages[0]
    result = {
        "ok": False,
        "pages": block.npages,
        "written": 0,
        "bad-pages": [],
        "checksum-ok": False,
        "header-ok": bool(h[H_MAGIC] == MAGIC),
    }
    if not result["header-ok"]:
        result["error"] = "guest header missing (magic not found in page 0)"
        return result
    table_first, data_first = int(h[H_TABLE_FIRST]), int(h[H_DATA_FIRST])
    npages = int(h[H_NPAGES])
    if npages != block.npages or not 0 < table_first < data_first <= npages:
        result["error"] = "guest header inconsistent with the RAM block"
        return result
    gen = arr[table_first * PAGE_SIZE : table_first * PAGE_SIZE + npages * 4].view(np.uint32)
    inflight = bool(h[H_INFLIGHT])
    result["in-flight"] = inflight  # stopped (or killed) in the middle of a slice of writes
    # mid-slice the table and its checksum may disagree by that slice: the pages themselves are checked below
    result["checksum-ok"] = inflight or int(gen.astype(np.uint64).sum()) & 0xFFFFFFFFFFFFFFFF == int(
        h[H_GEN_SUM]
    )
    bad: list[int] = []
    written = 0
    for start in range(data_first, npages, chunk_pages):
        stop = min(npages, start + chunk_pages)
        g = gen[start:stop].astype(np.uint64)
        pn = np.arange(start, stop, dtype=np.uint64) << np.uint64(32)
        expect = np.where(g == 0, np.uint64(0), pn | g)
        good = (pages[start:stop] == expect[:, None]).all(axis=1)
        if inflight and not good.all():  # a page written with the next generation before the table was
            ahead = pn | ((g % 0xFFFFFFFF) + 1)
            good |= (pages[start:stop] == ahead[:, None]).all(axis=1)
        written += int(np.count_nonzero(g))
        if not good.all():
            bad.extend((np.nonzero(~good)[0] + start)[: 16 - len(bad)].tolist())
            if len(bad) >= 16:
                break
    result["written"] = written
    result["bad-pages"] = bad
    result["ok"] = result["checksum-ok"] and not bad
    return result


class VCPU(threading.Thread):
    """The thread that runs the guest, only while the VM is running (QEMU's vCPU thread, paused by `stop`)."""

    def __init__(self, guest: Guest):
        super().__init__(name="vcpu0", daemon=True)
        self.guest = guest
        self.lock = (
            threading.Lock()
        )  # held while the guest executes; `stop` waits for it: the vCPU is quiesced
        self._running = threading.Event()
        self._quit = False

    def resume(self) -> None:
        self._running.set()

    def pause(self) -> None:
        """Stop the vCPU and return only once it has finished the slice it was in (pause_all_vcpus)."""
        self._running.clear()
        with self.lock:
            pass

    @property
    def running(self) -> bool:
        return self._running.is_set()

    def quit(self) -> None:
        self._quit = True
        self._running.set()

    def run(self) -> None:
        last = time.monotonic()
        while not self._quit:
            if not self._running.is_set():
                self._running.wait(0.05)
                last = time.monotonic()
                continue
            with self.lock:
                if self._quit or not self._running.is_set():
                    continue
                now = time.monotonic()
                self.guest.tick(min(now - last, 0.05))
                last = now
            spare = TICK_S - (time.monotonic() - now)
            if spare > 0 and self.guest.cpu.budget < PAGE_SIZE:  # behind the dirty rate: no nap
                time.sleep(spare)
