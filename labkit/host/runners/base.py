"""Runner: the one interface between a program that runs a VM and everything above the host layer.

The emulator (labkit-vm) and real QEMU answer the same QMP, but differ in what they can do beyond it: the
emulator can hold a migration at any step (x-labkit-hold) and keeps its own event history on the host's clock;
real QEMU has neither, and is read from outside (/proc, its trace log, the guest's heartbeat page). Callers ask
a runner's capability flags and call its methods, so nothing above this layer tests a backend's name or sends
an x-labkit-* command itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from labkit.errors import LabkitError

if TYPE_CHECKING:
    from labkit.host.hardware import VMConfig
    from labkit.host.machine import Machine


@dataclass(frozen=True)
class CounterLocation:
    """Where a VM's bytes-written counter lives: a memfd of the process, by name and size, and an offset."""

    memfd_name: str
    offset: int  # byte offset of the little-endian uint64 within the memfd
    size: int | None = None  # the memfd's size, when several share the name


class RunnerError(LabkitError, ValueError):
    """A runner was asked for something its program cannot do (e.g. a hold point on real QEMU)."""


class Runner:
    """What runs a VM, and how to read what QEMU's QMP has no command for. Subclasses set the flags."""

    name: str = ""
    can_hold: bool = False  # holds a migration at any of its steps (x-labkit-hold) until continued
    keeps_event_history: bool = False  # the VM keeps every QMP event on the host's clock, monitor or not
    has_migration_details: bool = False  # bytes per channel and per pass beyond query-migrate
    faults_in_before_accept: bool = False  # an incoming VM touches all its RAM before it accepts the stream
    description: str = ""  # how a sentence names it: "the emulated backend", "real QEMU 10"
    slower_because: str = ""  # why a step may take longer here than on real QEMU, for an explanation

    def argv(self, config: VMConfig, qmp_path: str) -> list[str]:
        """The full command line of a VM."""
        raise NotImplementedError

    def refusal(self, mode: str) -> str | None:
        """Why this runner cannot run a migration mode (one line for the user), or None when it can."""
        return None

    def progress_counter(self, config: VMConfig) -> CounterLocation:
        """Where the guest keeps its bytes-written counter, for the host to read through the memfd."""
        raise NotImplementedError

    def version(self) -> str | None:
        """The version of the program that runs the VMs, where it is not labkit itself."""
        return None

    def ready(self, m: Machine) -> None:
        """Return once the guest runs (real QEMU boots firmware and a kernel first; the emulator at once)."""

    # -- holding a migration (can_hold) ---------------------------------------------------------------------
    def hold(self, m: Machine, *points: str) -> None:
        """Arm hold points: the VM will wait at each until continue_()."""
        raise RunnerError(f"the {self.name} runner cannot hold a migration")

    def held_at(self, m: Machine) -> str | None:
        """The hold point the VM waits at now, or None."""
        return None

    def continue_(self, m: Machine, point: str) -> None:
        """Let a VM held at `point` go on."""
        raise RunnerError(f"the {self.name} runner cannot hold a migration")

    # -- observing -----------------------------------------------------------------------------------------
    def wait_event(self, m: Machine, name: str, timeout: float, after: int = 0) -> dict[str, Any]:
        """The first event `name` among the VM's events from index `after`, waiting up to `timeout` s."""
        result: dict[str, Any] = m.qmp.wait_event(name, timeout=timeout, after=after)
        return result

    def events(self, m: Machine) -> list[dict[str, Any]]:
        """Every QMP event the VM emitted, each with "monotonic-ns" on the host's CLOCK_MONOTONIC."""
        raise NotImplementedError

    def checkpoints(self, m: Machine) -> list[dict[str, Any]]:
        """QEMU's trace points the VM passed ({"name", "monotonic-ns", "kind", "detail"}): kind "checkpoint"
        for the downtime checkpoints and the main channel's connect/accept, "trace" for the others."""
        raise NotImplementedError

    def trace(self, m: Machine) -> list[dict[str, Any]]:
        """The VM's trace, as checkpoints() reads it (QEMU's trace log, or the emulator's own record)."""
        return self.checkpoints(m)

    def checkpoint_seen(self, m: Machine, name: str) -> bool:
        return any(c["name"] == name for c in self.checkpoints(m))

    def migration_details(self, m: Machine) -> dict[str, Any]:
        """What the VM knows beyond query-migrate (x-labkit-query-migrate); {} where it knows nothing more."""
        return {}

    def ram_blocks(self, m: Machine) -> list[dict[str, Any]]:
        """[{"name", "size", "host-addr"}] for each RAM block mapped by the process."""
        raise NotImplementedError

    # -- the guest's view ----------------------------------------------------------------------------------
    def guest_stats(self, m: Machine) -> dict[str, Any]:
        """At least heartbeat-seq, max-gap-ns (None when unknown, with "max-gap-why"), bytes-written."""
        raise NotImplementedError

    def reset_gap(self, m: Machine) -> None:
        raise NotImplementedError

    def verify(self, m: Machine) -> dict[str, Any]:
        """{"ok": bool, ...}: guest memory is exactly what the guest wrote."""
        raise NotImplementedError
