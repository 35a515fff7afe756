"""QEMUFile (QEMU's migration/qemu-file.c): the buffered reading and writing ends of a migration channel.

Apart from the stream's sections (savevm.py) and RAM records (ram.py) because both sides and every format
ride on it: small fields are gathered in a buffer, large data goes to the kernel straight from guest RAM
(``sendmsg``), and the reader lets the kernel write pages straight into the destination's RAM (``recv_into``).
Everything is big-endian, like QEMU's ``qemu_put_be32``/``qemu_put_be64``.
"""

from __future__ import annotations

import io
import socket
import struct
from collections.abc import Callable, Sequence
from errno import EINVAL, EIO

from labkit.errors import LabkitError
from labkit.vm.migration.vmstate import SaveVMState, q35_savevm_handlers

#: Most buffers handed to one sendmsg (Linux IOV_MAX is 1024).
MAX_IOV_SIZE = 512
#: Small fields are gathered up to this size before a send (QEMU's IO_BUF_SIZE is 32 KiB).
IO_BUF_SIZE = 32768
#: The reader's read-ahead: a few hundred page records, so ram_runs.py checks and copies them in one numpy step
#: each (per-step overhead is tens of microseconds) and one recv_into brings in what the socket holds.
READ_AHEAD_SIZE = 1 << 20
#: SO_SNDBUF/SO_RCVBUF asked for on socket channels: with Linux's default (~208 KiB) source and destination
#: take turns instead of overlapping; 1 MiB lets one prepare the next chunk while the other copies
#: (scripts/bench_stream.py measures the difference).
SOCKET_BUFFER_SIZE = 1 << 20

_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


class StreamError(LabkitError):
    """The incoming stream is not a valid migration stream; the text follows QEMU's error_report()s.

    `errno` is what QEMU's qemu_loadvm_state() returns for the same fault, which QEMU's destination turns
    into its error-desc, `load of migration failed: strerror(errno)` (the text itself goes only to stderr):
    EINVAL for a stream it cannot make sense of, ENOTSUP for a stream version it does not speak, ERANGE for
    a command of the wrong length, EIO for a channel that ended or failed (qemu_fill_buffer())."""

    def __init__(self, message: str, errno: int = EINVAL):
        super().__init__(message)
        self.errno = errno


def counted_string(name: str) -> bytes:
    """qemu_put_counted_string(): one length byte, then the bytes (no NUL)."""
    raw = name.encode()
    if not 0 < len(raw) <= 255:
        raise ValueError(f"idstr {name!r} must be 1..255 bytes")
    return bytes([len(raw)]) + raw



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
        self._file = None if isinstance(sink, socket.socket) else sink
        if self._sock is not None:
            _grow_socket_buffer(self._sock, socket.SO_SNDBUF)
        self._rate_limit = rate_limit
        self._buf = bytearray()
        self._scratch = bytearray()
        #: Whether the last chunk of RAM sent had no zero page: ram.py's guess for the next (ram_runs.py)
        self.real_pages = True
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
        self.put_bytes(counted_string(s))

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

    def scratch(self, n: int) -> memoryview:
        """A reusable buffer of ``n`` bytes to assemble data in before one put: sends are synchronous, so it
        is free again once that put returns (one allocation per migration, not one per chunk)."""
        if len(self._scratch) < n:
            self._scratch = bytearray(n)
        return memoryview(self._scratch)[:n]

    def flush(self) -> None:
        """qemu_fflush(): push the buffered small fields to the channel."""
        if self._buf:
            self._writev([])

    def _writev(self, bufs: list[bytes | memoryview]) -> None:
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
        elif self._file is None:
            raise AssertionError("a QEMUFileOut writes to a socket or a file")
        elif len(bufs) > 2:  # a file: one write of the gathered pieces beats one per 4 KiB page
            _write_all(self._file, b"".join(bufs))
        else:
            for b in bufs:
                _write_all(self._file, b)


def _grow_socket_buffer(sock: socket.socket, option: int) -> None:
    """Raise a socket buffer to SOCKET_BUFFER_SIZE unless it is already larger (never shrink a tuned one)."""
    try:
        if sock.getsockopt(socket.SOL_SOCKET, option) < SOCKET_BUFFER_SIZE:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_SIZE)
    except OSError:
        pass  # not every socket family has these (and a closed socket fails later, where it matters)


def _sendmsg_all(sock: socket.socket, bufs: list[bytes | memoryview]) -> None:
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


def _write_all(sink: io.RawIOBase | io.BufferedIOBase, b: bytes | memoryview) -> None:
    mv = memoryview(b).cast("B")
    while mv:
        n = sink.write(mv)
        if n is None:
            raise BlockingIOError("migration file is non-blocking")
        mv = mv[n:]


class QEMUFileIn:
    """Reading end of a migration channel: a connected socket or a readable binary file.

    Small fields come from a bounded read-ahead buffer; ``read_into`` copies what is already buffered and
    then lets the kernel write the rest straight into the destination's memory (``recv_into``/``readinto``).
    A stream that ends early raises StreamError.
    """

    def __init__(
        self, source: socket.socket | io.RawIOBase | io.BufferedIOBase, bufsize: int = READ_AHEAD_SIZE
    ):
        self._sock = source if isinstance(source, socket.socket) else None
        self._read_into: Callable[[memoryview], int | None] = (
            source.recv_into if isinstance(source, socket.socket) else source.readinto
        )
        if self._sock is not None:
            _grow_socket_buffer(self._sock, socket.SO_RCVBUF)
        self._read_ahead = max(bufsize, 512)  # a counted string (<= 255 bytes) and a peek at one fit
        # small until the first run of pages asks for all of it (peek_buffered): 1 MiB costs ~75 us to
        # allocate, which a cpr-transfer destination would pay inside the guest's pause
        self._buf = bytearray(min(self._read_ahead, IO_BUF_SIZE))
        self._mv = memoryview(self._buf)
        self._pos = 0
        self._end = 0
        self.bytes_received = 0

    def _recv_into(self, mv: memoryview) -> int:
        n = self._read_into(mv)
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
        v: int
        self._fill(4)
        (v,) = _BE32.unpack_from(self._buf, self._pos)
        self._pos += 4
        self.bytes_received += 4
        return v

    def get_be64(self) -> int:
        v: int
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

    @property
    def read_ahead_size(self) -> int:
        return self._read_ahead

    def peek_buffered(self, need: int) -> memoryview:
        """Every unread byte already in the read-ahead buffer, after waiting for at least ``need`` (<= its
        size): what a parser of many records at once reads; skip_buffered() then consumes what it took."""
        if len(self._buf) < self._read_ahead:
            left = self._end - self._pos
            buf = bytearray(self._read_ahead)
            buf[:left] = self._mv[self._pos : self._end]
            self._buf, self._mv, self._pos, self._end = buf, memoryview(buf), 0, left
        self._fill(need)
        return self._mv[self._pos : self._end]

    def skip_buffered(self, n: int) -> None:
        """Consume ``n`` bytes that peek_buffered() showed (qemu_file_skip())."""
        if n > self._end - self._pos:
            raise ValueError(f"only {self._end - self._pos} bytes are buffered, not {n}")
        self._pos += n
        self.bytes_received += n

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
