"""Runs of full-page RAM records, written and read in one numpy step each (ram.py's fast path).

On the wire every 4 KiB page is its own record (``be64 offset|flags`` then the page), so a stream of real data
is a run of records at a stride of 4104 bytes. Handling them one by one costs Python work (and often a system
call) per page on both sides, which capped the emulator's pre-copy at a fraction of what the socket moves.
Here a run is one copy: the writer lays a chunk's headers and pages out in one reusable buffer and sends it
with one call; the reader checks a whole read-ahead buffer's headers in one vector step and copies the pages
into guest RAM in one slice (or fancy-index) assignment. Only records ram_load_precopy() would accept
without a question go this way: anything else (a zero page, a block name, EOS, bad flags, an offset out of
range, a record cut by the buffer's end) is left where it is for ram.py's exact, per-record path, which keeps
every error text. The wire format is unchanged.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np

from labkit.vm.migration.qemu_file import QEMUFileIn, QEMUFileOut, StreamError

PAGE_SIZE = 4096  # TARGET_PAGE_SIZE (ram.py's; not imported from there, which imports this module)
PAGE_BITS = 12
RECORD_SIZE = 8 + PAGE_SIZE  # be64 offset|flags, then the page
ZERO_RECORD_SIZE = 9  # be64 offset|flags, then the fill byte (save_zero_page())
_FLAGS_MASK = PAGE_SIZE - 1
#: Fewest records a read-ahead buffer must hold for runs to pay off.
MIN_RUN = 16
_HDR = np.dtype(">u8")
_BE64 = struct.Struct(">Q")
#: i * PAGE_SIZE: the headers of consecutive pages, less the first one's (a read-ahead of up to 64 MiB)
_STEPS = np.arange((64 << 20) // RECORD_SIZE + 1, dtype=np.uint64) << np.uint64(PAGE_BITS)


def put_page_run(
    f: QEMUFileOut, first_page: int, data: memoryview, flags: int, nonzero: Callable[[np.ndarray], np.ndarray] | None
) -> bool:
    """Send the pages of ``data`` (pages ``first_page``...) as records that all carry ``flags``, in one send;
    with ``nonzero`` (zero-page detection), only if none of them is a zero page. Returns whether it sent.

    The records are laid out in the channel's scratch buffer (one copy of each page, cache-sized), which
    costs less than handing the kernel two buffers per page: building that list is Python work per page.
    Zero pages are looked for in that copy, where the words read are in cache, not in guest RAM."""
    n = len(data) // PAGE_SIZE
    wire = np.frombuffer(f.scratch(n * RECORD_SIZE), dtype=np.uint8).reshape(n, RECORD_SIZE)
    wire[:, 8:] = np.frombuffer(data, dtype=np.uint8).reshape(n, PAGE_SIZE)
    if nonzero is not None and not nonzero(wire[:, 8:].view(np.uint64)).all():
        return False
    offsets = np.arange(first_page, first_page + n, dtype=np.uint64) << np.uint64(PAGE_BITS)
    wire[:, :8] = (offsets | np.uint64(flags)).astype(_HDR).view(np.uint8).reshape(n, 8)
    f.put_buffer(memoryview(wire).cast("B"))  # type: ignore[arg-type]  # numpy arrays are buffers
    return True


def load_page_run(f: QEMUFileIn, view: memoryview, limit: int, flags: int) -> int:
    """Load the records at the head of ``f`` that are whole pages of the current block carrying exactly
    ``flags`` (PAGE|CONTINUE) at an offset below ``limit``, straight into ``view``. Returns how many.

    Waits for the channel only where the per-record path would: for the next header, and for the rest of a
    record whose header says a page follows (only before it took any, so a stream that ends there raises
    with nothing loaded that the count does not show). Stops before the first record it does not take."""
    if limit < PAGE_SIZE or f.read_ahead_size < MIN_RUN * RECORD_SIZE:
        return 0  # a small read-ahead (a test's) would pay numpy's per-step cost on a few pages each
    dest = np.frombuffer(view, dtype=np.uint8).reshape(-1, PAGE_SIZE)
    total = 0
    try:
        while n := _load_buffered_run(f, dest, limit - PAGE_SIZE, flags):
            total += n
    except StreamError:  # the stream ended inside a record: the per-record path meets the same end
        if not total:
            raise
    return total


def _load_buffered_run(f: QEMUFileIn, dest: np.ndarray, last_offset: int, flags: int) -> int:
    """One read-ahead buffer's worth of load_page_run(): every record it takes from the buffer."""
    buf = f.peek_buffered(8)
    if len(buf) < RECORD_SIZE:  # a record cut by the buffer's end: read the rest only if it is one we take
        (hdr,) = _BE64.unpack_from(buf)
        if hdr & _FLAGS_MASK != flags or hdr & ~_FLAGS_MASK > last_offset:
            return 0
        buf = f.peek_buffered(RECORD_SIZE)
    k = min(len(buf) // RECORD_SIZE, len(_STEPS))
    # native and contiguous first: numpy is several times slower on strided big-endian words
    hdrs = np.ndarray((k,), dtype=_HDR, buffer=buf, strides=(RECORD_SIZE,)).astype(np.uint64)
    last = last_offset | flags  # with the flags right, offset <= last_offset is hdr <= last
    first = int(hdrs[0])
    if (
        first & _FLAGS_MASK == flags
        and first <= last
        and int(hdrs[-1]) <= last
        and bool((hdrs == first + _STEPS[:k]).all())
    ):  # the common case, checked in three vector steps: consecutive pages, every flag and offset right
        n = k
        pages = np.ndarray((n, PAGE_SIZE), dtype=np.uint8, buffer=buf, offset=8, strides=(RECORD_SIZE, 1))
        dest[first >> PAGE_BITS : (first >> PAGE_BITS) + n] = pages
    else:
        good = ((hdrs & np.uint64(_FLAGS_MASK)) == np.uint64(flags)) & (hdrs <= np.uint64(last))
        n = k if good.all() else int(np.argmin(good))
        if not n:
            return 0
        pages = np.ndarray((n, PAGE_SIZE), dtype=np.uint8, buffer=buf, offset=8, strides=(RECORD_SIZE, 1))
        _scatter(dest, (hdrs[:n] >> np.uint64(PAGE_BITS)).view(np.intp), pages)  # < 2**52: a view will do
    f.skip_buffered(n * RECORD_SIZE)
    return n


def load_zero_run(f: QEMUFileIn, view: memoryview, limit: int, flags: int, zero_check: bool) -> int:
    """load_page_run() for zero pages: the records at the head of ``f`` that are consecutive zero pages of
    the current block carrying exactly ``flags`` (ZERO|CONTINUE) and fill byte 0. A page that is not zero
    already is cleared, and only where ``zero_check`` says the memory may not be (ram_handle_zero())."""
    if limit < PAGE_SIZE or f.read_ahead_size < MIN_RUN * RECORD_SIZE:
        return 0
    dest = np.frombuffer(view, dtype=np.uint8).reshape(-1, PAGE_SIZE)
    total = 0
    try:
        while n := _load_buffered_zero_run(f, dest, limit - PAGE_SIZE, flags, zero_check):
            total += n
    except StreamError:  # as in load_page_run()
        if not total:
            raise
    return total


def _load_buffered_zero_run(f: QEMUFileIn, dest: np.ndarray, last_offset: int, flags: int, check: bool) -> int:
    buf = f.peek_buffered(8)
    last = last_offset | flags
    if len(buf) < ZERO_RECORD_SIZE:
        (hdr,) = _BE64.unpack_from(buf)
        if hdr & _FLAGS_MASK != flags or hdr > last:
            return 0
        buf = f.peek_buffered(ZERO_RECORD_SIZE)
    k = min(len(buf) // ZERO_RECORD_SIZE, len(_STEPS))
    records = np.frombuffer(buf, dtype=np.uint8, count=k * ZERO_RECORD_SIZE).reshape(k, ZERO_RECORD_SIZE)
    hdrs = np.ascontiguousarray(records[:, :8]).view(_HDR).ravel().astype(np.uint64)
    first = int(hdrs[0])
    if first & _FLAGS_MASK != flags or first > last:
        return 0
    good = (hdrs == first + _STEPS[:k]) & (records[:, 8] == 0)  # consecutive, fill byte 0
    n = k if good.all() else int(np.argmin(good))
    n = min(n, (last - first) // PAGE_SIZE + 1)  # none beyond the block
    if n and check:
        pages = dest[first >> PAGE_BITS : (first >> PAGE_BITS) + n]
        stale = np.flatnonzero(pages.any(axis=1))
        if len(stale):
            pages[stale] = 0
    f.skip_buffered(n * ZERO_RECORD_SIZE)
    return n


def _scatter(dest: np.ndarray, index: np.ndarray, pages: np.ndarray) -> None:
    """dest[index[i]] = pages[i] in order, so a page sent twice ends as its last copy, as record by record.

    Consecutive pages (pass 1, and most dirty runs) are one slice copy; increasing ones one fancy-index copy
    (no page twice, so order cannot matter); anything else is copied run by run, in stream order."""
    n = len(index)
    first = int(index[0])
    if int(index[-1]) - first == n - 1:
        steps = np.diff(index)
        if n == 1 or bool((steps == 1).all()):
            dest[first : first + n] = pages
            return
    else:
        steps = np.diff(index)
    if bool((steps > 0).all()):
        dest[index] = pages
        return
    breaks = np.flatnonzero(steps != 1) + 1
    bounds = [0, *breaks.tolist(), n]
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        p = int(index[s])
        dest[p : p + (e - s)] = pages[s:e]
