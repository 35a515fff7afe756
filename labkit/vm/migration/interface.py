"""What migration needs of the VM, as Protocols: the run state, the RAM list, the devices, stopping and starting
the guest, events and the QMP monitor.

Migration sits below the VM that owns it (vm.py builds a MigrationState and hands it itself): these
Protocols let it use the VM without importing vm.py, memory.py or devices.py, which all import migration.
"""

from __future__ import annotations

import asyncio
import mmap
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from labkit.vm.migration.vmstate import VMStateDescription
from labkit.vm.runstate import RunState, RunStateName


class MigratableRAMBlock(Protocol):
    """One RAM block as migration reads it (QEMU's RAMBlock): name, used length, backing, pages, dirty log."""

    idstr: str
    size: int
    kind: str  # memfd | anon | file
    shared: bool
    reused: bool  # the memory came over CPR: it holds the guest's data already
    mm: mmap.mmap | None
    dirty: np.ndarray

    @property
    def npages(self) -> int: ...

    @property
    def named_file(self) -> bool: ...

    def view(self) -> memoryview: ...

    def dirty_sync(self) -> np.ndarray: ...

    def dirty_clear(self) -> None: ...


class MigratableRAMList(Protocol):
    """QEMU's ram_list: the blocks in its order, and what CPR asks of them."""

    def __iter__(self) -> Iterator[MigratableRAMBlock]: ...

    def find(self, idstr: str) -> MigratableRAMBlock | None: ...

    def cpr_blockers(self) -> list[str]: ...

    def cpr_fds(self) -> list[tuple[str, int]]: ...


class MigratableDevice(Protocol):
    """A device with a vmstate section: QEMU's idstr, its layout, its fields' values out and back in.

    ``load()`` raises a LabkitError for values it refuses (QEMU's post_load failing)."""

    @property
    def name(self) -> str: ...

    @property
    def vmsd(self) -> VMStateDescription: ...

    def save(self) -> dict[str, Any]: ...

    def load(self, values: dict[str, Any]) -> None: ...


class GlobalStateDevice(Protocol):
    """QEMU's globalstate: the run state the source had when it stopped, which the destination resumes into."""

    runstate: RunStateName


class GuestMemory(Protocol):
    """The guest's system RAM block, whose dirty log the destination clears before it resumes."""

    @property
    def block(self) -> MigratableRAMBlock: ...


class MigrationOptions(Protocol):
    """The command-line facts migration reads: -x-hold points and the -incoming channels."""

    @property
    def holds(self) -> Collection[str]: ...

    @property
    def incoming(self) -> Mapping[str, str | None]: ...


class MigrationVM(Protocol):
    """The VM as its migration sees it (QEMU's migration code calls vm_start, vm_stop_force_state,
    runstate_set, qapi_event_send_* and error_report-then-exit the same way)."""

    @property
    def opts(self) -> MigrationOptions: ...

    @property
    def runstate(self) -> RunState: ...

    @property
    def ram(self) -> MigratableRAMList: ...

    @property
    def devices(self) -> Sequence[MigratableDevice]: ...

    @property
    def global_state(self) -> GlobalStateDevice: ...

    @property
    def guest(self) -> GuestMemory: ...

    @property
    def autostart(self) -> bool: ...

    @property
    def events(self) -> Sequence[Mapping[str, Any]]: ...

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None: ...

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None: ...

    def vm_start(self) -> None: ...

    def vm_stop(self, new_state: RunStateName) -> bool: ...

    def fatal(self, message: str) -> None: ...


class CprIncomingState(Protocol):
    """What the destination keeps of its CPR state until incoming starts (cpr-exec's state memfd)."""

    def close(self) -> None: ...
