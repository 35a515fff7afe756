"""The emulated runner: `python -m labkit.vm` with QEMU's options, so it runs wherever labkit is installed."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

from labkit.host.hardware import VMConfig
from labkit.host.runners.base import CounterLocation, Runner

if TYPE_CHECKING:
    from labkit.host.machine import Machine


def emulated_argv(config: VMConfig, qmp_path: str) -> list[str]:
    return [sys.executable, "-m", "labkit.vm", *config.emulated_argv(qmp_path)]


# Where the emulated guest keeps its counter: uint64 H_BYTES (index 5) of page 0 of the system RAM block,
# whose memfd is named after the backend's id (labkit.vm.guest; tests/test_progress.py checks the two agree).
EMULATED_COUNTER_OFFSET = 5 * 8


class EmulatedRunner(Runner):
    """The emulated VM answers everything itself, through its x-labkit-* QMP commands."""

    name = "emulated"
    description = "the emulated backend"
    slower_because = "it is Python, sharing this machine's CPUs"
    can_hold = True
    keeps_event_history = True
    has_migration_details = True
    faults_in_before_accept = True

    def argv(self, config: VMConfig, qmp_path: str) -> list[str]:
        return emulated_argv(config, qmp_path)

    def progress_counter(self, config: VMConfig) -> CounterLocation:
        return CounterLocation(config.backend_id, EMULATED_COUNTER_OFFSET)

    def hold(self, m: Machine, *points: str) -> None:
        m.cmd("x-labkit-hold", {"points": list(points)})

    def held_at(self, m: Machine) -> str | None:
        point: str | None = m.cmd("x-labkit-hold", timeout=10)["held-at"]
        return point

    def continue_(self, m: Machine, point: str) -> None:
        if point == "cpr-load":  # held before its monitor exists: a signal lets it read the CPR state
            with contextlib.suppress(ProcessLookupError):  # it may have died; connecting then says so
                os.kill(m.pid, signal.SIGUSR1)
            return
        m.cmd("x-labkit-continue", {"point": point})

    def guest_stats(self, m: Machine) -> dict[str, Any]:
        stats: dict[str, Any] = m.cmd("x-labkit-guest-stats", timeout=10)
        return stats

    def reset_gap(self, m: Machine) -> None:
        m.cmd("x-labkit-guest-stats", {"reset-gap": True}, timeout=10)

    def verify(self, m: Machine) -> dict[str, Any]:
        check: dict[str, Any] = m.cmd("x-labkit-verify", timeout=120)
        return check

    def ram_blocks(self, m: Machine) -> list[dict[str, Any]]:
        blocks: list[dict[str, Any]] = m.cmd("x-labkit-ram-blocks", timeout=10)
        return blocks

    def events(self, m: Machine) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = m.cmd("x-labkit-events", timeout=10)
        return events

    def checkpoints(self, m: Machine) -> list[dict[str, Any]]:
        """The checkpoints labkit-vm records under QEMU's trace-point names, already on CLOCK_MONOTONIC."""
        return [{**c, "kind": "checkpoint", "detail": ""} for c in m.cmd("x-labkit-checkpoints", timeout=10)]

    def checkpoint_seen(self, m: Machine, name: str) -> bool:
        return any(c["name"] == name for c in m.cmd("x-labkit-checkpoints", timeout=10))

    def migration_details(self, m: Machine) -> dict[str, Any]:
        details: dict[str, Any] = m.cmd("x-labkit-query-migrate", timeout=10)
        return details
