"""What many tests share: waiting for a condition, naming a unix channel, QEMU 10.0.2's observed event order."""

from __future__ import annotations

import time
from collections.abc import Callable

# The source's events in cpr-transfer, as QEMU 10.0.2 emitted them here (docs/real-qemu-figures.md)
CPR_TRANSFER_SOURCE_EVENTS = [
    "MIGRATION setup",
    "STOP",
    "MIGRATION_PASS",
    "MIGRATION active",
    "MIGRATION device",
    "MIGRATION_PASS",
    "MIGRATION completed",
]


def wait_for(cond: Callable[[], object], what: str, timeout: float = 20, interval: float = 0.01):
    """Poll cond() until it returns something true, and return that; fail the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def unix(path, ctype: str = "main") -> dict:
    """A MigrationChannel on a unix socket, as QMP's migrate takes it."""
    return {"channel-type": ctype, "addr": {"transport": "socket", "type": "unix", "path": str(path)}}
