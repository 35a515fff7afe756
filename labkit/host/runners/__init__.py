"""Runners: what program runs a VM, and how the lab reads what QEMU itself has no command for.

"emulated" is labkit-vm; "qemu" is qemu-system-x86_64 10.x with the tiny guest. Both take the same VMConfig
and the same QMP; what differs (holds, event history, guest statistics, memory verification, where each RAM
block is mapped) is the Runner interface (base.py), with capability flags a caller asks instead of a name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from labkit.host.machine import Machine
from labkit.host.runners.base import Runner, RunnerError

if TYPE_CHECKING:
    from labkit.host.hardware import VMConfig

BACKENDS = ("emulated", "qemu")

__all__ = ["BACKENDS", "Runner", "RunnerError", "get_runner", "spawn"]


def get_runner(name: str | Runner) -> Runner:
    """The runner for a backend name ("emulated" or "qemu"); a Runner is returned as it is."""
    if isinstance(name, Runner):
        return name
    if name == "emulated":
        from labkit.host.runners.emulated import EmulatedRunner

        return EmulatedRunner()
    if name == "qemu":
        from labkit.host.runners.qemu import QemuRunner

        return QemuRunner()
    raise RunnerError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")


def spawn(
    config: VMConfig,
    backend: str | Runner = "emulated",
    connect: bool = True,
    run_dir: str | None = None,
    timeout: float = 30.0,
) -> Machine:
    """Start one VM and return its Machine (connected to QMP unless connect=False)."""
    return Machine(config, get_runner(backend), run_dir).launch(connect=connect, timeout=timeout)
