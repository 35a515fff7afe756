"""Device state as QEMU's VMState writes it (migration/vmstate.c), and the q35 section list (savevm.c).

A device section's payload has no length: it is the device's fields, big-endian, one after another, then any
subsections (``0x05``, counted name, ``be32`` version, fields). Only a reader that knows the device's layout
can find where it ends, which is why QEMU appends a JSON *vmdesc* to the stream describing every field's size:
``labkit stream-inspect`` (like QEMU's scripts/analyze-migration.py) walks a stream with it, and the
emulator's loader walks its own devices' layouts instead.

``Q35_SAVEVM_HANDLERS`` is what QEMU 10.0.2 registers for ``-machine q35 -nodefaults`` under KVM, in
registration order: the section id of each is its index (``se->section_id = global_section_id++``), read
from a real stream and from QEMU's ``savevm_section_*`` trace points.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from labkit.errors import LabkitError

QEMU_VM_SUBSECTION = 0x05

#: (idstr, instance_id, version_id) in QEMU 10.0.2's registration order for q35 -nodefaults under KVM; the
#: serial port (isa-serial, "serial") registers after "pcspk" when -serial is given. Versions are None for
#: sections this machine never sends (so never observed).
Q35_SAVEVM_HANDLERS: tuple[tuple[str, int, int | None], ...] = (
    ("timer", 0, 2),
    ("ram", 0, 4),
    ("dirty-bitmap", 0, None),
    ("cpu_common", 0, 1),
    ("cpu", 0, 12),
    ("kvm-tpr-opt", 0, 1),
    ("apic", 0, 3),
    ("kvmclock", 0, 1),
    ("fw_cfg", 0, 2),
    ("0000:00:00.0/mch", 0, 1),
    ("PCIHost", 0, 1),
    ("PCIBUS", 0, 1),
    ("dma", 0, 1),
    ("dma", 1, 1),
    ("mc146818rtc", 0, 3),
    ("0000:00:1f.0/ICH9LPC", 0, 1),
    ("i8259", 0, 1),
    ("i8259", 1, 1),
    ("ioapic", 0, 3),
    ("hpet", 0, 2),
    ("i8254", 0, 3),
    ("pcspk", 0, 1),
    ("serial", 0, 3),  # only with -serial
    ("ps2kbd", 0, 3),
    ("ps2mouse", 0, 2),
    ("pckbd", 0, 3),
    ("vmmouse", 0, 0),
    ("port92", 0, 1),
    ("0000:00:1f.2/ich9_ahci", 0, 1),
    ("i2c_bus", 0, 1),
    ("0000:00:1f.3/ich9_smb", 0, 1),
    *(("smbus-eeprom", i, None) for i in range(8)),
    ("acpi_build", 0, 1),
    ("globalstate", 0, 1),
)


def q35_savevm_handlers(serial: bool) -> list[tuple[str, int, int | None]]:
    """QEMU's handler list for this machine, with or without the serial port."""
    return [h for h in Q35_SAVEVM_HANDLERS if serial or h[0] != "serial"]


class VMStateError(LabkitError):
    """A device section does not match the layout this side knows; ``vmsd_name`` names the description
    (the device or subsection) whose fields it broke."""

    def __init__(self, message: str, vmsd_name: str):
        super().__init__(message)
        self.vmsd_name = vmsd_name


@dataclass(frozen=True)
class VMStateField:
    """One field: QEMU's VMStateInfo name as ``type``, and its size in bytes.

    ``size_field`` names an earlier uint32 field holding this field's length (VMSTATE_VBUFFER_UINT32)."""

    name: str
    type: str
    size: int = 0
    size_field: str | None = None


@dataclass(frozen=True)
class VMStateDescription:
    name: str
    version_id: int
    fields: tuple[VMStateField, ...]
    subsections: tuple[VMStateDescription, ...] = ()
    max_vbuffer: int = 1 << 20  # a hostile stream cannot make the loader allocate more for one field


_INT = {"int8": ">b", "int16": ">h", "int32": ">i", "int64": ">q", "uint8": ">B", "uint16": ">H"}
_INT |= {"uint32": ">I", "uint64": ">Q", "bool": ">?", "float64": ">d"}
_INT_STRUCT = {name: struct.Struct(fmt) for name, fmt in _INT.items()}  # compiled once, not per field


def _field_bytes(fd: VMStateField, value: Any) -> bytes:
    st = _INT_STRUCT.get(fd.type)
    if st is not None:
        return st.pack(value)
    raw = bytes(value)
    if fd.size_field is None and len(raw) != fd.size:
        raise ValueError(f"{fd.name}: {len(raw)} bytes, expected {fd.size}")
    return raw


@dataclass(frozen=True)
class _FixedLayout:
    """A description whose fields all have fixed sizes, compiled once: one struct for all its fields, and
    their vmdesc entries (which cannot change). Saving or loading it is one pack or unpack, not one per field:
    device state is saved and loaded inside the guest's pause."""

    st: struct.Struct
    names: tuple[str, ...]
    buffers: tuple[tuple[int, VMStateField], ...]  # the byte-string fields, whose length pack does not check
    desc_fields: tuple[dict[str, Any], ...]


_LAYOUTS: dict[int, tuple[VMStateDescription, _FixedLayout | None]] = {}


def _fixed_layout(vmsd: VMStateDescription) -> _FixedLayout | None:
    """The compiled layout of ``vmsd``'s fields, or None where a field's length is in another field."""
    hit = _LAYOUTS.get(id(vmsd))
    if hit is not None and hit[0] is vmsd:
        return hit[1]
    layout: _FixedLayout | None = None
    if all(fd.size_field is None and (fd.type in _INT or fd.size <= vmsd.max_vbuffer) for fd in vmsd.fields):
        fmt = "".join(_INT[fd.type][1:] if fd.type in _INT else f"{fd.size}s" for fd in vmsd.fields)
        st = struct.Struct(">" + fmt)
        layout = _FixedLayout(
            st,
            tuple(fd.name for fd in vmsd.fields),
            tuple((i, fd) for i, fd in enumerate(vmsd.fields) if fd.type not in _INT),
            tuple(
                {"name": fd.name, "type": fd.type, "size": _INT_STRUCT[fd.type].size if fd.type in _INT else fd.size}
                for fd in vmsd.fields
            ),
        )
    _LAYOUTS[id(vmsd)] = (vmsd, layout)  # the description is kept alive with its entry: its id is not reused
    return layout


def vmstate_save_state(put: Callable[[bytes], None], vmsd: VMStateDescription, values: dict[str, Any]) -> dict[str, Any]:
    """Write ``values`` in ``vmsd``'s layout; subsections go out when ``values`` has them (their ``needed``).

    Returns the section's vmdesc entry, with each field's size as written (as QEMU's vmsd_desc_field_end)."""
    desc: dict[str, Any] = {"vmsd_name": vmsd.name, "version": vmsd.version_id, "fields": []}
    layout = _fixed_layout(vmsd)
    if layout is not None:
        row = [values[name] for name in layout.names]
        for i, fd in layout.buffers:
            row[i] = _field_bytes(fd, row[i])  # the length check: pack would pad or cut a wrong one silently
        put(layout.st.pack(*row))
        desc["fields"] = list(layout.desc_fields)  # shared, never changed: the vmdesc is only encoded
    else:
        for fd in vmsd.fields:
            raw = _field_bytes(fd, values[fd.name])
            put(raw)
            desc["fields"].append({"name": fd.name, "type": fd.type, "size": len(raw)})
    subs = []
    for sub in vmsd.subsections:
        if sub.name in values:
            name = sub.name.encode()
            put(bytes([QEMU_VM_SUBSECTION, len(name)]) + name + struct.pack(">I", sub.version_id))
            subs.append(vmstate_save_state(put, sub, values[sub.name]))
    if subs:
        desc["subsections"] = subs
    return desc


def vmstate_load_state(
    get: Callable[[int], bytes], peek: Callable[[int], bytes], vmsd: VMStateDescription, version_id: int
) -> dict[str, Any]:
    """Read a section in ``vmsd``'s layout (vmstate_load_state(), then vmstate_subsection_load())."""
    if version_id > vmsd.version_id:
        raise VMStateError(
            f"{vmsd.name}: incoming version_id {version_id} is too new (max {vmsd.version_id})", vmsd.name
        )
    out: dict[str, Any] = {}
    layout = _fixed_layout(vmsd)
    if layout is not None:
        out.update(zip(layout.names, layout.st.unpack(get(layout.st.size)), strict=True))
    for fd in vmsd.fields if layout is None else ():
        st = _INT_STRUCT.get(fd.type)
        if st is not None:
            (out[fd.name],) = st.unpack(get(st.size))
            continue
        size = fd.size if fd.size_field is None else out[fd.size_field]
        if size > vmsd.max_vbuffer:
            raise VMStateError(
                f"{vmsd.name}: field {fd.name} length {size} exceeds {vmsd.max_vbuffer}", vmsd.name
            )
        out[fd.name] = get(size)
    while peek(1)[0] == QEMU_VM_SUBSECTION:
        head = peek(2)
        name = peek(2 + head[1])[2:].decode(errors="replace")
        if not name.startswith(vmsd.name):
            break  # a subsection of an enclosing description
        sub = next((s for s in vmsd.subsections if s.name == name), None)
        if sub is None:
            raise VMStateError(f"{vmsd.name}: subsection {name} not found", vmsd.name)  # vmstate_subsection_load()
        get(2 + head[1])
        (sub_version,) = struct.unpack(">I", get(4))
        out[name] = vmstate_load_state(get, peek, sub, sub_version)
    return out


def vmdesc_section_size(desc: dict[str, Any]) -> int:
    """Bytes of one section's payload as its vmdesc entry describes it (fields, then subsections).

    A field with ``array_len`` is a compressed array: its entry describes one element (QEMU describes only the
    first element of an array whose elements all look the same)."""
    size = 0
    for fd in desc.get("fields", []):
        size += int(fd.get("size", 0)) * int(fd.get("array_len", 1))
    for sub in desc.get("subsections", []):
        size += 6 + len(str(sub.get("vmsd_name", "")).encode()) + vmdesc_section_size(sub)
    return size


@dataclass
class VMDesc:
    """QEMU's vmdesc JSON: the configuration, the page size and every device section's fields."""

    configuration: dict[str, Any] | None = None
    page_size: int = 4096
    devices: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.configuration is not None:
            out["configuration"] = self.configuration
        out["page_size"] = self.page_size
        out["devices"] = self.devices
        return out


@dataclass
class SaveVMState:
    """What savevm.c keeps in its global ``savevm_state``: registered handlers, the open RAM section, vmdesc."""

    section_ids: dict[tuple[str, int], int] = field(default_factory=dict)
    ram_blocks: dict[str, int] = field(default_factory=dict)  # name -> used length
    ram_section: int | None = None  # QEMU_VM_SECTION_PART / _END while one is open
    last_sent_block: str | None = None
    ram_started: bool = False
    vmdesc: VMDesc = field(default_factory=VMDesc)

    def register(self, idstr: str, instance_id: int) -> int:
        """register_savevm_live()/vmstate_register(): the next section id, at registration, as QEMU's."""
        return self.section_ids.setdefault((idstr, instance_id), len(self.section_ids))

    def section_id(self, idstr: str, instance_id: int) -> int:
        """The id the handler got when registered (one not in the machine's list registers now, last)."""
        return self.register(idstr, instance_id)
