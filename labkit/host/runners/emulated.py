"""The emulated backend: `python -m labkit.vm` with QEMU's options, so it runs wherever labkit is installed."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from labkit.host.hardware import VMConfig

if TYPE_CHECKING:
    from labkit.host.machine import Machine


def emulated_argv(config: VMConfig, qmp_path: str) -> list[str]:
    return [sys.executable, "-m", "labkit.vm", *config.emulated_argv(qmp_path)]


class EmulatedOps:
    """The emulated VM answers everything itself, through its x-labkit-* QMP commands."""

    name = "emulated"

    def argv(self, config: VMConfig, qmp_path: str) -> list[str]:
        return emulated_argv(config, qmp_path)

    def guest_stats(self, m: Machine) -> dict:
        return m.cmd("x-labkit-guest-stats", timeout=10)

    def reset_gap(self, m: Machine) -> None:
        m.cmd("x-labkit-guest-stats", {"reset-gap": True}, timeout=10)

    def verify(self, m: Machine) -> dict:
        return m.cmd("x-labkit-verify", timeout=120)

    def ram_blocks(self, m: Machine) -> list[dict]:
        return m.cmd("x-labkit-ram-blocks", timeout=10)

    def events(self, m: Machine) -> list[dict]:
        return m.cmd("x-labkit-events", timeout=10)

    def checkpoints(self, m: Machine) -> list[dict]:
        """The checkpoints labkit-vm records under QEMU's trace-point names, already on CLOCK_MONOTONIC."""
        return [{**c, "kind": "checkpoint", "detail": ""} for c in m.cmd("x-labkit-checkpoints", timeout=10)]
