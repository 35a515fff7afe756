"""monitor/monitor.c and chardev/char-socket.c: the monitor a VM opens, its events and its listening socket.

One Monitor per VM: commands are registered on it, events are emitted from any thread and sent to the
negotiated client, and the unix socket serves one client at a time, as QEMU's -qmp server does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from labkit.vm.monitor.qmp import QMPSession
from labkit.vm.monitor.qmp_cmds_control import qmp_capabilities, query_commands, query_version
from labkit.vm.qapi.qmp_registry import QmpCommand, QmpCommandList
from labkit.vm.qapi.qobject_input_visitor import Schema, parse_schema
from labkit.vm.qobject.json_writer import qobject_to_json_line

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 16

# An event as listeners see it: {"timestamp": {...}, "event": NAME, "data": {...}}
Event = dict[str, Any]


class Monitor:
    """A QMP monitor served on a unix socket, one client at a time (``-qmp unix:P,server=on,wait=off``).

    Runs on the VM process's asyncio loop; only ``emit_event`` may be called from other threads.
    """

    def __init__(self, version: tuple[int, int, int] = (10, 0, 2), package: str = "labkit-vm"):
        self.version = version
        self.package = package
        self._commands = QmpCommandList()
        self._listeners: list[Callable[[Event], None]] = []
        # While this answers True, events from other threads are stamped and queued but the loop thread is not
        # woken to send them (release_events does): the VM holds them while the guest is stopped for
        # migration's completion, so that no GIL hand-over to the loop thread lands inside the pause.
        self.hold_events: Callable[[], bool] | None = None
        self._event_lock = threading.RLock()
        self._event_queue: deque[tuple[QMPSession, Event]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._lsock: socket.socket | None = None
        self._path: str | None = None
        self._inode: tuple[int, int] | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._session: QMPSession | None = None
        self._dispatchers: set[asyncio.Task[None]] = set()
        self._register_builtin("qmp_capabilities", qmp_capabilities, {"*enable": "list"})
        self._register_builtin(
            "query-version", lambda session, args: query_version(self.version, self.package), None
        )
        self._register_builtin("query-commands", lambda session, args: query_commands(self._commands), None)

    # commands -------------------------------------------------------------------------------
    def register(
        self,
        name: str,
        handler: Callable[[dict[str, Any]], Any],
        args: Schema | None = None,
        *,
        allow_oob: bool = False,
    ) -> None:
        """Add a command. ``args`` is a QAPI-like schema: ``{"mode": "str", "*downtime-limit": "int"}``.

        A leading '*' marks an optional member; types are str, int (int64), number, bool, any,
        dict, list, uint64/size, or a sequence of strings for an enum. ``None`` means the
        command takes no arguments, as in QAPI. ``handler(args)`` returns the 'return' value
        (None -> {}), may be a coroutine function, and raises QMPErrorResponse on failure.
        """
        self._commands.register(QmpCommand(name, handler, parse_schema(args), allow_oob))

    def _register_builtin(self, name: str, handler: Callable[..., Any], args: Schema | None) -> None:
        self._commands.register(QmpCommand(name, handler, parse_schema(args), builtin=True))

    def _greeting(self) -> bytes:
        version = query_version(self.version, self.package)
        return qobject_to_json_line({"QMP": {"version": version, "capabilities": ["oob"]}})

    # events ---------------------------------------------------------------------------------
    def add_event_listener(self, cb: Callable[[Event], None]) -> None:
        """``cb(event)`` sees every event emitted, in order, whether or not a client is connected.

        It runs in the emitting thread, under the monitor's event lock: keep it short.
        """
        with self._event_lock:
            self._listeners.append(cb)

    def emit_event(self, name: str, data: dict[str, Any] | None = None) -> None:
        """monitor_qapi_event_emit(); thread-safe. Events without data have no "data" member."""
        with self._event_lock:
            now = time.time_ns() // 1000  # g_get_real_time()
            event: Event = {
                "timestamp": {"seconds": now // 1_000_000, "microseconds": now % 1_000_000},
                "event": name,
            }
            if data is not None:
                event["data"] = data
            # Encoded when sent, by the loop thread: QEMU's exact JSON costs ~0.1 ms of Python per event, which
            # would otherwise sit in the emitting thread, i.e. inside the migration's pause.
            for cb in self._listeners:
                try:
                    cb(event)
                except Exception:
                    log.exception("QMP event listener failed")
            session = self._session
            if session is None or not session.negotiated or self._loop is None:
                return
            wake = not self._event_queue  # a flush is already due when events are queued: one wake-up
            self._event_queue.append((session, event))
            loop = self._loop
        if threading.get_ident() == self._loop_thread:
            self._flush_events()
        elif wake and not (self.hold_events is not None and self.hold_events()):
            # Each wake-up hands the GIL to the loop thread; a burst of events (a migration's completion
            # emits four within a millisecond) costs one hand-over, not four, in the middle of the pause.
            try:
                loop.call_soon_threadsafe(self._flush_events)
            except RuntimeError:  # loop already closed: the client is gone too
                pass

    def release_events(self) -> None:
        """Send what hold_events kept back: one wake-up of the loop thread for the lot."""
        with self._event_lock:
            loop = self._loop if self._event_queue else None
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed: the client is gone too
                loop.call_soon_threadsafe(self._flush_events)

    def _flush_events(self) -> None:
        while True:
            with self._event_lock:
                if not self._event_queue:
                    return
                session, event = self._event_queue.popleft()
            session.send_event(qobject_to_json_line(event))

    # serving --------------------------------------------------------------------------------
    async def serve_unix(self, path: str) -> None:
        """Bind and listen on ``path`` (mode 0600; a stale socket there is replaced, as QEMU does)."""
        if self._lsock is not None:
            raise RuntimeError("monitor is already serving")
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            os.fchmod(sock.fileno(), 0o600)  # Linux creates the socket file with this mode
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)
            except FileNotFoundError:
                pass
            sock.bind(path)
            os.chmod(path, 0o600)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
            st = os.stat(path)
        except BaseException:
            sock.close()
            raise
        self._lsock, self._path, self._inode = sock, path, (st.st_dev, st.st_ino)
        self._accept_task = self._loop.create_task(self._accept_loop(sock))

    async def _accept_loop(self, lsock: socket.socket) -> None:
        """Accept one client, serve it until it leaves, then accept the next (tcp_chr_accept)."""
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(lsock)
            try:
                conn.setblocking(False)
                _, session = await loop.connect_accepted_socket(
                    lambda: QMPSession(self._commands, self._greeting(), self._dispatchers), conn
                )
            except OSError:
                conn.close()
                continue
            self._session = session
            try:
                await asyncio.shield(session.closed)
            finally:
                self._session = None

    async def close(self) -> None:
        """Stop serving: close the listening socket and the client, unlink the socket file."""
        session = self._session
        if self._accept_task is not None:
            self._accept_task.cancel()
            try:
                await self._accept_task
            except asyncio.CancelledError:
                pass
            self._accept_task = None
        if self._lsock is not None:
            self._lsock.close()
            self._lsock = None
        if session is not None and session.transport is not None:
            session.transport.abort()
            await session.closed
        self._session = None
        for task in list(self._dispatchers):
            task.cancel()
        if self._dispatchers:
            await asyncio.gather(*self._dispatchers, return_exceptions=True)
        if self._path is not None:
            try:
                st = os.stat(self._path)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(self._path)
            except FileNotFoundError:
                pass
            self._path = None
        with self._event_lock:
            self._event_queue.clear()
