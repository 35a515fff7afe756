"""Backends: what program runs a VM, and how the lab reads what QEMU itself has no command for.

"emulated" is labkit-vm; "qemu" is qemu-system-x86_64 10.x with the tiny guest. Both take the same VMConfig
and the same QMP; the few things real QEMU cannot answer over QMP (guest statistics, guest memory verification,
where each RAM block is mapped, events on the host's monotonic clock) go through a BackendOps object.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from labkit.host.hardware import VMConfig
    from labkit.host.machine import Machine

BACKENDS = ("emulated", "qemu")


class BackendOps(Protocol):
    name: str

    def argv(self, config: VMConfig, qmp_path: str) -> list[str]: ...

    def guest_stats(self, m: Machine) -> dict:
        """At least heartbeat-seq, max-gap-ns (None when unknown, with "max-gap-why"), bytes-written."""

    def reset_gap(self, m: Machine) -> None: ...

    def verify(self, m: Machine) -> dict:
        """{"ok": bool, ...}: guest memory is exactly what the guest wrote."""

    def ram_blocks(self, m: Machine) -> list[dict]:
        """[{"name", "size", "host-addr"}] for each RAM block mapped by the process."""

    def events(self, m: Machine) -> list[dict]:
        """Every QMP event the VM emitted, each with "monotonic-ns" on the host's CLOCK_MONOTONIC."""

    def checkpoints(self, m: Machine) -> list[dict]:
        """QEMU's trace points the VM passed ({"name", "monotonic-ns", "kind", "detail"}): kind "checkpoint"
        for the downtime checkpoints and the main channel's connect/accept, "trace" for the others."""


def get_backend(name: str) -> BackendOps:
    if name == "emulated":
        from labkit.host.runners.emulated import EmulatedOps

        return EmulatedOps()
    if name == "qemu":
        from labkit.host.runners.qemu import QemuOps

        return QemuOps()
    raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
