"""The source's completion run once on a scratch stream just before it stops the guest, so that the pause
runs it warm.

labkit's own (QEMU's C needs no such thing). A cpr-transfer pause is a few hundred lines of Python run once:
the source writes the header, the RAM sections and the device sections. Run cold (the migration thread has
just connected: the code and its objects are out of the CPU's caches, not yet specialised by the
interpreter), each step costs about twice what it costs warm: measured here, the source's ~0.5 ms of CPU
from STOP to the send went to ~0.35 ms, and the pause's median dropped by ~0.3 ms in a turn-about A/B (1 GiB).
So the source writes the stream its completion will write, with the devices' current values, into memory
and sends it nowhere, just before migration_stop_vm(). The vmdesc that stream ends with is kept
(savevm.VMDESC_CACHE): the real completion sends the same bytes without encoding them again, as long as
the devices' layout has not changed.

The destination is not warmed the same way: loading a scratch stream ahead of the real one measured no gain
(its thread runs on whichever core is free by the time the stream arrives, caches cold again).

A failure here is no failure of the migration: it is left for the real save to meet and report.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Sequence

from labkit.errors import LabkitError
from labkit.vm.migration.interface import MigratableDevice
from labkit.vm.migration.qemu_file import QEMUFileOut
from labkit.vm.migration.ram import ram_save_complete_end, ram_save_complete_start, ram_save_setup
from labkit.vm.migration.savevm import (
    qemu_savevm_send_switchover_start,
    qemu_savevm_state_complete_non_iterable,
    qemu_savevm_state_end,
    qemu_savevm_state_header,
)
from labkit.vm.migration.vmstate import q35_savevm_handlers

#: What a scratch save may raise (a device that cannot save); anything else is a bug and propagates.
_WARM_ERRORS = (LabkitError, OSError, ValueError, KeyError, TypeError)


def savevm_completion_stream(ram_blocks: Sequence[tuple[str, int]], devices: Iterable[MigratableDevice]) -> bytes:
    """The main stream a migration that sends no RAM page writes: header, CONFIGURATION, the RAM START
    section listing every block, SWITCHOVER_START, an empty RAM END, the device sections, EOF and the
    vmdesc (what a cpr-transfer source sends, with the devices' values of now)."""
    devices = list(devices)
    sink = io.BytesIO()
    f = QEMUFileOut(sink, handlers=q35_savevm_handlers(serial=any(d.name == "serial" for d in devices)))
    qemu_savevm_state_header(f)
    ram_save_setup(f, list(ram_blocks))
    qemu_savevm_send_switchover_start(f)
    ram_save_complete_start(f)
    ram_save_complete_end(f)
    qemu_savevm_state_complete_non_iterable(f, devices)
    qemu_savevm_state_end(f)
    return sink.getvalue()


def warm_savevm_completion(ram_blocks: Sequence[tuple[str, int]], devices: Iterable[MigratableDevice]) -> None:
    """Just before the source stops the guest: write the completion once, into memory."""
    with contextlib.suppress(*_WARM_ERRORS):
        savevm_completion_stream(ram_blocks, devices)
