"""Fixed-size device layouts compiled to one struct (labkit.vm.migration.vmstate): the same bytes and vmdesc
as writing field by field, the same refusals, and descriptions with a length field still written per field."""

from __future__ import annotations

import struct

import pytest

from labkit.vm.devices import VMSTATE_CPU, VMSTATE_GLOBALSTATE, VMSTATE_SERIAL, VMSTATE_TIMER
from labkit.vm.migration import vmstate
from labkit.vm.migration.vmstate import VMStateDescription, vmstate_load_state, vmstate_save_state

pytestmark = pytest.mark.timeout(30)

CPU = {
    "x-labkit-ticks": 2**63 + 5,
    "x-labkit-position": 7,
    "x-labkit-budget": 1.25,
    "x-labkit-rng-state": bytes(range(16)),
    "x-labkit-rng-inc": bytes(range(16, 32)),
    "x-labkit-rng-has-uint32": 1,
    "x-labkit-rng-uinteger": 0xDEADBEEF,
}
TIMER = {"cpu_ticks_offset": -3, "unused": bytes(8), "cpu_clock_offset": 123456789}
GLOBAL = {"size": 8, "runstate": b"running".ljust(32, b"\0"), "has_vm_was_suspended": 1, "vm_was_suspended": 0,
          "unused": bytes(66)}  # fmt: skip


def _per_field(vmsd: VMStateDescription, values: dict) -> bytes:
    """The layout written the long way: each field with its own format, one after another, big-endian."""
    fmt = {"int64": ">q", "uint64": ">Q", "uint32": ">I", "uint8": ">B", "float64": ">d"}
    return b"".join(
        struct.pack(fmt[fd.type], values[fd.name]) if fd.type in fmt else bytes(values[fd.name])
        for fd in vmsd.fields
    )


def _save(vmsd: VMStateDescription, values: dict) -> tuple[bytes, dict]:
    out: list[bytes] = []
    desc = vmstate_save_state(out.append, vmsd, values)
    return b"".join(out), desc


@pytest.mark.parametrize(("vmsd", "values"), [(VMSTATE_CPU, CPU), (VMSTATE_TIMER, TIMER), (VMSTATE_GLOBALSTATE, GLOBAL)])
def test_compiled_layout_writes_and_reads_field_by_field_bytes(vmsd, values):
    assert vmstate._fixed_layout(vmsd) is not None
    raw, desc = _save(vmsd, values)
    assert raw == _per_field(vmsd, values)
    assert desc["fields"] == [
        {"name": fd.name, "type": fd.type, "size": len(_per_field(VMStateDescription("x", 1, (fd,)), values))}
        for fd in vmsd.fields
    ]
    buf = raw + b"\x7e"  # the section footer follows the fields
    pos = 0

    def get(n: int) -> bytes:
        nonlocal pos
        pos += n
        if pos > len(buf):
            raise EOFError
        return buf[pos - n : pos]

    assert vmstate_load_state(get, lambda n: buf[pos : pos + n], vmsd, vmsd.version_id) == values


def test_a_buffer_of_the_wrong_length_is_refused_not_padded():
    with pytest.raises(ValueError, match="x-labkit-rng-state: 15 bytes, expected 16"):
        _save(VMSTATE_CPU, {**CPU, "x-labkit-rng-state": bytes(15)})
    with pytest.raises(struct.error):
        _save(VMSTATE_CPU, {**CPU, "x-labkit-rng-uinteger": 2**32})


def test_a_length_field_keeps_the_field_by_field_path():
    console = VMSTATE_SERIAL.subsections[0]
    assert vmstate._fixed_layout(console) is None
    raw, desc = _save(console, {"len": 5, "lines": b"hello"})
    assert raw == b"\x00\x00\x00\x05hello"
    assert [f["size"] for f in desc["fields"]] == [4, 5]
