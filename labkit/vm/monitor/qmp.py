"""monitor/qmp.c: one connected QMP client (MonitorQMP): greeting, negotiation, the request queue, replies.

This is where QMP's flow control lives: requests are answered strictly in order, input waits while requests
are queued, and a client that does not read what it is sent is dropped rather than allowed to grow the
monitor's buffers without bound.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from labkit.vm.qapi.qmp_dispatch import qmp_dispatch
from labkit.vm.qapi.qmp_registry import QmpCommandList
from labkit.vm.qobject.json_lexer import JSONLexer
from labkit.vm.qobject.json_streamer import JSONMessageParser
from labkit.vm.qobject.json_writer import qobject_to_json_line

log = logging.getLogger(__name__)

EVENT_BUFFER_LIMIT = 4 << 20  # unsent bytes allowed to a client before it is dropped
WRITE_HIGH_WATER = 256 << 10  # replies wait (and reading stops) above this many unsent bytes
STALL_GRACE = 1.0  # seconds a client gets to read replies past the high-water mark before input is read on


async def monitor_qmp_dispatch(cmds: QmpCommandList, session: QMPSession, request: Any) -> bytes:
    """monitor_qmp_dispatch(): dispatch one request and encode its response; before negotiation, an unknown
    command is answered with the hint QEMU gives."""
    rsp = await qmp_dispatch(cmds, request, session)
    error = rsp.get("error")
    if error is None:
        return qobject_to_json_line(rsp)
    if not session.negotiated and error["class"] == "CommandNotFound":
        error["desc"] = "Expecting capabilities negotiation with 'qmp_capabilities'"
    try:
        return qobject_to_json_line(rsp)
    except (TypeError, ValueError):
        return qobject_to_json_line({"error": {"class": error["class"], "desc": repr(error["desc"])}})


class QMPSession(asyncio.Protocol):
    """MonitorQMP for one connection: greeting, the negotiation state and the request queue.

    Like QEMU without OOB, requests are handled strictly one after the other, and input is not
    read while requests are queued. Like QEMU, input is read on while the client is slow to read our
    replies (a client that lets EVENT_BUFFER_LIMIT of them pile up is dropped instead).
    """

    def __init__(self, commands: QmpCommandList, greeting: bytes, dispatchers: set[asyncio.Task[None]]):
        self.commands = commands
        self.greeting = greeting
        self.dispatchers = dispatchers  # the monitor's: close() cancels what is still running
        self.transport: asyncio.Transport | None = None
        self.negotiated = False  # mon->commands == &qmp_commands
        self.oob_enabled = False
        self.requests: deque[tuple[Any, str | None]] = deque()
        self.lexer = JSONLexer(JSONMessageParser(self._handle_qmp_command))
        self.lost = False
        self.eof = False
        self.reading_paused = False
        self.stalled = False  # replies above the high-water mark for STALL_GRACE: the client is not reading
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._wakeup = asyncio.Event()
        self._can_write = asyncio.Event()
        self._can_write.set()
        self.dispatcher: asyncio.Task[None] | None = None

    # asyncio.Protocol callbacks -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.send(self.greeting)
        self.dispatcher = asyncio.get_running_loop().create_task(self._dispatcher_co())
        self.dispatchers.add(self.dispatcher)
        self.dispatcher.add_done_callback(self.dispatchers.discard)

    def data_received(self, data: bytes) -> None:
        self.lexer.feed(data)
        if self.requests and not self.reading_paused and not self.lost:
            assert self.transport is not None  # set by connection_made(), before any data
            self.transport.pause_reading()  # monitor_suspend()
            self.reading_paused = True

    def eof_received(self) -> bool:
        self.eof = True
        self._wakeup.set()
        return True  # keep writing the answers to what was already received

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.requests.clear()  # monitor_qmp_cleanup_queue_and_resume()
        self._can_write.set()
        self._wakeup.set()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self.stalled = False
        self._can_write.set()

    # ----------------------------------------------------------------------------------------
    def _handle_qmp_command(self, obj: Any, err: str | None) -> None:
        self.requests.append((obj, err))
        self._wakeup.set()

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.lost and not self.transport.is_closing():
            self.transport.write(data)

    def send_event(self, data: bytes) -> None:
        """Events cannot wait for a slow reader: drop a client that lets them pile up."""
        if self.transport is None or self.lost or self.transport.is_closing():
            return
        if self.transport.get_write_buffer_size() + len(data) > EVENT_BUFFER_LIMIT:
            log.warning("QMP client is not reading its events; disconnecting it")
            self.transport.abort()
            return
        self.transport.write(data)

    async def _client_stopped_reading(self) -> bool:
        """Replies are past the high-water mark. A client that reads gets STALL_GRACE to catch up (input
        waits meanwhile). One that does not: QEMU 10 keeps reading it however far behind it falls (its
        output buffer grows without bound); this monitor keeps reading too, so the sender never blocks, and
        drops the client once EVENT_BUFFER_LIMIT of answers are unread, as for events. True when dropped."""
        assert self.transport is not None
        if not self.stalled:
            try:
                await asyncio.wait_for(self._can_write.wait(), STALL_GRACE)
                return False
            except TimeoutError:
                self.stalled = True  # until resume_writing(): the client drained what it had
        if self.transport.get_write_buffer_size() <= EVENT_BUFFER_LIMIT:
            return False
        log.warning("QMP client is not reading its replies; disconnecting it")
        self.transport.abort()
        return True

    async def _dispatcher_co(self) -> None:
        """monitor_qmp_dispatcher_co(): answer queued requests in order."""
        assert self.transport is not None  # started by connection_made()
        while not self.lost:
            if self.requests:
                obj, err = self.requests.popleft()
                if err is not None:
                    rsp = qobject_to_json_line({"error": {"class": "GenericError", "desc": err}})
                else:
                    rsp = await monitor_qmp_dispatch(self.commands, self, obj)
                self.send(rsp)
                if not self._can_write.is_set() and await self._client_stopped_reading():
                    return
                continue
            if self.eof:
                self.transport.close()
                return
            if self.reading_paused:
                self.reading_paused = False
                self.transport.resume_reading()  # monitor_resume()
            self._wakeup.clear()
            await self._wakeup.wait()
