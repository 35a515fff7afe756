"""Waiting on a VM: the one polling loop for every wait on something QMP announces with no event.

QMP sends events for run states and migration status, but a caller also waits on things nothing announces:
a socket file appearing (a cpr-transfer destination listening), a status only query-migrate shows, a
checkpoint. Those are polled, here. Polling is gentle (20 ms): every QMP round trip costs both processes CPU
that a 2-core machine would otherwise give to the migration being measured.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from labkit.errors import LabkitError
from labkit.host.qmp_sync import QMPCommandError, QMPTimeout

if TYPE_CHECKING:
    from labkit.host.machine import Machine


class WaitError(LabkitError):
    """A wait ended without its condition: it timed out, or the process it watched exited (its last word)."""


def wait_until(
    cond: Callable[[], bool],
    what: str,
    timeout: float,
    m: Machine | None = None,
    interval: float = 0.02,
    nap: Callable[[float], None] = time.sleep,
    between: Callable[[], None] | None = None,
) -> None:
    """Poll cond() until it holds; WaitError after `timeout` seconds or as soon as `m`'s process exits.

    A QMP error or a monitor not open yet counts as "not yet". `between` runs at each poll (the Lab's
    observers); `nap` is how to pass the interval (the Lab waits on a QMP event instead of sleeping)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if m is not None and not m.alive():
            raise WaitError(f"waiting for {what}: the process exited ({m.exit_reason()})")
        try:
            if cond():
                return
        except (QMPCommandError, QMPTimeout, ConnectionError):
            pass
        if between is not None:
            between()
        nap(interval)
    raise WaitError(f"timed out after {timeout} s waiting for {what}")
