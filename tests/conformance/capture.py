"""What the harness puts on a migration's channels to see the bytes: a tee on the main channel, a sink on cpr.

The tee stands between a source and its destination on the main channel (or plays the destination itself)
and keeps every byte the source sent, so the stream's section list can be decoded afterwards. It connects
onward only when told to, and can stop forwarding after a few bytes, which holds both sides mid-migration
(source blocked on its socket in `active`, destination waiting for data) long enough to ask both what they
report there. The cpr sink plays a cpr-transfer destination for the CPR state only: it keeps the bytes and
fds the source sent and holds the connection open, so the source waits in `setup` until it is released.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import threading
import time
from dataclasses import dataclass, field

from labkit.vm.migration.qemu_sockets import unix_listen

CHUNK = 1 << 16


SO_ACCEPTCON = 0x10000  # the flag /proc/net/unix shows for a listening socket


def listening(path: str) -> bool:
    """Whether a unix socket at `path` listens. QEMU binds before it listens, so the path alone is not
    enough (a probe connection would use up the one connection a cpr channel accepts): /proc/net/unix shows
    the socket bound at the path without the listening flag until it listens. labkit-vm binds under a
    temporary name and renames it into place once listening, so there the path alone is enough."""
    if not os.path.exists(path):
        return False
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            if len(parts) >= 8 and parts[7] == path and not int(parts[3], 16) & SO_ACCEPTCON:
                return False
    return True


def wait_listening(path: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not listening(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {path} after {timeout} s")
        time.sleep(0.005)


def _connect_unix(path: str) -> socket.socket:
    wait_listening(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.connect(path)
    except OSError:
        s.close()
        raise
    return s


class CaptureError(RuntimeError):
    """The tee could not keep the whole main stream: a harness failure, not a conformance difference."""


class MainTee:
    """Accept one source on `path`; forward to `target` (a destination's main socket) or, without one,
    swallow the stream. `start` gates connecting onward. With `pause_at`, `pause_at` bytes in the tee waits
    for `resume`: with backpressure=True it stops reading, so the source blocks mid-migration; otherwise it
    keeps reading (the source runs on undisturbed) and only holds back what it forwards."""

    def __init__(
        self, path: str, target: str | None = None, pause_at: int | None = None, backpressure: bool = False
    ) -> None:
        self.path, self.target, self.pause_at, self.backpressure = path, target, pause_at, backpressure
        self.start, self.resume = threading.Event(), threading.Event()
        self.paused = threading.Event()  # set once the tee holds at pause_at
        self.data = bytearray()
        self.error: str | None = None  # the capture itself failed: the bytes are not the whole stream
        self.forward_error: str | None = None  # only the onward copy to the destination ended early
        self._eof = False
        self._more = threading.Condition()
        self._listener = unix_listen(path)
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, name=f"tee {path}", daemon=True)
        self._thread.start()
        if target is None:
            self.start.set()

    def _hold_here(self, at: int) -> bool:
        return self.pause_at is not None and not self.resume.is_set() and at >= self.pause_at

    def _read(self, src: socket.socket) -> None:
        """Keep every byte the source sends (stopping at pause_at with backpressure)."""
        try:
            while True:
                want = CHUNK
                if self.backpressure and self.pause_at is not None and not self.resume.is_set():
                    if self._hold_here(len(self.data)):
                        self.paused.set()
                        self.resume.wait(60)
                        continue
                    want = self.pause_at - len(self.data)
                buf = src.recv(want)
                with self._more:
                    self.data += buf
                    self._eof = not buf
                    self._more.notify_all()
                if not buf:
                    return
        except OSError as e:
            self.error = f"{type(e).__name__}: {e}"
        finally:
            with self._more:
                self._eof = True
                self._more.notify_all()

    def _forward(self, dst: socket.socket) -> None:
        sent = 0
        while True:
            if not self.backpressure and self._hold_here(sent):
                self.paused.set()
                self.resume.wait(60)
                continue
            with self._more:
                while sent == len(self.data) and not self._eof:
                    self._more.wait(1)
                end = len(self.data) if self.backpressure or self.pause_at is None else None
                if end is None:
                    end = len(self.data) if self.resume.is_set() else min(len(self.data), self.pause_at)
                chunk, eof = bytes(self.data[sent:end]), self._eof and end == len(self.data)
            if chunk:
                dst.sendall(chunk)
                sent += len(chunk)
            elif eof:
                break
        # the whole stream is across: let the destination finish, then hang up
        dst.shutdown(socket.SHUT_WR)
        dst.settimeout(30)
        with contextlib.suppress(OSError):
            while dst.recv(CHUNK):
                pass

    def _run(self) -> None:
        reader = None
        try:
            self._listener.settimeout(60)
            src, _ = self._listener.accept()
            self._conns.append(src)
            reader = threading.Thread(target=self._read, args=(src,), name=f"tee reader {self.path}", daemon=True)
            reader.start()
            self.start.wait(60)
            if self.target:
                dst = _connect_unix(self.target)
                self._conns.append(dst)
                try:
                    self._forward(dst)
                except OSError as e:
                    # a destination may hang up once it has loaded (real QEMU closes main after EOF, before
                    # the vmdesc): that ends the forwarding, never the capture of what the source sends
                    self.forward_error = f"{type(e).__name__}: {e}"
        except OSError as e:
            self.error = f"{type(e).__name__}: {e}"
        finally:
            if reader is not None:
                reader.join(120)  # the capture is whole only once the source's side reached EOF
            self.paused.set()

    def close(self, require_whole: bool = False) -> bytes:
        """Stop (releasing any pause) and return every byte the source sent. With require_whole (a stream that
        is compared), a capture cut short is an error of its own (CaptureError), never a difference."""
        self.start.set()
        self.resume.set()
        self._thread.join(150 if require_whole else 60)
        if require_whole and self.error is None and (self._thread.is_alive() or not self._eof):
            self.error = "the source's stream did not reach its end within 150 s"
        for s in (*self._conns, self._listener):
            s.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        if require_whole and self.error is not None:
            raise CaptureError(f"main stream capture cut short after {len(self.data)} bytes: {self.error}")
        return bytes(self.data)


@dataclass
class CprCapture:
    """The CPR state one source sent: its bytes, and the size and inode of every fd that rode on them."""

    data: bytes = b""
    fds: list[dict] = field(default_factory=list)  # {"size", "inode"} in arrival order
    error: str | None = None


class CprSink:
    """Listen on a cpr channel path, receive one CPR state to the source's half-close, and hold the
    connection open (the source stays in `setup`, waiting for the hang-up) until `close`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.capture = CprCapture()
        self.received = threading.Event()
        self._listener = unix_listen(path)
        self._conn: socket.socket | None = None
        self._release = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"cpr sink {path}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        data, fds = bytearray(), []
        try:
            self._listener.settimeout(60)
            self._conn, _ = self._listener.accept()
            self._conn.settimeout(30)
            while True:
                msg, anc, _flags, _ = self._conn.recvmsg(CHUNK, socket.CMSG_SPACE(253 * 4))
                for level, kind, raw in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        got = array.array("i")
                        got.frombytes(raw[: len(raw) - len(raw) % got.itemsize])
                        fds += list(got)
                if not msg:
                    break
                data += msg
        except OSError as e:
            self.capture.error = f"{type(e).__name__}: {e}"
        finally:
            for fd in fds:
                st = os.fstat(fd)
                self.capture.fds.append({"size": st.st_size, "inode": st.st_ino})
                os.close(fd)
            self.capture.data = bytes(data)
            self.received.set()
        self._release.wait(120)

    def close(self) -> CprCapture:
        self._release.set()
        self._thread.join(60)
        if self._conn is not None:
            self._conn.close()
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        return self.capture
