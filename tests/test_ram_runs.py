"""Runs of page records (labkit/vm/migration/ram_runs.py): the reader's one-numpy-step path must load exactly
what the per-record path loads, stop where that path would raise (with its text and errno), and handle a
record cut by the end of a read; the writer's one-buffer runs must be the bytes the per-record writer sends."""

from __future__ import annotations

import errno
import io
import struct
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from labkit.vm.migration import ram as ram_module
from labkit.vm.migration import ram_runs
from labkit.vm.migration import stream as s
from labkit.vm.migration.ram_runs import MIN_RUN, RECORD_SIZE
from labkit.vm.migration.stream import PAGE_SIZE, QEMUFileIn, QEMUFileOut, StreamError
from tests.test_stream import (
    EOF,
    HEADER,
    GuardedRAM,
    be32,
    be64,
    counted,
    device,
    part,
    recorder,
    start_section,
)

pytestmark = pytest.mark.timeout(60)

BLOCKS = {"pc.ram": 64 * PAGE_SIZE, "vga": 8 * PAGE_SIZE}
PAGE_CONTINUE = s.RAM_SAVE_FLAG_PAGE | s.RAM_SAVE_FLAG_CONTINUE
ZERO_CONTINUE = s.RAM_SAVE_FLAG_ZERO | s.RAM_SAVE_FLAG_CONTINUE


class PieceReader(io.RawIOBase):
    """A channel that hands out at most `piece` bytes per read, so records are cut where a test wants."""

    def __init__(self, data: bytes, piece: int):
        self.data, self.pos, self.piece = data, 0, piece

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        n = min(len(b), self.piece, len(self.data) - self.pos)
        b[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


def page(i: int, block_page: int) -> bytes:
    """Distinct contents per record, so a page written at the wrong place or twice in the wrong order shows."""
    return struct.pack(">II", i, block_page) * (PAGE_SIZE // 8)


def rec(offset: int, flags: int, payload: bytes, name: str | None = None) -> bytes:
    """One record: a CONTINUE one unless `name` is given."""
    if name is None:
        return be64(offset | flags | s.RAM_SAVE_FLAG_CONTINUE) + payload
    return be64(offset | flags) + counted(name) + payload


def stream_of(records: bytes) -> bytes:
    return HEADER + start_section(tuple(BLOCKS.items())) + part(records) + device() + EOF


def load(data: bytes, piece: int, bufsize: int, runs: bool, monkeypatch, zero_check: bool = True) -> tuple:
    """Everything a load leaves behind: RAM, counts, bytes read, and the error (text, errno) if any; and how
    many pages went by runs (page runs and zero runs)."""
    taken = [0]

    def spy(real):
        def run(*args):
            n = real(*args) if runs else 0
            taken[0] += n
            return n

        return run

    monkeypatch.setattr(ram_module, "load_page_run", spy(ram_runs.load_page_run))
    monkeypatch.setattr(ram_module, "load_zero_run", spy(ram_runs.load_zero_run))
    ram = GuardedRAM(BLOCKS, fill=0x33)  # not fresh: zero pages are written unless zero_check is off
    f = QEMUFileIn(PieceReader(data, piece), bufsize=bufsize)
    err = None
    stats = None
    try:
        stats = s.qemu_loadvm_state(f, ram, recorder([]), zero_page_needs_write=lambda name: zero_check)
    except StreamError as e:
        err = (str(e), e.errno)
    assert ram.guards_intact()
    counts = None if stats is None else (stats.normal_pages, stats.zero_pages, stats.bytes)
    return {n: ram.block(n) for n in BLOCKS}, counts, f.bytes_received, err, taken[0]


def same_as_per_record(
    data: bytes, piece: int, monkeypatch, bufsize: int = 1 << 20, zero_check: bool = True
) -> tuple:
    """Load `data` with runs and record by record; both must end the same. Returns the run load's outcome.

    Only a stream that ends inside a page may differ, in that page (migration failed, the RAM is not the
    guest's): record by record writes the part that came, a run waits for the whole record first."""
    fast = load(data, piece, bufsize, True, monkeypatch, zero_check)
    exact = load(data, piece, bufsize, False, monkeypatch, zero_check)
    if fast[3] is not None and fast[3][1] == errno.EIO:
        assert fast[3] == exact[3]
    else:
        assert fast[:4] == exact[:4]
    return fast


def test_runs_zero_pages_and_block_switches(monkeypatch):
    recs = rec(0, s.RAM_SAVE_FLAG_PAGE, page(0, 0), "pc.ram")
    recs += b"".join(rec(p * PAGE_SIZE, s.RAM_SAVE_FLAG_PAGE, page(p, p)) for p in range(1, 40))  # a run
    recs += b"".join(rec(p * PAGE_SIZE, s.RAM_SAVE_FLAG_ZERO, b"\0") for p in range(40, 44))
    recs += rec(44 * PAGE_SIZE, s.RAM_SAVE_FLAG_ZERO, b"\x07")  # a fill byte that is not 0
    recs += b"".join(rec(p * PAGE_SIZE, s.RAM_SAVE_FLAG_PAGE, page(p, p)) for p in range(45, 64))
    recs += rec(2 * PAGE_SIZE, s.RAM_SAVE_FLAG_PAGE, page(99, 2), "vga")  # another block, then its run
    recs += b"".join(rec(p * PAGE_SIZE, s.RAM_SAVE_FLAG_PAGE, page(100 + p, p)) for p in range(3, 8))
    recs += rec(5 * PAGE_SIZE, s.RAM_SAVE_FLAG_PAGE, page(200, 5), "pc.ram")  # back to the first block
    ram, counts, nbytes, err, taken = same_as_per_record(stream_of(recs), 1 << 20, monkeypatch)
    assert err is None and counts is not None
    assert counts[:2] == (40 + 19 + 6 + 1, 5) and nbytes == counts[2]
    want = bytearray(b"".join(page(p, p) for p in range(64)))
    want[40 * PAGE_SIZE : 44 * PAGE_SIZE] = bytes(4 * PAGE_SIZE)
    want[44 * PAGE_SIZE : 45 * PAGE_SIZE] = b"\x07" * PAGE_SIZE
    want[5 * PAGE_SIZE : 6 * PAGE_SIZE] = page(200, 5)
    assert ram["pc.ram"] == bytes(want)
    assert ram["vga"] == b"\x33" * 2 * PAGE_SIZE + page(99, 2) + b"".join(page(100 + p, p) for p in range(3, 8))
    assert taken == 39 + 3 + 18 + 5  # every CONTINUE record after the first of its kind in each stretch


@pytest.mark.parametrize("zero_check", [True, False])
@pytest.mark.parametrize("piece", [1 << 20, 4, 9 * 7 + 5])
def test_zero_runs(zero_check, piece, monkeypatch):
    """Zero pages of a destination that is not fresh are cleared (zero_check) or left (a fresh mapping); a
    fill byte and a zero page beyond the block end a run, the latter with QEMU's text."""
    recs = rec(0, s.RAM_SAVE_FLAG_ZERO, b"\0", "pc.ram")
    recs += b"".join(rec(p * PAGE_SIZE, s.RAM_SAVE_FLAG_ZERO, b"\0") for p in range(1, 40))
    recs += rec(40 * PAGE_SIZE, s.RAM_SAVE_FLAG_ZERO, b"\x09")
    recs += b"".join(rec(p * PAGE_SIZE, s.RAM_SAVE_FLAG_ZERO, b"\0") for p in range(41, 64))
    ram, counts, _, err, taken = same_as_per_record(stream_of(recs), piece, monkeypatch, zero_check=zero_check)
    assert err is None and counts is not None and counts[:2] == (0, 64)
    old = b"\x33" * PAGE_SIZE
    want = [bytes(PAGE_SIZE) if zero_check else old] * 64
    want[40] = b"\x09" * PAGE_SIZE
    assert ram["pc.ram"] == b"".join(want) and ram["vga"] == old * 8
    assert 0 < taken <= 39 + 23 and (piece != 1 << 20 or taken == 39 + 23)
    beyond = stream_of(recs + rec(64 * PAGE_SIZE, s.RAM_SAVE_FLAG_ZERO, b"\0"))
    _, _, _, err, _ = same_as_per_record(beyond, piece, monkeypatch, zero_check=zero_check)
    assert err == (f"Illegal RAM offset {64 * PAGE_SIZE:x}", errno.EINVAL)


@pytest.mark.parametrize("piece", [1, 7, 4103, 4104, 4105, 3 * RECORD_SIZE + 11, 65537])
def test_records_cut_by_the_end_of_a_read(piece, monkeypatch):
    recs = rec(0, s.RAM_SAVE_FLAG_PAGE, page(0, 0), "pc.ram")
    recs += b"".join(rec(p * PAGE_SIZE, s.RAM_SAVE_FLAG_PAGE, page(p, p)) for p in range(1, 64))
    ram, counts, _, err, taken = same_as_per_record(stream_of(recs), piece, monkeypatch)
    assert err is None and counts is not None and counts[:2] == (64, 0)
    assert ram["pc.ram"] == b"".join(page(p, p) for p in range(64))
    assert 0 < taken <= 63  # a record cut after a run goes record by record; the next run waits for a read


def test_a_small_read_ahead_goes_record_by_record(monkeypatch):
    recs = rec(0, s.RAM_SAVE_FLAG_PAGE, page(0, 0), "pc.ram")
    recs += b"".join(rec(p * PAGE_SIZE, s.RAM_SAVE_FLAG_PAGE, page(p, p)) for p in range(1, 64))
    small = (MIN_RUN - 1) * RECORD_SIZE
    ram, counts, _, err, taken = same_as_per_record(stream_of(recs), 1 << 20, monkeypatch, bufsize=small)
    assert err is None and ram["pc.ram"] == b"".join(page(p, p) for p in range(64)) and taken == 0


def test_pages_out_of_order_and_sent_twice_end_as_their_last_copy(monkeypatch):
    order = [10, 11, 12, 3, 4, 11, 30, 20, 21, 20, 0, 63]
    recs = rec(9 * PAGE_SIZE, s.RAM_SAVE_FLAG_PAGE, page(0, 9), "pc.ram")
    recs += b"".join(rec(p * PAGE_SIZE, s.RAM_SAVE_FLAG_PAGE, page(i + 1, p)) for i, p in enumerate(order))
    ram, counts, _, err, taken = same_as_per_record(stream_of(recs), 1 << 20, monkeypatch)
    assert err is None and counts is not None and counts[0] == 1 + len(order) and taken == len(order)
    got = np.frombuffer(ram["pc.ram"], dtype=">u4").reshape(64, -1)[:, 0]
    for p in set(order):
        last = max(i for i, q in enumerate(order) if q == p)
        assert got[p] == last + 1, p


BAD_IN_A_RUN = {
    "unknown flags": (lambda p: be64(p * PAGE_SIZE | 0x40 | s.RAM_SAVE_FLAG_CONTINUE) + page(0, p),
                      "Unknown combination of migration flags: 0x60"),
    "beyond the block": (lambda p: rec(64 * PAGE_SIZE, s.RAM_SAVE_FLAG_PAGE, page(0, 64)),
                         f"Illegal RAM offset {64 * PAGE_SIZE:x}"),
    "far beyond": (lambda p: rec(1 << 62, s.RAM_SAVE_FLAG_PAGE, page(0, 0)), f"Illegal RAM offset {1 << 62:x}"),
    "wraps around": (lambda p: rec((1 << 64) - PAGE_SIZE, s.RAM_SAVE_FLAG_PAGE, page(0, 0)),
                     f"Illegal RAM offset {(1 << 64) - PAGE_SIZE:x}"),
    "unknown block": (lambda p: rec(p * PAGE_SIZE, s.RAM_SAVE_FLAG_PAGE, page(0, p), "pc.rom"),
                      "Unknown RAM block pc.rom"),
    "cut short": (lambda p: rec(p * PAGE_SIZE, s.RAM_SAVE_FLAG_PAGE, page(0, p))[:100], None),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_IN_A_RUN))
@pytest.mark.parametrize("piece", [1 << 20, 5000])
def test_a_malformed_record_inside_a_run(case, piece, monkeypatch):
    bad, text = BAD_IN_A_RUN[case]
    recs = rec(0, s.RAM_SAVE_FLAG_PAGE, page(0, 0), "pc.ram")
    recs += b"".join(rec(p * PAGE_SIZE, s.RAM_SAVE_FLAG_PAGE, page(p, p)) for p in range(1, 30))
    recs += bad(30)
    recs += b"".join(rec(p * PAGE_SIZE, s.RAM_SAVE_FLAG_PAGE, page(p, p)) for p in range(31, 40))
    data = stream_of(recs)
    if text is None:  # the stream ends inside the record
        data = data[: data.index(bad(30)) + 100]
    ram, counts, _, err, taken = same_as_per_record(data, piece, monkeypatch)
    want = (text, errno.EINVAL) if text is not None else ("Input stream ended unexpectedly", errno.EIO)
    assert counts is None and err == want
    # the pages before the bad record were loaded, as record by record; none after it
    assert ram["pc.ram"][: 30 * PAGE_SIZE] == b"".join(page(p, p) for p in range(30))
    assert ram["pc.ram"][31 * PAGE_SIZE :] == b"\x33" * 33 * PAGE_SIZE
    assert taken == 29 if piece == 1 << 20 else 0 < taken <= 29


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    nrecs=st.integers(1, 300),
    piece=st.sampled_from([1 << 20, 4096, 4104, 9000, 100_003]),
    bufsize=st.sampled_from([1 << 20, MIN_RUN * RECORD_SIZE, 40 * RECORD_SIZE + 5]),
    zero_check=st.booleans(),
)
def test_property_runs_load_what_records_load(seed, nrecs, piece, bufsize, zero_check):
    """Random streams, mostly runs with zero pages, block switches, jumps and now and then a bad record."""
    rng = np.random.default_rng(seed)
    recs = b""
    block, nxt, zeros = None, 0, 0
    for i in range(nrecs):
        r = rng.random()
        if block is None or r < 0.03:
            block = str(rng.choice(list(BLOCKS)))
            nxt = int(rng.integers(0, BLOCKS[block] // PAGE_SIZE))
            recs += rec(nxt * PAGE_SIZE, s.RAM_SAVE_FLAG_PAGE, page(i, nxt), block)
        elif r < 0.25 or zeros:  # zero pages, alone or in runs, now and then with a fill byte
            zeros = max(zeros - 1, 0) or (int(rng.integers(0, 30)) if rng.random() < 0.3 else 0)
            fill = int(rng.integers(1, 3)) if rng.random() < 0.05 else 0
            recs += rec(nxt * PAGE_SIZE, s.RAM_SAVE_FLAG_ZERO, bytes([fill]))
        elif r < 0.3:
            nxt = int(rng.integers(0, BLOCKS[block] // PAGE_SIZE + 1))  # a jump; now and then past the end
            recs += rec(nxt * PAGE_SIZE, s.RAM_SAVE_FLAG_PAGE, page(i, nxt))
        elif r < 0.303:
            recs += be64(nxt * PAGE_SIZE | 0x80 | s.RAM_SAVE_FLAG_CONTINUE) + page(i, nxt)
        else:
            recs += rec(nxt * PAGE_SIZE, s.RAM_SAVE_FLAG_PAGE, page(i, nxt))
        nxt = (nxt + 1) % (BLOCKS[block] // PAGE_SIZE)
    with pytest.MonkeyPatch.context() as m:
        same_as_per_record(stream_of(recs), piece, m, bufsize, zero_check)


@pytest.mark.parametrize("zero_pages", [[], [300], [300, 600, 601, 700]])
def test_writer_runs_are_the_per_record_bytes(zero_pages):
    """Chunks of real pages go out as one buffer each, a chunk with a zero page (found in that buffer's copy)
    record by record; the bytes are the records a per-page writer sends."""
    npages = 3 * s.RAM_SAVE_CHUNK_PAGES + 5
    src = bytearray(np.random.default_rng(3).integers(1, 256, npages * PAGE_SIZE, dtype=np.uint8).tobytes())
    for p in zero_pages:
        src[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] = bytes(PAGE_SIZE)
    with tempfile.TemporaryFile() as tf:
        f = QEMUFileOut(tf)
        s.ram_save_setup(f, [("pc.ram", npages * PAGE_SIZE)])
        start = f.bytes_sent
        assert s.ram_save_pages(f, "pc.ram", 0, memoryview(src)) == (npages - len(zero_pages), len(zero_pages))
        f.flush()
        sent = f.bytes_sent - start
        tf.seek(0)
        data = tf.read()
    body = data[len(data) - sent :]
    want = b"".join(
        rec(p * PAGE_SIZE, s.RAM_SAVE_FLAG_ZERO, b"\0")
        if p in zero_pages
        else rec(p * PAGE_SIZE, s.RAM_SAVE_FLAG_PAGE, src[p * PAGE_SIZE : (p + 1) * PAGE_SIZE], None if p else "pc.ram")
        for p in range(npages)
    )
    assert body[:5] == bytes([s.QEMU_VM_SECTION_PART]) + be32(1)  # the PART section's header, then records
    assert body[5:] == want
