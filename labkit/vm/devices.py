"""Emulated devices whose state crosses the main migration channel, as QEMU's vmstate sections do.

Each device has QEMU's section name (idstr) and version for q35 and a VMState layout (vmstate.py): ``save()``
gives its fields' values, ``load()`` takes them back. The timer, serial and globalstate layouts are QEMU
10.0.2's own, byte for byte; the "cpu" section keeps QEMU's name and version but carries the emulated vCPU
(tick count, workload position, random generator), because the emulator has no x86 registers
(docs/conformance.md lists the byte counts of both).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from labkit.errors import LabkitError
from labkit.vm.guest import Guest
from labkit.vm.migration.vmstate import VMStateDescription, VMStateField
from labkit.vm.runstate import RUNNING, RunStateName, parse_runstate

T = TypeVar("T")

PCG64_STATE_BYTES = 16  # numpy's PCG64: a 128-bit state and a 128-bit increment


# A device's field values by VMState field name, as save() gives them and load() takes them
DeviceState = dict[str, Any]


class DeviceError(LabkitError):
    """A device section's values cannot be loaded: the stream is corrupt or has another layout.

    ``section`` is the section's idstr ("timer", "cpu", ...): the incoming side names it in QEMU's error line.
    """

    def __init__(self, section: str, detail: str = ""):
        super().__init__(f"{section}: malformed device state" + (f" ({detail})" if detail else ""))
        self.section = section


class Device(Protocol):
    name: str  # QEMU's idstr
    vmsd: VMStateDescription

    def save(self) -> DeviceState: ...

    def load(self, values: DeviceState) -> None: ...


VMSTATE_TIMER = VMStateDescription(
    "timer",
    2,
    (
        VMStateField("cpu_ticks_offset", "int64", 8),
        VMStateField("unused", "unused_buffer", 8),
        VMStateField("cpu_clock_offset", "int64", 8),
    ),
)

VMSTATE_CPU = VMStateDescription(
    "cpu",
    12,
    (
        VMStateField("x-labkit-ticks", "uint64", 8),
        VMStateField("x-labkit-position", "uint64", 8),
        VMStateField("x-labkit-budget", "float64", 8),
        VMStateField("x-labkit-rng-state", "buffer", PCG64_STATE_BYTES),
        VMStateField("x-labkit-rng-inc", "buffer", PCG64_STATE_BYTES),
        VMStateField("x-labkit-rng-has-uint32", "uint32", 4),
        VMStateField("x-labkit-rng-uinteger", "uint32", 4),
    ),
)

#: The 16550A's registers, as QEMU's vmstate_serial sends them, and a labkit subsection with the console's
#: last lines (so x-labkit-console on the destination shows what the guest printed before it moved).
VMSTATE_SERIAL = VMStateDescription(
    "serial",
    3,
    (
        VMStateField("divider", "uint16", 2),
        *(VMStateField(r, "uint8", 1) for r in ("rbr", "ier", "iir", "lcr", "mcr", "lsr", "msr", "scr")),
        VMStateField("fcr_vmstate", "uint8", 1),
    ),
    subsections=(
        VMStateDescription(
            "serial/x-labkit-console",
            1,
            (VMStateField("len", "uint32", 4), VMStateField("lines", "buffer", size_field="len")),
            max_vbuffer=1 << 20,
        ),
    ),
)

VMSTATE_GLOBALSTATE = VMStateDescription(
    "globalstate",
    1,
    (
        VMStateField("size", "uint32", 4),
        VMStateField("runstate", "buffer", 32),
        VMStateField("has_vm_was_suspended", "uint8", 1),
        VMStateField("vm_was_suspended", "uint8", 1),
        VMStateField("unused", "buffer", 66),
    ),
)


def _field(name: str, values: DeviceState, key: str, conv: Callable[[Any], T]) -> T:
    """values[key] through conv, or the DeviceError naming the section and the field."""
    try:
        return conv(values[key])
    except (KeyError, TypeError, ValueError) as e:
        raise DeviceError(name, f"{key}: {e}") from None


@dataclass
class CPUDevice:
    """The emulated vCPU: tick count, workload position, random generator state (QEMU's "cpu" section)."""

    guest: Guest
    name: str = "cpu"
    vmsd: VMStateDescription = VMSTATE_CPU

    def save(self) -> DeviceState:
        c = self.guest.cpu
        st = self.guest.rng.bit_generator.state
        return {
            "x-labkit-ticks": c.ticks,
            "x-labkit-position": c.position,
            "x-labkit-budget": c.budget,
            "x-labkit-rng-state": int(st["state"]["state"]).to_bytes(PCG64_STATE_BYTES, "big"),
            "x-labkit-rng-inc": int(st["state"]["inc"]).to_bytes(PCG64_STATE_BYTES, "big"),
            "x-labkit-rng-has-uint32": int(st["has_uint32"]),
            "x-labkit-rng-uinteger": int(st["uinteger"]),
        }

    def load(self, values: DeviceState) -> None:
        c = self.guest.cpu
        c.ticks = _field("cpu", values, "x-labkit-ticks", int)
        c.position = _field("cpu", values, "x-labkit-position", int)
        c.budget = _field("cpu", values, "x-labkit-budget", float)
        st = dict(self.guest.rng.bit_generator.state)  # numpy types it as a read-only Mapping
        st["state"]["state"] = int.from_bytes(values["x-labkit-rng-state"], "big")
        st["state"]["inc"] = int.from_bytes(values["x-labkit-rng-inc"], "big")
        st["has_uint32"] = _field("cpu", values, "x-labkit-rng-has-uint32", int)
        st["uinteger"] = _field("cpu", values, "x-labkit-rng-uinteger", int)
        try:
            self.guest.rng.bit_generator.state = st
        except (TypeError, ValueError) as e:
            raise DeviceError("cpu", str(e)) from None


@dataclass
class TimerDevice:
    """The guest's virtual clock, which stands still while the VM is stopped (QEMU's "timer" section).

    QEMU saves the virtual clock in cpu_clock_offset while the VM is stopped; the emulator has no TSC, so
    cpu_ticks_offset is 0."""

    guest: Guest
    name: str = "timer"
    vmsd: VMStateDescription = VMSTATE_TIMER

    def save(self) -> DeviceState:
        return {"cpu_ticks_offset": 0, "unused": bytes(8), "cpu_clock_offset": self.guest.vm_clock_ns}

    def load(self, values: DeviceState) -> None:
        clock = _field("timer", values, "cpu_clock_offset", int)
        if clock < 0:
            raise DeviceError("timer", f"cpu_clock_offset {clock}")
        self.guest.vm_clock_ns = clock


class SerialDevice:
    """A 16550A console: the guest writes lines, QMP reads them, a log file keeps them (-serial file:).

    Its registers are those of an idle, initialised UART as QEMU 10.0.2 sent them for this guest."""

    name = "serial"
    vmsd = VMSTATE_SERIAL
    REGISTERS = {"divider": 0x0C, "rbr": 0, "ier": 0, "iir": 1, "lcr": 0, "mcr": 0x08, "lsr": 0x60}
    REGISTERS |= {"msr": 0xB0, "scr": 0, "fcr_vmstate": 0}

    def __init__(self, guest: Guest, path: str | None):
        self.guest = guest
        self.path = path
        self.registers = dict(self.REGISTERS)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if path else -1
        guest.console_sink = self._emit

    def _emit(self, line: str) -> None:
        if self._fd >= 0:
            os.write(self._fd, (line + "\n").encode())

    def save(self) -> DeviceState:
        lines = "\n".join(self.guest.console[-50:]).encode()
        return {**self.registers, "serial/x-labkit-console": {"len": len(lines), "lines": lines}}

    def load(self, values: DeviceState) -> None:
        for reg in self.REGISTERS:
            self.registers[reg] = _field("serial", values, reg, int)
        console = values.get("serial/x-labkit-console")
        if console is not None:
            try:
                text = console["lines"].decode()
            except UnicodeDecodeError:
                raise DeviceError("serial", "lines") from None
            self.guest.console[:] = text.split("\n") if text else []

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass
class GlobalState:
    """The run state the source had when it stopped, so the destination knows whether to resume (globalstate).

    QEMU's layout: the run state's name, NUL-terminated in a 32-byte buffer, its length with the NUL. A name
    that is no RunState is refused at load, as global_state_post_load() does."""

    runstate: RunStateName = RUNNING
    name: str = "globalstate"
    vmsd: VMStateDescription = VMSTATE_GLOBALSTATE

    def save(self) -> DeviceState:
        raw = self.runstate.encode()[:31]
        return {
            "size": len(raw) + 1,
            "runstate": raw.ljust(32, b"\0"),
            "has_vm_was_suspended": 1,
            "vm_was_suspended": 0,
            "unused": bytes(66),
        }

    def load(self, values: DeviceState) -> None:
        size = _field("globalstate", values, "size", int)
        raw = values["runstate"]
        if not 1 <= size <= len(raw) or raw[size - 1] != 0:
            raise DeviceError("globalstate")
        try:
            text = raw[: size - 1].decode()
        except UnicodeDecodeError:
            raise DeviceError("globalstate") from None
        state = parse_runstate(text)
        if state is None:
            raise DeviceError("globalstate", f"runstate '{text}'")
        self.runstate = state
