"""One QMP client for scripts, notebook cells and widget callbacks: qemu.qmp's QMPClient on its own loop thread.

Inside a Jupyter kernel an event loop is already running, so qemu.qmp's synchronous shim fails there
("This event loop is already running"). Keeping the async QMPClient on a private background loop and calling it
through run_coroutine_threadsafe(...).result(timeout) works the same from a script, a cell or a button click,
and every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, StateError

DEFAULT_TIMEOUT = 30.0


class QMPCommandError(Exception):
    """A command answered with an error: `error_class` is QEMU's class, str() is its text."""

    def __init__(self, command: str, error_class: str, desc: str):
        super().__init__(desc)
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QMPTimeout(TimeoutError):
    pass


class _LoopThread:
    """A process-wide asyncio loop on a daemon thread that every QMP client shares."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None
    _pid: int | None = None

    @classmethod
    def get(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None or cls._pid != os.getpid():
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="labkit-qmp", daemon=True).start()
                cls._loop, cls._pid = loop, os.getpid()
            return cls._loop


class QMP:
    """A connected QMP monitor: cmd() to execute, events to read, wait_event() to wait for one."""

    def __init__(self, name: str = "labkit"):
        self.name = name
        self.loop = _LoopThread.get()
        self._client: QMPClient | None = None
        self._pump: Any = None
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self.greeting: dict[str, Any] | None = None

    def _run(self, coro: Coroutine[Any, Any, Any], timeout: float | None) -> Any:
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise QMPTimeout(f"QMP: no answer within {timeout} s") from None

    def connect(
        self, path: str, timeout: float = DEFAULT_TIMEOUT, alive: Callable[[], bool] | None = None
    ) -> None:
        """Connect to a unix socket, waiting for it to appear (a VM opens its monitor some time after it starts)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                raise ConnectionError(f"QMP: the process behind {path} exited before its monitor opened")
            if os.path.exists(path):
                try:
                    self._run(self._connect(path), max(0.1, deadline - time.monotonic()))
                    return
                except (ConnectError, OSError, QMPTimeout) as e:
                    last = e
            # poll briskly: a cpr-transfer destination may resume soon after its monitor appears, and QEMU
            # keeps no event history for a client that connects late
            time.sleep(0.001)
        raise QMPTimeout(f"QMP: could not connect to {path} within {timeout} s ({last})")

    async def _connect(self, path: str) -> None:
        client = QMPClient(self.name)
        await client.connect(path)
        self._client = client
        self.greeting = dict(client.greeting._raw) if client.greeting else None
        self._pump = asyncio.ensure_future(self._pump_events(client))

    async def _pump_events(self, client: QMPClient) -> None:
        async for event in client.events:
            ev = dict(event)
            with self._cond:
                self.events.append(ev)
                self._cond.notify_all()

    def cmd(
        self, command: str, args: dict[str, Any] | None = None, timeout: float = DEFAULT_TIMEOUT, **kwargs: Any
    ) -> Any:
        """Execute a command and return its "return" value; raise QMPCommandError on an error answer."""
        if self._client is None:
            raise ConnectionError("QMP: not connected")
        arguments = {**(args or {}), **{k.replace("_", "-"): v for k, v in kwargs.items()}}
        try:
            return self._run(self._client.execute(command, arguments or None), timeout)
        except ExecuteError as e:
            raise QMPCommandError(command, e.error_class, str(e)) from None
        except (ExecInterruptedError, StateError) as e:
            # the monitor went away under the command (the VM quit, died, or exec'd a new program)
            raise ConnectionError(f"QMP: {command}: the monitor disconnected ({e})") from None

    def wait_event(
        self,
        name: str,
        timeout: float = DEFAULT_TIMEOUT,
        match: Callable[[dict[str, Any]], bool] | None = None,
        after: int = 0,
    ) -> dict[str, Any]:
        """Wait for an event (seen at index >= after) named `name` and matching `match`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for ev in self.events[after:]:
                    if ev.get("event") == name and (match is None or match(ev)):
                        return ev
                left = deadline - time.monotonic()
                if left <= 0:
                    raise QMPTimeout(f"QMP: no {name} event within {timeout} s")
                self._cond.wait(left)

    def close(self) -> None:
        if self._client is None:
            return
        client, self._client = self._client, None
        try:
            self._run(self._disconnect(client), 5)
        except (QMPTimeout, OSError, Exception):  # noqa: BLE001 - closing must never raise
            pass

    async def _disconnect(self, client: QMPClient) -> None:
        if self._pump is not None:
            self._pump.cancel()
        await client.disconnect()

    @property
    def connected(self) -> bool:
        return self._client is not None
