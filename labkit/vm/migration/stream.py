"""The main migration stream: the bytes an emulated source VM writes and an emulated destination reads.

Modelled on QEMU's ``migration/savevm.c`` (sections), ``migration/ram.c`` (RAM pages) and
``migration/qemu-file.c`` (the buffered ``QEMUFile``), with the same names and constants, so this file can
be read beside QEMU's source. Everything is big-endian, like QEMU's ``qemu_put_be32``/``qemu_put_be64``.

Stream layout::

    header       +------------+------------+
                 | be32 magic | be32 ver   |   QEMU_VM_FILE_MAGIC 0x5145564d ("QEVM"), QEMU_VM_FILE_VERSION 3
                 +------------+------------+

    RAM setup    +------+-----------+------------------+-------------+------------+
    (START)      | 0x01 | be32 sec  | u8 len | "ram"   | be32 inst 0 | be32 ver 4 |   QEMU_VM_SECTION_START
                 +------+-----------+------------------+-------------+------------+
                 | be64 total_bytes | RAM_SAVE_FLAG_MEM_SIZE |                     total of all used lengths
                 +------------------+-----------+------------+
                 | u8 len | block name          | be64 used length |  ... once per RAM block
                 +--------+---------------------+------------------+
                 | be64 RAM_SAVE_FLAG_EOS | 0x7e | be32 sec |                        EOS, then section footer

    RAM pages    +------+----------+
    (PART, END)  | 0x02 | be32 sec |     QEMU_VM_SECTION_PART during passes, QEMU_VM_SECTION_END (0x03) at completion
                 +------+----------+
                 then records, each a *run* of pages in one block:
                 +--------------------------+------------------------------+---------------+
                 | be64 offset | flags      | u8 len | block name          | be32 npages   |   ZERO run: no data
                 +--------------------------+------------------------------+---------------+
                 | be64 offset | flags      | (name left out: CONTINUE)    | be32 npages   | npages*4096 raw bytes |
                 +--------------------------+------------------------------+---------------+-----------------------+
                 flags (low 12 bits of the page-aligned offset): RAM_SAVE_FLAG_ZERO 0x02 or RAM_SAVE_FLAG_PAGE 0x08,
                 plus RAM_SAVE_FLAG_CONTINUE 0x20 when the block is the same as the previous record's in this
                 section (then the name is not sent); the section ends with
                 | be64 RAM_SAVE_FLAG_EOS 0x10 | 0x7e | be32 sec |

    device       +------+----------+-------------------+-----------+-----------+--------------+---------+
    (FULL)       | 0x04 | be32 sec | u8 len | idstr    | be32 inst | be32 ver  | be32 length  | payload |
                 +------+----------+-------------------+-----------+-----------+--------------+---------+
                 | 0x7e | be32 sec |      QEMU_VM_SECTION_FOOTER; payload = opaque bytes from the VM's device
                 +------+----------+

    end          | 0x00 |             QEMU_VM_EOF

Where this simplifies QEMU (on purpose, to keep the code short and fast in Python):

* RAM records describe *runs*: QEMU sends one ``be64 offset|flags`` (+ name) per 4 KiB page, and a zero page
  carries one fill byte. Here a record carries ``be32 npages`` and covers that many contiguous pages, so a
  1 GiB run costs one header instead of 262144, and a zero run has no fill byte.
* Device payloads are opaque and length-prefixed (``be32 length``). QEMU writes VMState fields with no
  length, so a reader must know each device's layout; here the destination's devices decode their own bytes.
* No QEMU_VM_CONFIGURATION (0x07), QEMU_VM_COMMAND (0x08) or QEMU_VM_SUBSECTION (0x05), and no vmdescription
  JSON after QEMU_VM_EOF: such type bytes are rejected as "Unknown savevm section type %d".
* The CONTINUE chain restarts at each section (QEMU's ``last_sent_block`` can span sections).
* The RAM setup section lists only name and used length (QEMU may add page size and addresses for postcopy
  and ``x-ignore-shared``).

Speed: the writer finds zero pages with numpy over a cache-sized chunk of the run at a time and sends each
chunk's headers and page runs in one ``sendmsg`` straight from guest RAM (QEMU's ``qemu_put_buffer_async``
iovec); the reader ``recv_into``s page runs straight into the destination's guest RAM. No per-page Python work
and no copies of page data in user space. ``scripts/bench_stream.py`` measures it.
"""

from __future__ import annotations

import io
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

PAGE_SIZE = 4096
TARGET_PAGE_BITS = 12
TARGET_PAGE_MASK = ~(PAGE_SIZE - 1)

# savevm.c
QEMU_VM_FILE_MAGIC = 0x5145564D
QEMU_VM_FILE_VERSION = 0x00000003
QEMU_VM_EOF = 0x00
QEMU_VM_SECTION_START = 0x01
QEMU_VM_SECTION_PART = 0x02
QEMU_VM_SECTION_END = 0x03
QEMU_VM_SECTION_FULL = 0x04
QEMU_VM_SECTION_FOOTER = 0x7E

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
#: Most buffers handed to one sendmsg (Linux IOV_MAX is 1024).
MAX_IOV_SIZE = 512
#: Small fields are gathered up to this size before a send (QEMU's IO_BUF_SIZE is 32 KiB).
IO_BUF_SIZE = 32768
#: SO_SNDBUF/SO_RCVBUF asked for on socket channels: with Linux's default (~208 KiB) source and destination
#: take turns instead of overlapping; 1 MiB lets one prepare the next chunk while the other copies
#: (scripts/bench_stream.py measures the difference).
SOCKET_BUFFER_SIZE = 1 << 20
#: Most RAM blocks a START section may list (a guard against hostile streams).
MAX_RAM_BLOCKS = 4096

_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_RECORD = struct.Struct(">QI")  # be64 offset|flags, be32 npages (when CONTINUE: no name in between)


class StreamError(Exception):
    """The incoming stream is not a valid migration stream; the text follows QEMU's error_report()s."""


def _counted(name: str) -> bytes:
    """qemu_put_counted_string(): one length byte, then the bytes (no NUL)."""
    raw = name.encode()
    if not 0 < len(raw) <= 255:
        raise ValueError(f"idstr {name!r} must be 1..255 bytes")
    return bytes([len(raw)]) + raw


# --------------------------------------------------------------------------------------------------------
# QEMUFile, output side


@dataclass
class SaveVMState:
    """What savevm.c keeps in its global ``savevm_state``: section ids and the open RAM section."""

    section_ids: dict[tuple[str, int], int] = field(default_factory=dict)
    ram_blocks: dict[str, int] = field(default_factory=dict)  # name -> used length
    ram_section: int | None = None  # QEMU_VM_SECTION_PART / _END while one is open
    last_sent_block: str | None = None

    def section_id(self, idstr: str, instance_id: int) -> int:
        """One id per (idstr, instance), in order of first use, as QEMU numbers its SaveStateEntry list."""
        return self.section_ids.setdefault((idstr, instance_id), len(self.section_ids))


class QEMUFileOut:
    """Writing end of a migration channel: a connected socket or a writable binary file.

    Small fields are buffered (like QEMUFile's ``buf``); large data is handed to the kernel straight from the
    caller's memory, with the buffered bytes in front of it in the same ``sendmsg``, never copied.
    ``bytes_sent`` counts every byte put, buffered or not (QEMU's ``qemu_file_transferred``).
    """

    def __init__(
        self,
        sink: socket.socket | io.RawIOBase | io.BufferedIOBase,
        rate_limit: Callable[[int], None] | None = None,
    ):
        self._sock = sink if isinstance(sink, socket.socket) else None
        self._sink = sink
        if self._sock is not None:
            _grow_socket_buffer(self._sock, socket.SO_SNDBUF)
        self._rate_limit = rate_limit
        self._buf = bytearray()
        self.bytes_sent = 0
        self.savevm = SaveVMState()

    # small fields ------------------------------------------------------------------------------------
    def put_byte(self, v: int) -> None:
        self._buf.append(v & 0xFF)
        self._account(1)

    def put_be32(self, v: int) -> None:
        self._buf += _BE32.pack(v & 0xFFFFFFFF)
        self._account(4)

    def put_be64(self, v: int) -> None:
        self._buf += _BE64.pack(v & 0xFFFFFFFFFFFFFFFF)
        self._account(8)

    def put_bytes(self, b: bytes | bytearray | memoryview) -> None:
        self._buf += b
        self._account(len(b))

    def put_counted_string(self, s: str) -> None:
        self.put_bytes(_counted(s))

    def _account(self, n: int) -> None:
        self.bytes_sent += n
        if len(self._buf) >= IO_BUF_SIZE:
            self.flush()

    # large data --------------------------------------------------------------------------------------
    def put_buffer(self, mv: memoryview) -> None:
        """Send ``mv`` now, without copying it, after whatever small fields are buffered."""
        mv = memoryview(mv).cast("B")
        self.bytes_sent += len(mv)
        self._writev([mv])

    def put_iov(self, bufs: Sequence[memoryview | bytes]) -> None:
        """Send several buffers, in order, with as few system calls as possible (QEMU's iovec flush)."""
        self.bytes_sent += sum(len(b) for b in bufs)
        self._writev(list(bufs))

    def flush(self) -> None:
        """qemu_fflush(): push the buffered small fields to the channel."""
        if self._buf:
            self._writev([])

    def _writev(self, bufs: list) -> None:
        if self._buf:
            bufs.insert(0, bytes(self._buf))
            self._buf.clear()
        if not bufs:
            return
        if self._rate_limit is not None:
            self._rate_limit(sum(len(b) for b in bufs))
        if self._sock is not None:
            for i in range(0, len(bufs), MAX_IOV_SIZE):
                _sendmsg_all(self._sock, bufs[i : i + MAX_IOV_SIZE])
        else:
            for b in bufs:
                _write_all(self._sink, b)


def _grow_socket_buffer(sock: socket.socket, option: int) -> None:
    """Raise a socket buffer to SOCKET_BUFFER_SIZE unless it is already larger (never shrink a tuned one)."""
    try:
        if sock.getsockopt(socket.SOL_SOCKET, option) < SOCKET_BUFFER_SIZE:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_SIZE)
    except OSError:
        pass  # not every socket family has these (and a closed socket fails later, where it matters)


def _sendmsg_all(sock: socket.socket, bufs: list) -> None:
    """sendmsg() until every buffer is gone (a blocking stream socket may still return short on a signal)."""
    views = [memoryview(b).cast("B") for b in bufs]
    i = 0
    while i < len(views):
        sent = sock.sendmsg(views[i:] if i else views)
        while i < len(views) and sent >= len(views[i]):
            sent -= len(views[i])
            i += 1
        if sent:
            views[i] = views[i][sent:]


def _write_all(sink, b) -> None:
    mv = memoryview(b).cast("B")
    while mv:
        n = sink.write(mv)
        if n is None:
            raise BlockingIOError("migration file is non-blocking")
        mv = mv[n:]


# --------------------------------------------------------------------------------------------------------
# QEMUFile, input side


class QEMUFileIn:
    """Reading end of a migration channel: a connected socket or a readable binary file.

    Small fields come from a bounded read-ahead buffer; ``read_into`` copies what is already buffered and
    then lets the kernel write the rest straight into the destination's memory (``recv_into``/``readinto``).
    A stream that ends early raises StreamError.
    """

    def __init__(self, source: socket.socket | io.RawIOBase | io.BufferedIOBase, bufsize: int = IO_BUF_SIZE):
        self._sock = source if isinstance(source, socket.socket) else None
        self._src = source
        if self._sock is not None:
            _grow_socket_buffer(self._sock, socket.SO_RCVBUF)
        self._buf = bytearray(max(bufsize, 256))  # a counted string (<= 255 bytes) must fit
        self._mv = memoryview(self._buf)
        self._pos = 0
        self._end = 0
        self.bytes_received = 0

    def _recv_into(self, mv: memoryview) -> int:
        n = self._sock.recv_into(mv) if self._sock is not None else self._src.readinto(mv)
        if not n:  # 0 = EOF; None = a non-blocking file with nothing ready, which a loader cannot use
            raise StreamError("Input stream ended unexpectedly")
        return n

    def _fill(self, need: int) -> None:
        """Make at least ``need`` (<= bufsize) bytes available in the read-ahead buffer."""
        if self._end - self._pos >= need:
            return
        if self._pos:
            left = self._end - self._pos
            self._mv[:left] = self._mv[self._pos : self._end]
            self._pos, self._end = 0, left
        while self._end < need:
            self._end += self._recv_into(self._mv[self._end :])

    def get_bytes(self, n: int) -> bytes:
        if n > len(self._buf):
            out = bytearray(n)
            self.read_into(memoryview(out))
            return bytes(out)
        self._fill(n)
        b = bytes(self._mv[self._pos : self._pos + n])
        self._pos += n
        self.bytes_received += n
        return b

    def get_byte(self) -> int:
        self._fill(1)
        v = self._buf[self._pos]
        self._pos += 1
        self.bytes_received += 1
        return v

    def get_be32(self) -> int:
        self._fill(4)
        (v,) = _BE32.unpack_from(self._buf, self._pos)
        self._pos += 4
        self.bytes_received += 4
        return v

    def get_be64(self) -> int:
        self._fill(8)
        (v,) = _BE64.unpack_from(self._buf, self._pos)
        self._pos += 8
        self.bytes_received += 8
        return v

    def get_struct(self, st: struct.Struct) -> tuple:
        """Several fixed-size fields in one step (fewer Python calls per RAM record)."""
        self._fill(st.size)
        v = st.unpack_from(self._buf, self._pos)
        self._pos += st.size
        self.bytes_received += st.size
        return v

    def get_counted_string(self) -> str:
        return self.get_bytes(self.get_byte()).decode(errors="backslashreplace")

    def unget(self, n: int) -> None:
        """Step back over the last ``n`` bytes read from the buffer (a one-record look-ahead, not a seek)."""
        if n > self._pos:
            raise ValueError("cannot unget past the read-ahead buffer")
        self._pos -= n
        self.bytes_received -= n

    def read_into(self, mv: memoryview) -> None:
        """Fill all of ``mv``: buffered bytes first, then straight from the channel, no intermediate copy."""
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        n = len(mv)
        have = min(self._end - self._pos, n)
        if have:
            mv[:have] = self._mv[self._pos : self._pos + have]
            self._pos += have
        got = have
        try:
            while got < n:
                got += self._recv_into(mv[got:])
        finally:
            self.bytes_received += got


# --------------------------------------------------------------------------------------------------------
# Save side (source)


def qemu_savevm_state_header(f: QEMUFileOut) -> None:
    """savevm.c: magic and version open every stream."""
    f.put_be32(QEMU_VM_FILE_MAGIC)
    f.put_be32(QEMU_VM_FILE_VERSION)


def _section_header(f: QEMUFileOut, section_type: int, idstr: str, instance_id: int, version_id: int) -> int:
    """save_section_header(): START/FULL carry idstr, instance and version; PART/END only the id."""
    sid = f.savevm.section_id(idstr, instance_id)
    f.put_byte(section_type)
    f.put_be32(sid)
    if section_type in (QEMU_VM_SECTION_START, QEMU_VM_SECTION_FULL):
        f.put_counted_string(idstr)
        f.put_be32(instance_id)
        f.put_be32(version_id)
    return sid


def _section_footer(f: QEMUFileOut, sid: int) -> None:
    """save_section_footer(): lets the reader notice a device that read too much or too little."""
    f.put_byte(QEMU_VM_SECTION_FOOTER)
    f.put_be32(sid)


def ram_save_setup(f: QEMUFileOut, blocks: list[tuple[str, int]]) -> None:
    """The RAM START section: total size, then every block's name and used length (ram_save_setup())."""
    if f.savevm.ram_section is not None:
        raise ValueError("a RAM section is still open")
    names = [n for n, _ in blocks]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate RAM block names in {names}")
    for name, length in blocks:
        if length < 0 or length % PAGE_SIZE:
            raise ValueError(f"RAM block {name} length {length:#x} is not a multiple of {PAGE_SIZE}")
    sid = _section_header(f, QEMU_VM_SECTION_START, RAM_SECTION_IDSTR, 0, RAM_SECTION_VERSION)
    f.put_be64(sum(length for _, length in blocks) | RAM_SAVE_FLAG_MEM_SIZE)
    for name, length in blocks:
        f.put_counted_string(name)
        f.put_be64(length)
    f.put_be64(RAM_SAVE_FLAG_EOS)
    _section_footer(f, sid)
    f.savevm.ram_blocks = dict(blocks)


def _ram_section_open(f: QEMUFileOut, section_type: int) -> None:
    if f.savevm.ram_section is not None:
        if f.savevm.ram_section != section_type:
            raise ValueError("another RAM section is still open")
        return
    if RAM_SECTION_IDSTR not in {k for k, _ in f.savevm.section_ids}:
        raise ValueError("ram_save_setup() must come first")
    _section_header(f, section_type, RAM_SECTION_IDSTR, 0, RAM_SECTION_VERSION)
    f.savevm.ram_section = section_type
    f.savevm.last_sent_block = None


def _ram_section_close(f: QEMUFileOut) -> None:
    f.put_be64(RAM_SAVE_FLAG_EOS)
    _section_footer(f, f.savevm.section_id(RAM_SECTION_IDSTR, 0))
    f.savevm.ram_section = None
    f.savevm.last_sent_block = None


def ram_save_iterate_start(f: QEMUFileOut) -> None:
    """Open a QEMU_VM_SECTION_PART for one pass (ram_save_pages() opens one itself if none is open)."""
    _ram_section_open(f, QEMU_VM_SECTION_PART)


def ram_save_iterate_end(f: QEMUFileOut) -> None:
    """EOS and footer close the pass's PART section (an empty PART is sent if nothing was, as QEMU does)."""
    if f.savevm.ram_section is None:
        _ram_section_open(f, QEMU_VM_SECTION_PART)
    _ram_section_close(f)


def ram_save_complete_start(f: QEMUFileOut) -> None:
    """Open the QEMU_VM_SECTION_END that carries the last dirty pages while the VM is stopped."""
    _ram_section_open(f, QEMU_VM_SECTION_END)


def ram_save_complete_end(f: QEMUFileOut) -> None:
    """Close the END section (ram_save_complete())."""
    if f.savevm.ram_section is None:
        _ram_section_open(f, QEMU_VM_SECTION_END)
    _ram_section_close(f)


def _nonzero_pages(pages: np.ndarray) -> np.ndarray:
    """Per page (a row of uint64 words): does it hold any nonzero byte? (QEMU's buffer_is_zero(), negated.)

    A page whose first or last word is nonzero is decided without reading the rest, which settles almost
    every page of real data at the cost of two strided reads; only the other pages are scanned in full.
    """
    nz = (pages[:, 0] != 0) | (pages[:, -1] != 0)
    undecided = np.flatnonzero(~nz)
    if len(undecided) * 4 > len(nz):  # mostly zero-looking: one pass over the chunk beats gathering rows
        return pages.any(axis=1)
    if len(undecided):
        nz[undecided] = pages[undecided].any(axis=1)
    return nz


def _page_runs(nz: np.ndarray) -> list[tuple[bool, int, int]]:
    """Maximal runs of equal values in a per-page bool array, as (nonzero, start, end)."""
    n = len(nz)
    if n == 0:
        return []
    edges = (np.flatnonzero(nz[1:] != nz[:-1]) + 1).tolist()
    starts = [0, *edges]
    ends = [*edges, n]
    first = bool(nz[0])
    return [(first ^ bool(i & 1), s, e) for i, (s, e) in enumerate(zip(starts, ends, strict=True))]


def ram_save_pages(
    f: QEMUFileOut, block: str, first_page: int, data: memoryview, *, detect_zero: bool = True
) -> tuple[int, int]:
    """Send ``len(data) // PAGE_SIZE`` contiguous pages of ``block`` starting at page ``first_page``.

    Zero pages become ZERO runs (a header only, like QEMU's save_zero_page()); the rest become PAGE runs sent
    straight from ``data``. Returns (normal_pages, zero_pages).
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
        if detect_zero:
            nz = _nonzero_pages(np.frombuffer(chunk, dtype=np.uint64).reshape(c1 - c0, PAGE_SIZE // 8))
            runs = _page_runs(nz)
        else:
            runs = [(True, 0, c1 - c0)]
        iov: list = []
        hdr = bytearray()
        for nonzero, s, e in runs:
            offset = (first_page + c0 + s) * PAGE_SIZE
            flags = RAM_SAVE_FLAG_PAGE if nonzero else RAM_SAVE_FLAG_ZERO
            if f.savevm.last_sent_block == block:
                hdr += _RECORD.pack(offset | flags | RAM_SAVE_FLAG_CONTINUE, e - s)
            else:
                hdr += _BE64.pack(offset | flags) + _counted(block) + _BE32.pack(e - s)
                f.savevm.last_sent_block = block
            if nonzero:
                normal += e - s
                iov.append(bytes(hdr))
                hdr.clear()
                iov.append(chunk[s * PAGE_SIZE : e * PAGE_SIZE])
            else:
                zero += e - s
        if iov:
            f.put_iov(iov)
        if hdr:  # trailing ZERO records wait in the small buffer for the next send
            f.put_bytes(hdr)
    return normal, zero


def qemu_save_device_state(
    f: QEMUFileOut, name: str, instance_id: int, version_id: int, payload: bytes
) -> None:
    """One device's state as a QEMU_VM_SECTION_FULL (vmstate_save()), with a length so it stays opaque."""
    if f.savevm.ram_section is not None:
        raise ValueError("close the RAM section before saving devices")
    sid = _section_header(f, QEMU_VM_SECTION_FULL, name, instance_id, version_id)
    f.put_be32(len(payload))
    if len(payload) >= PAGE_SIZE:
        f.put_buffer(memoryview(payload))
    else:
        f.put_bytes(payload)
    _section_footer(f, sid)


def qemu_savevm_state_end(f: QEMUFileOut) -> None:
    """QEMU_VM_EOF ends the stream; everything buffered is flushed."""
    if f.savevm.ram_section is not None:
        raise ValueError("a RAM section is still open")
    f.put_byte(QEMU_VM_EOF)
    f.flush()


# --------------------------------------------------------------------------------------------------------
# Load side (destination)


@dataclass
class LoadStats:
    """What qemu_loadvm_state() saw: pages by kind, stream bytes, and each section's idstr in order."""

    normal_pages: int = 0
    zero_pages: int = 0
    bytes: int = 0
    sections: list[str] = field(default_factory=list)


@dataclass
class _RamLoad:
    """Per-stream RAM state on the destination (ram_load_precopy()'s view of the RAM blocks)."""

    ram: Callable[[str], memoryview]
    zero_page_needs_write: Callable[[str], bool] | None
    lengths: dict[str, int] = field(default_factory=dict)
    views: dict[str, memoryview] = field(default_factory=dict)
    zero_check: dict[str, bool] = field(default_factory=dict)


def _check_footer(f: QEMUFileIn, idstr: str, sid: int) -> None:
    """check_section_footer()."""
    if f.get_byte() != QEMU_VM_SECTION_FOOTER:
        raise StreamError(f"Missing section footer for {idstr}")
    read_id = f.get_be32()
    if read_id != sid:
        raise StreamError(
            f"Mismatched section id in footer for {idstr} - read 0x{read_id:x} expected 0x{sid:x}"
        )


def _ram_load_setup(f: QEMUFileIn, rl: _RamLoad, on_ram_blocks) -> None:
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
    if on_ram_blocks is not None:
        on_ram_blocks(blocks)
    for name, length in blocks:
        try:
            mv = memoryview(rl.ram(name)).cast("B")
        except (KeyError, LookupError) as e:
            raise StreamError(f"Unknown RAM block {name}") from e
        if mv.readonly:
            raise StreamError(f"RAM block {name} is read-only here")
        if len(mv) != length:
            raise StreamError(f"Length mismatch: {name}: 0x{length:x} in != 0x{len(mv):x}")
        rl.views[name] = mv
        rl.zero_check[name] = rl.zero_page_needs_write(name) if rl.zero_page_needs_write else True


def _ram_handle_zero(mv: memoryview) -> None:
    """ram_handle_zero(): write zeros only to pages that are not zero already (a fresh mapping is)."""
    pages = np.frombuffer(mv, dtype=np.uint64).reshape(-1, PAGE_SIZE // 8)
    nz = pages.any(axis=1)
    if nz.any():
        pages[nz] = 0


def _ram_load_pages(f: QEMUFileIn, rl: _RamLoad, stats: LoadStats) -> None:
    """ram_load_precopy(): records until EOS; pages land straight in the block's memory.

    Every record is read as ``be64 offset|flags`` + ``be32 npages`` in one step: for a CONTINUE record that
    is its whole header, and any valid stream has at least 12 bytes after a record's start (EOS is followed
    by a 5-byte footer and the EOF byte), so reading ahead cannot misjudge a good stream.
    """
    block: str | None = None
    limit = 0
    view = memoryview(b"")
    zero_check = True
    while True:
        addr, npages = f.get_struct(_RECORD)
        flags = addr & ~TARGET_PAGE_MASK
        addr &= TARGET_PAGE_MASK
        if flags == RAM_SAVE_FLAG_EOS:
            f.unget(4)
            return
        kind = flags & ~RAM_SAVE_FLAG_CONTINUE
        if kind != RAM_SAVE_FLAG_PAGE and kind != RAM_SAVE_FLAG_ZERO:
            raise StreamError(f"Unknown combination of migration flags: 0x{flags:x}")
        if not flags & RAM_SAVE_FLAG_CONTINUE:
            # the 4 bytes read as npages were the name's length byte and its first bytes
            f.unget(4)
            name = f.get_counted_string()
            if name not in rl.views:
                raise StreamError(f"Unknown RAM block {name}")
            block, limit, view, zero_check = name, rl.lengths[name], rl.views[name], rl.zero_check[name]
            npages = f.get_be32()
        elif block is None:
            raise StreamError("Ack, bad migration stream!")
        end = addr + npages * PAGE_SIZE
        if end > limit:
            raise StreamError(f"Illegal RAM offset {max(addr, limit):x}")
        if kind == RAM_SAVE_FLAG_PAGE:
            f.read_into(view[addr:end])
            stats.normal_pages += npages
        else:
            if zero_check and npages:
                _ram_handle_zero(view[addr:end])
            stats.zero_pages += npages


def qemu_loadvm_state(
    f: QEMUFileIn,
    ram: Callable[[str], memoryview],
    on_device: Callable[[str, int, int, bytes], None],
    on_ram_blocks: Callable[[list[tuple[str, int]]], None] | None = None,
    max_device_payload: int = 16 << 20,
    zero_page_needs_write: Callable[[str], bool] | None = None,
) -> LoadStats:
    """Read a whole stream up to QEMU_VM_EOF, validating everything before it touches memory.

    ``ram(name)`` gives a block's writable memory (asked once, after ``on_ram_blocks`` saw the list);
    ``on_device(idstr, instance_id, version_id, payload)`` gets each device section;
    ``zero_page_needs_write(name)`` may say False for a block known to be all zeros (a fresh memfd), which
    skips even reading it for ZERO runs (reading a fresh shared mapping would allocate its pages).
    """
    start = f.bytes_received
    stats = LoadStats()
    magic = f.get_be32()
    if magic != QEMU_VM_FILE_MAGIC:
        raise StreamError(f"Not a migration stream (bad magic {magic:x})")
    version = f.get_be32()
    if version != QEMU_VM_FILE_VERSION:
        raise StreamError(f"Unsupported migration stream version {version}")
    rl = _RamLoad(ram, zero_page_needs_write)
    sections: dict[int, str] = {}
    while True:
        section_type = f.get_byte()
        if section_type == QEMU_VM_EOF:
            break
        if section_type in (QEMU_VM_SECTION_START, QEMU_VM_SECTION_FULL):
            sid = f.get_be32()
            idstr = f.get_counted_string()
            instance_id = f.get_be32()
            version_id = f.get_be32()
            if section_type == QEMU_VM_SECTION_START:
                if idstr != RAM_SECTION_IDSTR or instance_id != 0:
                    raise StreamError(
                        f"Unknown savevm section or instance '{idstr}' {instance_id}. Make sure that your current "
                        "VM setup matches your saved VM setup, including any hotplugged devices"
                    )
                if version_id > RAM_SECTION_VERSION:
                    raise StreamError(
                        f"qemu_loadvm_section_start_full: unsupported version {version_id} for '{idstr}' "
                        f"v{RAM_SECTION_VERSION}"
                    )
                if RAM_SECTION_IDSTR in sections.values():
                    raise StreamError("RAM setup section sent twice")
                sections[sid] = idstr
                _ram_load_setup(f, rl, on_ram_blocks)
            else:
                size = f.get_be32()
                if size > max_device_payload:
                    raise StreamError(
                        f"Section {idstr} payload length {size} exceeds the limit of {max_device_payload}"
                    )
                payload = f.get_bytes(size)
                _check_footer(f, idstr, sid)
                on_device(idstr, instance_id, version_id, payload)
                stats.sections.append(idstr)
                continue
        elif section_type in (QEMU_VM_SECTION_PART, QEMU_VM_SECTION_END):
            sid = f.get_be32()
            idstr = sections.get(sid, "")
            if idstr != RAM_SECTION_IDSTR:
                raise StreamError(f"Unknown savevm section {sid}")
            _ram_load_pages(f, rl, stats)
        else:
            raise StreamError(f"Unknown savevm section type {section_type}")
        _check_footer(f, idstr, sid)
        stats.sections.append(idstr)
    stats.bytes = f.bytes_received - start
    return stats
