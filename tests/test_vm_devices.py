"""The emulated devices' vmstate sections: QEMU's layouts and sizes, a save/load round trip, refusals.

timer and globalstate must be QEMU 10.0.2's layouts byte for byte (a real QEMU destination reads them), so
their payload sizes are pinned here: 24 and 104 bytes, 48 and 134 with the section header and footer, as
docs/conformance.md measured against QEMU. Every load of a malformed value must fail with a DeviceError that
names the section, never a traceback from deep inside the device.
"""

from __future__ import annotations

import struct

import pytest

from labkit.errors import LabkitError
from labkit.vm.devices import (
    VMSTATE_GLOBALSTATE,
    VMSTATE_TIMER,
    CPUDevice,
    DeviceError,
    GlobalState,
    SerialDevice,
    TimerDevice,
)
from labkit.vm.guest import Guest
from labkit.vm.memory import ram_blocks_create
from labkit.vm.migration.vmstate import VMStateDescription, vmstate_load_state, vmstate_save_state
from labkit.vm.options import parse_args

pytestmark = pytest.mark.timeout(30)

SECTION_FOOTER = 0x7E  # QEMU_VM_SECTION_FOOTER: what follows a section's fields in the stream


@pytest.fixture
def ram():
    ram = ram_blocks_create(parse_args(["-m", "4M", "-nodefaults", "-x-guest", "seed=7"]))
    yield ram
    ram.close()


def _guest(ram, seed: int = 7) -> Guest:
    opts = parse_args(["-m", "4M", "-x-guest", f"seed={seed}"])
    return Guest(ram.system, opts.guest)


def _save(vmsd: VMStateDescription, values: dict) -> bytes:
    out: list[bytes] = []
    vmstate_save_state(out.append, vmsd, values)
    return b"".join(out)


def _load(vmsd: VMStateDescription, raw: bytes) -> dict:
    buf = raw + bytes([SECTION_FOOTER])
    pos = 0

    def get(n: int) -> bytes:
        nonlocal pos
        pos += n
        return buf[pos - n : pos]

    values = vmstate_load_state(get, lambda n: buf[pos : pos + n], vmsd, vmsd.version_id)
    assert buf[pos:] == bytes([SECTION_FOOTER])  # every byte of the payload was read, no more
    return values


def _full_section_size(idstr: str, payload: int) -> int:
    """QEMU_VM_SECTION_FULL: type, section id, idstr length and idstr, instance id, version; then footer."""
    return 1 + 4 + 1 + len(idstr) + 4 + 4 + payload + 1 + 4


def test_timer_is_qemus_layout_and_carries_the_virtual_clock(ram):
    src = TimerDevice(_guest(ram))
    src.guest.vm_clock_ns = 123_456_789_012
    raw = _save(src.vmsd, src.save())
    assert (src.name, src.vmsd.version_id, len(raw)) == ("timer", 2, 24)
    assert _full_section_size("timer", len(raw)) == 48
    # cpu_ticks_offset (no TSC: 0), 8 unused bytes, cpu_clock_offset, big-endian as QEMU's put_int64
    assert raw == struct.pack(">q", 0) + bytes(8) + struct.pack(">q", 123_456_789_012)
    dst = TimerDevice(_guest(ram))
    dst.load(_load(VMSTATE_TIMER, raw))
    assert dst.guest.vm_clock_ns == 123_456_789_012


def test_timer_refuses_a_clock_before_zero(ram):
    raw = struct.pack(">q", 0) + bytes(8) + struct.pack(">q", -5)
    with pytest.raises(DeviceError) as e:
        TimerDevice(_guest(ram)).load(_load(VMSTATE_TIMER, raw))
    assert e.value.section == "timer" and "cpu_clock_offset -5" in str(e.value)


@pytest.mark.parametrize("state", ["running", "paused", "postmigrate"])
def test_globalstate_is_qemus_layout_and_round_trips(state):
    raw = _save(VMSTATE_GLOBALSTATE, GlobalState(state).save())
    assert len(raw) == 104 and _full_section_size("globalstate", len(raw)) == 134
    (size,) = struct.unpack(">I", raw[:4])
    assert size == len(state) + 1  # the name's length with its NUL
    assert raw[4:36] == state.encode().ljust(32, b"\0")
    assert raw[36:38] == b"\x01\x00"  # has_vm_was_suspended, vm_was_suspended
    dst = GlobalState("prelaunch")
    dst.load(_load(VMSTATE_GLOBALSTATE, raw))
    assert dst.runstate == state


@pytest.mark.parametrize(
    "runstate, size, detail",
    [
        (b"running".ljust(32, b"\0"), 0, ""),  # no NUL-terminated name at all
        (b"running".ljust(32, b"x"), 8, ""),  # the byte at size-1 is not the NUL
        (b"\xff\xfe\0".ljust(32, b"\0"), 3, ""),  # not UTF-8
        (b"sleeping".ljust(32, b"\0"), 9, "runstate 'sleeping'"),  # no such RunState
    ],
)
def test_globalstate_refuses_what_qemu_would_not_load(runstate, size, detail):
    values = {"size": size, "runstate": runstate, "has_vm_was_suspended": 1, "vm_was_suspended": 0}
    dst = GlobalState()
    with pytest.raises(DeviceError) as e:
        dst.load({**values, "unused": bytes(66)})
    assert isinstance(e.value, LabkitError) and e.value.section == "globalstate"
    assert str(e.value).startswith("globalstate: malformed device state") and detail in str(e.value)
    assert dst.runstate == "running"  # unchanged


def test_cpu_carries_the_vcpu_so_the_destination_draws_the_same_numbers(ram):
    src = CPUDevice(_guest(ram, seed=7))
    src.guest.cpu.ticks, src.guest.cpu.position, src.guest.cpu.budget = 41, 1234, 0.5
    src.guest.rng.integers(0, 1 << 30, 5)  # move the generator off its seed
    raw = _save(src.vmsd, src.save())
    assert (src.name, src.vmsd.version_id, len(raw)) == ("cpu", 12, 64)
    dst = CPUDevice(_guest(ram, seed=99))  # a different seed: only the section can make them agree
    dst.load(_load(src.vmsd, raw))
    assert (dst.guest.cpu.ticks, dst.guest.cpu.position, dst.guest.cpu.budget) == (41, 1234, 0.5)
    assert list(dst.guest.rng.integers(0, 1 << 30, 8)) == list(src.guest.rng.integers(0, 1 << 30, 8))


def test_cpu_refuses_a_malformed_field(ram):
    src = CPUDevice(_guest(ram))
    values = src.save()
    del values["x-labkit-ticks"]
    with pytest.raises(DeviceError) as e:
        CPUDevice(_guest(ram)).load(values)
    assert e.value.section == "cpu" and "x-labkit-ticks" in str(e.value)


def test_serial_registers_are_qemus_11_bytes_and_the_console_follows(ram):
    src = SerialDevice(_guest(ram), None)
    src.guest.console[:] = ["boot", "hello from the guest"]
    values = src.save()
    regs = {k: v for k, v in values.items() if k != "serial/x-labkit-console"}
    no_console = VMStateDescription(src.vmsd.name, src.vmsd.version_id, src.vmsd.fields)
    assert len(_save(no_console, regs)) == 11  # QEMU's vmstate_serial, without labkit's subsection
    raw = _save(src.vmsd, values)
    dst = SerialDevice(_guest(ram), None)
    dst.load(_load(src.vmsd, raw))
    assert dst.registers == SerialDevice.REGISTERS and dst.guest.console == ["boot", "hello from the guest"]
    bad = dict(values, **{"serial/x-labkit-console": {"len": 2, "lines": b"\xff\xfe"}})
    with pytest.raises(DeviceError) as e:
        dst.load(bad)
    assert e.value.section == "serial"
