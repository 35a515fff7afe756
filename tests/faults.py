"""Faults mid-migration: the table of fault points, a relay that can cut or stall the main channel, fd census.

A migration can break at every phase: the destination dies while it waits on the cpr channel, after it took the
fds, while the main stream runs, while it loads device state or just before it resumes; the main channel can be
cut from either end; the source can die. QEMU's answer is always the same two rules, and this table (exercised
by tests/test_faults.py, rendered into docs/faults.md by scripts/fault_table.py from what the tests observed)
shows them phase by phase:

* the destination dies *before* the source switched over: the source reports ``failed`` with a reason and its
  guest runs on (QEMU's migration_iteration_finish() restarts it), memory intact;
* *after* the source sent everything (``completed``, ``postmigrate``): there is no return path, so the source
  cannot know; ``cont`` resumes it, its memory intact (with cpr-transfer the very same memfds).

StreamRelay sits on the main channel between source and destination (a real UNIX socket in the middle) so a
test or a notebook can cut the stream at an exact byte, or let the destination starve there.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import threading
from collections import Counter
from dataclasses import dataclass

from labkit.host.procfs import read_fds

__all__ = ["FaultPoint", "FAULTS", "StreamRelay", "fd_census", "unix_socket_listening", "DEVICE_SECTION_MARK"]

#: Where the "cpu" device section starts in a main stream: its counted idstr, then instance 0.
DEVICE_SECTION_MARK = b"\x03cpu\x00\x00\x00\x00"

BEFORE = "source `failed` with a reason, guest runs on, memory intact"
AFTER = "source `completed` (no return path), `cont` resumes it, memory intact"


@dataclass(frozen=True)
class FaultPoint:
    """One row of the fault table: where the migration is broken, how, and what QEMU's rules expect."""

    id: str
    mode: str  # normal | cpr-transfer | cpr-reboot
    phase: str  # the phase the fault hits, in the lab's words
    fault: str  # what is done to which process or channel
    expected: str  # QEMU's behaviour, in one line


FAULTS: tuple[FaultPoint, ...] = (
    # -- cpr-transfer ------------------------------------------------------------------------------------
    FaultPoint(
        "cpr-transfer/dst-killed-waiting-on-cpr",
        "cpr-transfer",
        "destination waiting on the cpr channel (before `migrate`)",
        "SIGKILL the destination; then `migrate`",
        "`migrate` fails at once (connect refused); guest never stopped",
    ),
    FaultPoint(
        "cpr-transfer/dst-killed-at-cpr-load",
        "cpr-transfer",
        "CPR state (fds) in the destination's socket, not yet read (hold cpr-load)",
        "SIGKILL the destination",
        BEFORE,
    ),
    FaultPoint(
        "cpr-transfer/dst-killed-after-fds",
        "cpr-transfer",
        "destination mapped the memfds and listens on main (source held at cpr-hup)",
        "SIGKILL the destination, then let the source connect",
        BEFORE,
    ),
    FaultPoint(
        "cpr-transfer/dst-killed-main-connected",
        "cpr-transfer",
        "main channel connected, guest stopped (source held at main-connected)",
        "SIGKILL the destination, then let the source send",
        BEFORE + " (restarted)",
    ),
    FaultPoint(
        "cpr-transfer/channel-cut-by-dst-end",
        "cpr-transfer",
        "main channel connected, guest stopped (source held at main-connected)",
        "the destination's end of the main channel is closed before the first byte (relay drops it)",
        BEFORE + "; destination exits 1 naming the fault in QEMU's words",
    ),
    FaultPoint(
        "cpr-transfer/dst-killed-loading-devices",
        "cpr-transfer",
        "destination in the middle of the cpu device section",
        "SIGKILL the destination (relay stalls it mid-section)",
        AFTER,
    ),
    FaultPoint(
        "cpr-transfer/dst-killed-before-resume",
        "cpr-transfer",
        "stream loaded, about to resume (destination held at loaded)",
        "SIGKILL the destination",
        AFTER,
    ),
    FaultPoint(
        "cpr-transfer/src-killed-after-fds",
        "cpr-transfer",
        "destination holds the memfds and listens on main (source held at cpr-hup)",
        "SIGKILL the source",
        "destination waits in `inmigrate` (as QEMU); the guest memory is intact in its memfds; `quit` exits 0",
    ),
    FaultPoint(
        "cpr-transfer/src-killed-main-connected",
        "cpr-transfer",
        "main channel connected, nothing sent (source held at main-connected)",
        "SIGKILL the source",
        "destination load fails: exits 1 naming the fault in QEMU's words",
    ),
    # -- normal ------------------------------------------------------------------------------------------
    FaultPoint(
        "normal/dst-killed-before-migrate",
        "normal",
        "destination listening on main (before `migrate`)",
        "SIGKILL the destination; then `migrate`",
        BEFORE + " (connect refused)",
    ),
    FaultPoint(
        "normal/dst-killed-main-connected",
        "normal",
        "main channel connected, nothing sent (source held at main-connected)",
        "SIGKILL the destination, then let the source send",
        BEFORE,
    ),
    FaultPoint(
        "normal/dst-killed-at-switchover",
        "normal",
        "pre-copy converged, guest about to stop (source held at switchover)",
        "SIGKILL the destination, then let the source switch over",
        BEFORE + " (restarted)",
    ),
    FaultPoint(
        "normal/channel-cut-by-dst-end",
        "normal",
        "pre-copy pass 1 running (1 MiB of RAM sent)",
        "the destination's end of the main channel is closed (relay drops it)",
        BEFORE + "; destination exits 1 naming the fault in QEMU's words",
    ),
    FaultPoint(
        "normal/channel-closed-by-src-end",
        "normal",
        "pre-copy running at 8 MiB/s",
        "`migrate_cancel`: the source shuts its end of the channel down",
        "source `cancelled`, guest runs on, memory intact; destination exits 1 naming the fault in QEMU's words",
    ),
    FaultPoint(
        "normal/dst-frozen-then-cancel",
        "normal",
        "source blocked writing to a destination that stopped reading (SIGSTOP)",
        "`migrate_cancel`",
        "source `cancelled` (the blocked write is woken), guest runs on, memory intact",
    ),
    FaultPoint(
        "normal/dst-killed-loading-devices",
        "normal",
        "destination in the middle of the cpu device section",
        "SIGKILL the destination (relay stalls it mid-section)",
        AFTER,
    ),
    FaultPoint(
        "normal/dst-killed-before-resume",
        "normal",
        "stream loaded, about to resume (destination held at loaded)",
        "SIGKILL the destination",
        AFTER,
    ),
    FaultPoint(
        "normal/src-killed-at-switchover",
        "normal",
        "pre-copy converged (source held at switchover)",
        "SIGKILL the source",
        "destination load fails: exits 1 naming the fault in QEMU's words",
    ),
    # -- cpr-reboot --------------------------------------------------------------------------------------
    FaultPoint(
        "cpr-reboot/src-killed-while-saving",
        "cpr-reboot",
        "guest stopped, state file opened, nothing written (source held at main-connected)",
        "SIGKILL the source; restore the file in a new process",
        "the restoring process exits 1 naming the fault in QEMU's words",
    ),
    FaultPoint(
        "cpr-reboot/truncated-state-file",
        "cpr-reboot",
        "state saved (source `completed`, not yet quit)",
        "truncate the state file to half, restore it in a new process",
        "the restoring process exits 1 naming the fault in QEMU's words; `cont` resumes the source, memory intact",
    ),
    FaultPoint(
        "cpr-reboot/dst-killed-before-resume",
        "cpr-reboot",
        "state file loaded, about to resume (restoring process held at loaded)",
        "SIGKILL the restoring process; restore again in another",
        "the file is intact: the second restore completes, memory intact",
    ),
)


def fd_census(pid: int | str) -> Counter:
    """What a process holds open, by kind (memfds by name): equal before and after a fault means no leak."""
    out: Counter = Counter()
    for f in read_fds(pid):
        out[f"memfd:{f.memfd_name}" if f.kind == "memfd" else f.kind] += 1
    return out


def unix_socket_listening(path: str) -> bool:
    """Is a socket bound at ``path`` listening yet (and 0600)? Read from /proc/net/unix, without connecting.

    A VM binds its socket file, sets its mode, then listens: a client that connects as soon as the file
    exists can be refused. Waiting for this instead (QEMU's own tests pass a listening fd instead) avoids that.
    """
    acceptcon = 0x10000  # __SO_ACCEPTCON in the Flags column
    tmp_prefix = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.")
    try:
        if os.stat(path).st_mode & 0o777 != 0o600:
            return False
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                cols = line.split(None, 7)
                if len(cols) == 8 and int(cols[3], 16) & acceptcon:
                    bound = cols[7].rstrip("\n")
                    # labkit binds under a temporary name and renames into place once listening
                    # (channels.unix_listen): /proc keeps the name it was bound to
                    if bound == path or bound.startswith(tmp_prefix):
                        return True
    except OSError:
        return False
    return False


class StreamRelay:
    """A man in the middle of the main channel: the source connects to ``front``, the relay to ``back``.

    It forwards the source's bytes until ``limit`` bytes (or the end of ``mark`` plus ``extra`` bytes) went
    through, then either ``cut``s (closes both connections: the destination sees the stream end, the source's
    next write fails) or ``stall``s (keeps reading the source, forwards nothing more: the destination starves
    right there). ``reached`` is set at that point. Use as a context manager.
    """

    def __init__(
        self,
        front: str,
        back: str,
        limit: int | None = None,
        mark: bytes | None = None,
        extra: int = 0,
        then: str = "stall",
    ):
        if then not in ("cut", "stall"):
            raise ValueError("then must be 'cut' or 'stall'")
        self.front, self.back = front, back
        self.limit, self.mark, self.extra, self.then = limit, mark, extra, then
        self.forwarded = 0  # bytes handed to the destination
        self.received = 0  # bytes read from the source
        self.reached = threading.Event()
        self.done = threading.Event()
        self._stop_r, self._stop_w = os.pipe()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        os.fchmod(self._listener.fileno(), 0o600)
        self._listener.bind(front)
        self._listener.listen(1)
        self._thread = threading.Thread(target=self._run, name="stream-relay", daemon=True)
        self._thread.start()

    def _find_cut(self, window: bytes, base: int) -> int | None:
        """Stream offset where forwarding stops, once it is known (``window`` starts at offset ``base``)."""
        if self.limit is not None:
            return self.limit
        i = window.find(self.mark) if self.mark else -1
        return None if i < 0 else base + i + len(self.mark) + self.extra

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        src = dst = None
        tail, tail_base = b"", 0  # the last bytes seen, enough to find a mark split over two reads
        try:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._stop_r, selectors.EVENT_READ)
            if not any(k.fileobj == self._listener for k, _ in sel.select()):
                return
            src, _ = self._listener.accept()
            sel.unregister(self._listener)
            dst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            dst.connect(self.back)
            sel.register(src, selectors.EVENT_READ)
            cut = None
            if self.limit == 0:  # cut or stall before the first byte
                cut = 0
                self.reached.set()
                if self.then == "cut":
                    return
            while True:
                if not any(k.fileobj is src for k, _ in sel.select()):
                    return  # close() asked us to stop
                data = src.recv(1 << 16)
                if not data:
                    if self.reached.is_set() and self.then == "stall":
                        sel.unregister(src)  # the source is done; the destination keeps starving
                        sel.select()
                    return
                start = self.received
                self.received += len(data)
                if cut is None:
                    window = tail + data
                    cut = self._find_cut(window, tail_base)
                    keep = len(self.mark) - 1 if self.mark else 0
                    tail = window[-keep:] if keep else b""
                    tail_base = self.received - len(tail)
                if cut is None or self.forwarded < cut:
                    n = len(data) if cut is None else max(0, min(len(data), cut - start))
                    dst.sendall(data[:n])
                    self.forwarded += n
                if cut is not None and self.forwarded >= cut and not self.reached.is_set():
                    self.reached.set()
                    if self.then == "cut":
                        return
        except OSError:
            return
        finally:
            for s in (src, dst):
                if s is not None:
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)
                    s.close()
            sel.close()
            self.done.set()

    def close(self) -> None:
        """Stop relaying, close both connections and the listener, remove the socket file."""
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")
        self._thread.join(10)
        self._listener.close()
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.front)

    def __enter__(self) -> StreamRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
