"""The main migration stream: the bytes a source VM writes and a destination (or `labkit stream-inspect`) reads.

Modelled on QEMU 10's ``migration/savevm.c`` (sections), ``migration/ram.c`` (RAM pages),
``migration/vmstate.c`` (device fields, see vmstate.py) and ``migration/qemu-file.c`` (the buffered
``QEMUFile``), with the same names and constants, so this file can be read beside QEMU's source. The layout is
QEMU 10.0.2's own, byte for byte where the emulator models the state (checked against real QEMU's streams by
tests/test_stream_inspect.py). Everything is big-endian, like QEMU's ``qemu_put_be32``/``qemu_put_be64``.

Stream layout::

    header         | be32 0x5145564d "QEVM" | be32 3 |             QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION
    configuration  | 0x07 | be32 len | machine name ("pc-q35-10.0") |            QEMU_VM_CONFIGURATION
    RAM setup      | 0x01 | be32 sec | u8 3 "ram" | be32 instance 0 | be32 version 4 |   QEMU_VM_SECTION_START
                   | be64 total | RAM_SAVE_FLAG_MEM_SIZE | then per block: | u8 len | name | be64 used length |
                   | be64 RAM_SAVE_FLAG_EOS | 0x7e | be32 sec |        EOS, section footer
    RAM pages      | 0x02 | be32 sec |   QEMU_VM_SECTION_PART, one per pass (0x03 QEMU_VM_SECTION_END: the last)
                   then one record per 4 KiB page:
                   | be64 offset | flags | (u8 len | block name) | 4096 bytes |   RAM_SAVE_FLAG_PAGE 0x08
                   | be64 offset | flags | (u8 len | block name) | u8 fill    |   RAM_SAVE_FLAG_ZERO 0x02
                   the name is left out, and RAM_SAVE_FLAG_CONTINUE 0x20 set, when the block is the one the
                   previous record named (QEMU's last_sent_block, which carries over from one section to
                   the next);
                   | be64 RAM_SAVE_FLAG_EOS 0x10 | 0x7e | be32 sec |
    switchover     | 0x08 | be16 0x0b | be16 0 |   QEMU_VM_COMMAND MIG_CMD_SWITCHOVER_START, before the END section
    device         | 0x04 | be32 sec | u8 len | idstr | be32 instance | be32 version |   QEMU_VM_SECTION_FULL
                   | fields, no length (vmstate.py) | 0x7e | be32 sec |
    end            | 0x00 |                              QEMU_VM_EOF
    vmdesc         | 0x06 | be32 len | JSON |           QEMU_VM_VMDESCRIPTION: every device section's fields

Section ids are QEMU's: numbered when QEMU registers each handler (vmstate.Q35_SAVEVM_HANDLERS), not when a
section is first sent, so "timer" is 0 and "ram" 1 although RAM goes first. In cpr-transfer the RAM START
section lists every block although all of them are ignored (no page follows), as QEMU's does.

Where this differs from QEMU (docs/conformance.md): the emulator sends only the device sections it models
(timer, cpu, serial, globalstate), and its cpu section carries the emulated vCPU's state under QEMU's name;
x-ignore-shared's per-block address, postcopy, multifd and mapped-ram fields are not written.

Speed: the writer finds zero pages with numpy over a cache-sized chunk at a time, builds that chunk's record
headers in one numpy step and hands headers and pages to one ``sendmsg`` (the pages straight from guest RAM,
not copied); the reader copies each page into the destination's guest RAM from its read-ahead buffer or
``recv_into``s it there. One record per page costs Python work per page on the reader's side (about 1 s of
CPU per GiB here, against ~0.4 s when records were runs); ``scripts/bench_stream.py`` measures it.
"""

from __future__ import annotations

import io
import json
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from errno import EINVAL, EIO, ENOTSUP, ERANGE

import numpy as np

from labkit.vm.migration.vmstate import (
    VMDesc,
    VMStateDescription,
    VMStateError,
    q35_savevm_handlers,
    vmstate_save_state,
)

PAGE_SIZE = 4096
TARGET_PAGE_BITS = 12
TARGET_PAGE_MASK = ~(PAGE_SIZE - 1)

# savevm.c
QEMU_VM_FILE_MAGIC = 0x5145564D
QEMU_VM_FILE_VERSION = 0x00000003
QEMU_VM_FILE_VERSION_COMPAT = 0x00000002  # the pre-1.0 layout QEMU refuses with its own text
QEMU_VM_EOF = 0x00
QEMU_VM_SECTION_START = 0x01
QEMU_VM_SECTION_PART = 0x02
QEMU_VM_SECTION_END = 0x03
QEMU_VM_SECTION_FULL = 0x04
QEMU_VM_SUBSECTION = 0x05
QEMU_VM_VMDESCRIPTION = 0x06
QEMU_VM_CONFIGURATION = 0x07
QEMU_VM_COMMAND = 0x08
QEMU_VM_SECTION_FOOTER = 0x7E
MIG_CMD_SWITCHOVER_START = 0x0B  # migration/savevm.c enum qemu_vm_cmd (MIG_CMD_MAX is 0x0c)
MIG_CMD_MAX = 0x0C
#: The machine type QEMU 10.0 names in its CONFIGURATION section for -machine q35.
Q35_MACHINE_NAME = "pc-q35-10.0"
SECTION_KINDS = {1: "START", 2: "PART", 3: "END", 4: "FULL"}

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
#: Largest vmdesc JSON the loader reads after EOF (QEMU's for q35 is about 44 KB).
MAX_VMDESC = 16 << 20

_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_HDR = np.dtype(">u8")


class StreamError(Exception):
    """The incoming stream is not a valid migration stream; the text follows QEMU's error_report()s.

    `errno` is what QEMU's qemu_loadvm_state() returns for the same fault, which QEMU's destination turns
    into its error-desc, `load of migration failed: strerror(errno)` (the text itself goes only to stderr):
    EINVAL for a stream it cannot make sense of, ENOTSUP for a stream version it does not speak, ERANGE for
    a command of the wrong length, EIO for a channel that ended or failed (qemu_fill_buffer())."""

    def __init__(self, message: str, errno: int = EINVAL):
        super().__init__(message)
        self.errno = errno


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
    """What savevm.c keeps in its global ``savevm_state``: registered handlers, the open RAM section, vmdesc."""

    section_ids: dict[tuple[str, int], int] = field(default_factory=dict)
    ram_blocks: dict[str, int] = field(default_factory=dict)  # name -> used length
    ram_section: int | None = None  # QEMU_VM_SECTION_PART / _END while one is open
    last_sent_block: str | None = None
    ram_started: bool = False
    vmdesc: VMDesc = field(default_factory=VMDesc)

    def register(self, idstr: str, instance_id: int) -> int:
        """register_savevm_live()/vmstate_register(): the next section id, at registration, as QEMU's."""
        return self.section_ids.setdefault((idstr, instance_id), len(self.section_ids))

    def section_id(self, idstr: str, instance_id: int) -> int:
        """The id the handler got when registered (one not in the machine's list registers now, last)."""
        return self.register(idstr, instance_id)


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
        handlers: Sequence[tuple[str, int, int | None]] | None = None,
    ):
        self._sock = sink if isinstance(sink, socket.socket) else None
        self._sink = sink
        if self._sock is not None:
            _grow_socket_buffer(self._sock, socket.SO_SNDBUF)
        self._rate_limit = rate_limit
        self._buf = bytearray()
        self.bytes_sent = 0
        self.savevm = SaveVMState()
        for idstr, instance_id, _ in q35_savevm_handlers(serial=True) if handlers is None else handlers:
            self.savevm.register(idstr, instance_id)

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
        elif len(bufs) > 2:  # a file: one write of the gathered pieces beats one per 4 KiB page
            _write_all(self._sink, b"".join(bufs))
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
    """sendmsg() until every buffer is gone (a blocking stream socket may still return short on a signal).

    Every buffer is flat bytes (``len`` is its size), so none is wrapped unless a send stops inside it."""
    i = 0
    while i < len(bufs):
        sent = sock.sendmsg(bufs[i:] if i else bufs)
        while i < len(bufs) and sent >= len(bufs[i]):
            sent -= len(bufs[i])
            i += 1
        if sent:
            bufs[i] = memoryview(bufs[i]).cast("B")[sent:]


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
        self._buf = bytearray(max(bufsize, 512))  # a counted string (<= 255 bytes) and a peek at one fit
        self._mv = memoryview(self._buf)
        self._pos = 0
        self._end = 0
        self.bytes_received = 0

    def _recv_into(self, mv: memoryview) -> int:
        n = self._sock.recv_into(mv) if self._sock is not None else self._src.readinto(mv)
        if not n:  # 0 = EOF; None = a non-blocking file with nothing ready, which a loader cannot use
            raise StreamError("Input stream ended unexpectedly", EIO)
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

    def get_counted_string(self) -> str:
        return self.get_bytes(self.get_byte()).decode(errors="backslashreplace")

    def peek(self, n: int) -> bytes:
        """The next ``n`` (<= 256) bytes without consuming them (qemu_peek_buffer())."""
        self._fill(n)
        return bytes(self._mv[self._pos : self._pos + n])

    def skip(self, n: int) -> None:
        """Read and drop ``n`` bytes (a reader that only counts, such as stream-inspect)."""
        have = min(self._end - self._pos, n)
        self._pos += have
        self.bytes_received += have
        n -= have
        if n:
            scratch = memoryview(bytearray(min(n, 1 << 20)))
            while n:
                k = min(n, len(scratch))
                self.read_into(scratch[:k])
                n -= k

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


def qemu_savevm_state_header(f: QEMUFileOut, machine: str = Q35_MACHINE_NAME) -> None:
    """savevm.c: magic and version open every stream, then the CONFIGURATION section names the machine type."""
    f.put_be32(QEMU_VM_FILE_MAGIC)
    f.put_be32(QEMU_VM_FILE_VERSION)
    name = machine.encode()
    f.put_byte(QEMU_VM_CONFIGURATION)
    f.put_be32(len(name))
    f.put_bytes(name)
    f.savevm.vmdesc.configuration = {
        "vmsd_name": "configuration",
        "version": 1,
        "fields": [
            {"name": "len", "type": "uint32", "size": 4},
            {"name": "name", "type": "buffer", "size": len(name)},
        ],
    }


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
    sid = _section_header(f, QEMU_VM_SECTION_START, RAM_SECTION_IDSTR, 0, RAM_SECTION_VERSION)
    f.put_be64(sum(length for _, length in blocks) | RAM_SAVE_FLAG_MEM_SIZE)
    for name, length in blocks:
        f.put_counted_string(name)
        f.put_be64(length)
    f.put_be64(RAM_SAVE_FLAG_EOS)
    _section_footer(f, sid)
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
    _section_header(f, section_type, RAM_SECTION_IDSTR, 0, RAM_SECTION_VERSION)
    f.savevm.ram_section = section_type


def _ram_section_close(f: QEMUFileOut) -> None:
    f.put_be64(RAM_SAVE_FLAG_EOS)
    _section_footer(f, f.savevm.section_id(RAM_SECTION_IDSTR, 0))
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
    undecided = np.flatnonzero(~nz)
    if len(undecided) * 4 > len(nz):  # mostly zero-looking: one pass over the chunk beats gathering rows
        return pages.any(axis=1)
    if len(undecided):
        nz[undecided] = pages[undecided].any(axis=1)
    return nz


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
        if detect_zero:
            nz = _nonzero_pages(np.frombuffer(chunk, dtype=np.uint64).reshape(c1 - c0, PAGE_SIZE // 8))
        else:
            nz = np.ones(c1 - c0, dtype=bool)
        name = None if f.savevm.last_sent_block == block else _counted(block)
        f.savevm.last_sent_block = block
        meta, header_ends = _chunk_records(first_page + c0, nz, name)
        mv = memoryview(meta)
        iov: list = []
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


def qemu_savevm_send_switchover_start(f: QEMUFileOut) -> None:
    """QEMU_VM_COMMAND MIG_CMD_SWITCHOVER_START: QEMU 10 sends it as the switchover begins, before the END."""
    f.put_byte(QEMU_VM_COMMAND)
    f.put_bytes(struct.pack(">HH", MIG_CMD_SWITCHOVER_START, 0))


def qemu_save_device_state(
    f: QEMUFileOut, idstr: str, instance_id: int, vmsd: VMStateDescription, values: dict
) -> int:
    """One device's state as a QEMU_VM_SECTION_FULL (vmstate_save()): fields with no length, and its vmdesc
    entry kept for the end of the stream. Returns the payload's size."""
    if f.savevm.ram_section is not None:
        raise ValueError("close the RAM section before saving devices")
    sid = _section_header(f, QEMU_VM_SECTION_FULL, idstr, instance_id, vmsd.version_id)
    before = f.bytes_sent
    desc = vmstate_save_state(f.put_bytes, vmsd, values)
    size = f.bytes_sent - before
    _section_footer(f, sid)
    f.savevm.vmdesc.devices.append({"name": idstr, "instance_id": instance_id, **desc})
    return size


def qemu_savevm_state_end(f: QEMUFileOut) -> None:
    """QEMU_VM_EOF ends the stream; the vmdesc JSON follows it (for tools, as QEMU's); everything is flushed."""
    if f.savevm.ram_section is not None:
        raise ValueError("a RAM section is still open")
    f.put_byte(QEMU_VM_EOF)
    desc = json.dumps(f.savevm.vmdesc.to_json()).encode()
    f.put_byte(QEMU_VM_VMDESCRIPTION)
    f.put_be32(len(desc))
    f.put_bytes(desc)
    f.flush()


# --------------------------------------------------------------------------------------------------------
# Load side (destination, and stream-inspect)


@dataclass
class SectionRecord:
    """One section as read: what `labkit stream-inspect` lists (QEMU's section header, offset and size)."""

    kind: str  # CONFIGURATION, START, PART, END, FULL, COMMAND, EOF, VMDESCRIPTION
    section_id: int | None
    idstr: str
    instance_id: int | None
    version_id: int | None
    offset: int
    size: int = 0
    normal_pages: int = 0
    zero_pages: int = 0


@dataclass
class LoadStats:
    """What qemu_loadvm_state() saw: pages by kind, stream bytes, every section in order, and the vmdesc."""

    normal_pages: int = 0
    zero_pages: int = 0
    bytes: int = 0
    sections: list[str] = field(default_factory=list)  # idstr of each START/PART/END/FULL, in order
    records: list[SectionRecord] = field(default_factory=list)
    machine: str | None = None
    capabilities: list[str] = field(default_factory=list)
    ram_blocks: list[tuple[str, int]] = field(default_factory=list)
    vmdesc: bytes | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class _RamLoad:
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


def _check_footer(f: QEMUFileIn, idstr: str, sid: int) -> None:
    """check_section_footer()."""
    if f.get_byte() != QEMU_VM_SECTION_FOOTER:
        raise StreamError(f"Missing section footer for {idstr}")
    read_id = f.get_be32()
    if read_id != sid:
        raise StreamError(
            f"Mismatched section id in footer for {idstr} - read 0x{read_id:x} expected 0x{sid:x}"
        )


def _load_configuration(f: QEMUFileIn, stats: LoadStats, machine: str | None) -> None:
    """vmstate_configuration: the machine type (checked as configuration_post_load() does), then its
    capabilities and uuid subsections."""
    n = f.get_be32()
    if n > 255:
        raise StreamError(f"Machine type name of {n} bytes")
    name = f.get_bytes(n).decode(errors="backslashreplace")
    if machine is not None and name != machine:
        raise StreamError(f"Machine type received is '{name}' and local is '{machine}'")
    stats.machine = name
    while f.peek(1)[0] == QEMU_VM_SUBSECTION:
        f.get_byte()
        sub = f.get_counted_string()
        f.get_be32()
        if sub == "configuration/capabilities":
            count = f.get_be32()
            if count > 64:
                raise StreamError(f"Too many capabilities ({count})")
            stats.capabilities += [f.get_counted_string() for _ in range(count)]
        elif sub == "configuration/uuid":
            f.get_bytes(16)
        else:
            raise StreamError(f"configuration: subsection {sub} not found")


def _load_command(f: QEMUFileIn) -> int:
    """loadvm_process_command(): only the switchover notice is meaningful to a precopy destination."""
    cmd, length = struct.unpack(">HH", f.get_bytes(4))
    if cmd == 0 or cmd >= MIG_CMD_MAX:
        raise StreamError(f"MIG_CMD 0x{cmd:x} unknown (len 0x{length:x})")
    if cmd == MIG_CMD_SWITCHOVER_START and length != 0:
        raise StreamError(f"SWITCHOVER_START received with bad length - expecting 0, got {length}", ERANGE)
    f.skip(length)
    return cmd


def _ram_load_setup(f: QEMUFileIn, rl: _RamLoad, stats: LoadStats, on_ram_blocks) -> None:
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


def _ram_load_pages(f: QEMUFileIn, rl: _RamLoad, rec: SectionRecord) -> None:
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
    try:
        while True:
            addr = get_be64()
            flags = addr & ~page_mask
            addr &= page_mask
            if flags == RAM_SAVE_FLAG_PAGE | continue_flag and view is not None and addr + PAGE_SIZE <= limit:
                read_into(view[addr : addr + PAGE_SIZE])  # the common record, checked in one test
                normal += 1
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
            else:
                ch = get_byte()
                if view is not None and (ch or zero_check):
                    page = view[addr : addr + PAGE_SIZE]
                    if ch:
                        page[:] = bytes([ch]) * PAGE_SIZE
                    elif bytes(page) != _ZERO_PAGE:
                        page[:] = _ZERO_PAGE
                zero += 1
    finally:
        rl.last_block = name
        rec.normal_pages += normal
        rec.zero_pages += zero


def unknown_section(idstr: str, instance_id: int) -> StreamError:
    """qemu_loadvm_section_start_full()'s error for a section this side has no handler for."""
    return StreamError(
        f"Unknown savevm section or instance '{idstr}' {instance_id}. Make sure that your current VM setup "
        "matches your saved VM setup, including any hotplugged devices"
    )


def _be32_or_zero(f: QEMUFileIn) -> int:
    """qemu_get_be32() for the header: past the end of the stream QEMU reads zeros (and notes the error
    for later), so an empty or short stream is "Not a migration stream", not an I/O error."""
    try:
        return f.get_be32()
    except StreamError:
        return 0


def qemu_loadvm_state(
    f: QEMUFileIn,
    ram: Callable[[str], memoryview | None],
    on_device: Callable[[str, int, int, QEMUFileIn], None],
    on_ram_blocks: Callable[[list[tuple[str, int]]], None] | None = None,
    zero_page_needs_write: Callable[[str], bool] | None = None,
    machine: str | None = None,
    require_configuration: bool = False,
) -> LoadStats:
    """Read a whole stream up to QEMU_VM_EOF and the vmdesc after it, validating before touching memory.

    ``ram(name)`` gives a block's writable memory, or None to count its pages without keeping them (asked
    once, after ``on_ram_blocks`` saw the list); ``on_device(idstr, instance_id, version_id, f)`` reads one
    device section's fields from ``f`` (vmstate_load()) and raises for a section it does not know;
    ``zero_page_needs_write(name)`` may say False for a block known to be all zeros (a fresh memfd);
    ``machine``, when given, must match the stream's CONFIGURATION; ``require_configuration`` refuses a
    stream without one, as a destination of a QEMU 10 machine type does (send_configuration).
    """
    start = f.bytes_received
    stats = LoadStats()
    magic, version = _be32_or_zero(f), _be32_or_zero(f)
    if magic != QEMU_VM_FILE_MAGIC:
        raise StreamError("Not a migration stream")
    if version == QEMU_VM_FILE_VERSION_COMPAT:
        raise StreamError("SaveVM v2 format is obsolete and don't work anymore", ENOTSUP)
    if version != QEMU_VM_FILE_VERSION:
        raise StreamError("Unsupported migration stream version", ENOTSUP)
    if require_configuration:  # a QEMU 10 machine sends its CONFIGURATION first; its destination insists on it
        try:
            first = f.peek(1)[0]
        except StreamError:
            first = 0  # qemu_get_byte() past the end
        if first != QEMU_VM_CONFIGURATION:
            raise StreamError("Configuration section missing")
    rl = _RamLoad(ram, zero_page_needs_write)
    sections: dict[int, str] = {}
    while True:
        offset = f.bytes_received - start
        section_type = f.get_byte()
        if section_type == QEMU_VM_EOF:
            stats.records.append(SectionRecord("EOF", None, "", None, None, offset, 1))
            break
        if section_type == QEMU_VM_CONFIGURATION:
            if stats.records:
                raise StreamError("Configuration section not at the start of the stream")
            _load_configuration(f, stats, machine)
            size = f.bytes_received - start - offset
            stats.records.append(
                SectionRecord("CONFIGURATION", None, stats.machine or "", None, None, offset, size)
            )
            continue
        if section_type == QEMU_VM_COMMAND:
            cmd = _load_command(f)
            size = f.bytes_received - start - offset
            stats.records.append(SectionRecord("COMMAND", None, f"0x{cmd:x}", None, None, offset, size))
            continue
        if section_type not in SECTION_KINDS:
            raise StreamError(f"Unknown savevm section type {section_type}")
        sid = f.get_be32()
        rec = SectionRecord(SECTION_KINDS[section_type], sid, "", None, None, offset)
        if section_type in (QEMU_VM_SECTION_START, QEMU_VM_SECTION_FULL):
            idstr = f.get_counted_string()
            instance_id = f.get_be32()
            version_id = f.get_be32()
            rec.idstr, rec.instance_id, rec.version_id = idstr, instance_id, version_id
            if section_type == QEMU_VM_SECTION_START:
                if idstr != RAM_SECTION_IDSTR or instance_id != 0:
                    raise unknown_section(idstr, instance_id)
                if version_id > RAM_SECTION_VERSION:
                    raise StreamError(
                        f"qemu_loadvm_section_start_full: unsupported version {version_id} for '{idstr}' "
                        f"v{RAM_SECTION_VERSION}"
                    )
                if RAM_SECTION_IDSTR in sections.values():
                    raise StreamError("RAM setup section sent twice")
                sections[sid] = idstr
                _ram_load_setup(f, rl, stats, on_ram_blocks)
            else:
                try:
                    on_device(idstr, instance_id, version_id, f)
                except VMStateError as e:
                    raise StreamError(
                        f"error while loading state for instance 0x{instance_id:x} of device '{idstr}': {e}"
                    ) from None
        else:
            idstr = sections.get(sid, "")
            rec.idstr = idstr
            if idstr != RAM_SECTION_IDSTR:
                raise StreamError(f"Unknown savevm section {sid}")
            _ram_load_pages(f, rl, rec)
            stats.normal_pages += rec.normal_pages
            stats.zero_pages += rec.zero_pages
        _check_footer(f, idstr, sid)
        rec.size = f.bytes_received - start - offset
        stats.records.append(rec)
        stats.sections.append(idstr)
    _load_vmdescription(f, stats, start)
    stats.bytes = f.bytes_received - start
    return stats


def _load_vmdescription(f: QEMUFileIn, stats: LoadStats, start: int) -> None:
    """After EOF QEMU reads the vmdesc too, "so that dumping tools that intercept our migration stream have
    the chance to see it"; a stream that ends at EOF is accepted, another byte only noted (as QEMU does)."""
    offset = f.bytes_received - start
    try:
        section_type = f.get_byte()
    except StreamError:
        return
    if section_type != QEMU_VM_VMDESCRIPTION:
        stats.warnings.append(f"Expected vmdescription section, but got {section_type}")
        return
    size = f.get_be32()
    if size > MAX_VMDESC:
        raise StreamError(f"vmdescription of {size} bytes exceeds the limit of {MAX_VMDESC}")
    stats.vmdesc = f.get_bytes(size)
    stats.records.append(SectionRecord("VMDESCRIPTION", None, "", None, None, offset, 5 + size))
