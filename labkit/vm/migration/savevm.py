"""The migration stream's sections (QEMU's migration/savevm.c): header, CONFIGURATION, section framing,
device sections, the switchover command, EOF and the vmdesc, for the writer and the reader.

Apart from the load loop (stream.py) because RAM's records (ram.py) sit between the two: they are framed by
this module's section headers, and the loop hands RAM sections to them, as QEMU's savevm.c reaches ram.c
through the handlers ram.c registers.
"""

from __future__ import annotations

import builtins
import json
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from errno import ERANGE
from typing import Any

from labkit.vm.migration.interface import MigratableDevice
from labkit.vm.migration.qemu_file import QEMUFileIn, QEMUFileOut, StreamError
from labkit.vm.migration.vmstate import VMStateDescription, vmstate_save_state

# savevm.c
QEMU_VM_FILE_MAGIC = 0x5145564D
QEMU_VM_FILE_VERSION = 0x00000003
QEMU_VM_FILE_VERSION_COMPAT = 0x00000002  # the pre-1.0 layout QEMU refuses with its own text
QEMU_VM_EOF = 0x00
QEMU_VM_SECTION_START = 0x01
QEMU_VM_SECTION_PART = 0x02
QEMU_VM_SECTION_END = 0x03
QEMU_VM_SECTION_FULL = 0x04
QEMU_VM_SUBSECTION = 0x05
QEMU_VM_VMDESCRIPTION = 0x06
QEMU_VM_CONFIGURATION = 0x07
QEMU_VM_COMMAND = 0x08
QEMU_VM_SECTION_FOOTER = 0x7E
MIG_CMD_SWITCHOVER_START = 0x0B  # migration/savevm.c enum qemu_vm_cmd (MIG_CMD_MAX is 0x0c)
MIG_CMD_MAX = 0x0C
#: The machine type QEMU 10.0 names in its CONFIGURATION section for -machine q35.
Q35_MACHINE_NAME = "pc-q35-10.0"
SECTION_KINDS = {1: "START", 2: "PART", 3: "END", 4: "FULL"}
#: Largest vmdesc JSON the loader reads after EOF (QEMU's for q35 is about 44 KB).
MAX_VMDESC = 16 << 20


def qemu_savevm_state_header(f: QEMUFileOut, machine: str = Q35_MACHINE_NAME) -> None:
    """savevm.c: magic and version open every stream, then the CONFIGURATION section names the machine type."""
    f.put_be32(QEMU_VM_FILE_MAGIC)
    f.put_be32(QEMU_VM_FILE_VERSION)
    name = machine.encode()
    f.put_byte(QEMU_VM_CONFIGURATION)
    f.put_be32(len(name))
    f.put_bytes(name)
    f.savevm.vmdesc.configuration = {
        "vmsd_name": "configuration",
        "version": 1,
        "fields": [
            {"name": "len", "type": "uint32", "size": 4},
            {"name": "name", "type": "buffer", "size": len(name)},
        ],
    }


def save_section_header(f: QEMUFileOut, section_type: int, idstr: str, instance_id: int, version_id: int) -> int:
    """savesave_section_header(): START/FULL carry idstr, instance and version; PART/END only the id."""
    sid = f.savevm.section_id(idstr, instance_id)
    f.put_byte(section_type)
    f.put_be32(sid)
    if section_type in (QEMU_VM_SECTION_START, QEMU_VM_SECTION_FULL):
        f.put_counted_string(idstr)
        f.put_be32(instance_id)
        f.put_be32(version_id)
    return sid


def save_section_footer(f: QEMUFileOut, sid: int) -> None:
    """savesave_section_footer(): lets the reader notice a device that read too much or too little."""
    f.put_byte(QEMU_VM_SECTION_FOOTER)
    f.put_be32(sid)



def qemu_savevm_send_switchover_start(f: QEMUFileOut) -> None:
    """QEMU_VM_COMMAND MIG_CMD_SWITCHOVER_START: QEMU 10 sends it as the switchover begins, before the END."""
    f.put_byte(QEMU_VM_COMMAND)
    f.put_bytes(struct.pack(">HH", MIG_CMD_SWITCHOVER_START, 0))


def qemu_save_device_state(
    f: QEMUFileOut, idstr: str, instance_id: int, vmsd: VMStateDescription, values: dict[str, Any]
) -> int:
    """One device's state as a QEMU_VM_SECTION_FULL (vmstate_save()): fields with no length, and its vmdesc
    entry kept for the end of the stream. Returns the payload's size."""
    if f.savevm.ram_section is not None:
        raise ValueError("close the RAM section before saving devices")
    sid = save_section_header(f, QEMU_VM_SECTION_FULL, idstr, instance_id, vmsd.version_id)
    before = f.bytes_sent
    desc = vmstate_save_state(f.put_bytes, vmsd, values)
    size = f.bytes_sent - before
    save_section_footer(f, sid)
    f.savevm.vmdesc.devices.append({"name": idstr, "instance_id": instance_id, **desc})
    return size


def qemu_savevm_state_complete_non_iterable(f: QEMUFileOut, devices: Iterable[MigratableDevice]) -> int:
    """qemu_savevm_state_complete_precopy_non_iterable(): every device's FULL section, in section id order
    (the order QEMU registered their handlers). Returns the payload bytes, the device part of downtime-bytes."""
    size = 0
    for dev in sorted(devices, key=lambda d: f.savevm.section_id(d.name, 0)):
        size += qemu_save_device_state(f, dev.name, 0, dev.vmsd, dev.save())
    return size


class _VMDescCache:
    """The last vmdesc encoded in this process, and its JSON. A device's vmdesc entry holds its layout (field
    names, types, sizes), not its values, so the stream a source writes just before its pause (warm.py) ends
    with the same vmdesc as the real one: the real one is then sent without json.dumps inside the pause."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._desc: dict[str, Any] | None = None
        self._raw = b""

    def encode(self, desc: dict[str, Any]) -> bytes:
        with self._lock:
            if desc == self._desc:
                return self._raw
        raw = json.dumps(desc).encode()
        with self._lock:  # kept as decoded from the JSON: a copy no caller can change under the cache
            self._desc, self._raw = json.loads(raw), raw
        return raw


VMDESC_CACHE = _VMDescCache()


def qemu_savevm_state_end(f: QEMUFileOut) -> None:
    """QEMU_VM_EOF ends the stream; the vmdesc JSON follows it (for tools, as QEMU's); everything is flushed."""
    if f.savevm.ram_section is not None:
        raise ValueError("a RAM section is still open")
    f.put_byte(QEMU_VM_EOF)
    desc = VMDESC_CACHE.encode(f.savevm.vmdesc.to_json())
    f.put_byte(QEMU_VM_VMDESCRIPTION)
    f.put_be32(len(desc))
    f.put_bytes(desc)
    f.flush()



# --------------------------------------------------------------------------------------------------------
# Load side (destination, and stream-inspect)


@dataclass
class SectionRecord:
    """One section as read: what `labkit stream-inspect` lists (QEMU's section header, offset and size)."""

    kind: str  # CONFIGURATION, START, PART, END, FULL, COMMAND, EOF, VMDESCRIPTION
    section_id: int | None
    idstr: str
    instance_id: int | None
    version_id: int | None
    offset: int
    size: int = 0
    normal_pages: int = 0
    zero_pages: int = 0


@dataclass
class LoadStats:
    """What qemu_loadvm_state() saw: pages by kind, stream bytes, every section in order, and the vmdesc."""

    normal_pages: int = 0
    zero_pages: int = 0
    bytes: int = 0
    sections: list[str] = field(default_factory=list)  # idstr of each START/PART/END/FULL, in order
    records: list[SectionRecord] = field(default_factory=list)
    machine: str | None = None
    capabilities: list[str] = field(default_factory=list)
    ram_blocks: list[tuple[str, int]] = field(default_factory=list)
    vmdesc: builtins.bytes | None = None
    warnings: list[str] = field(default_factory=list)



def check_section_footer(f: QEMUFileIn, idstr: str, sid: int) -> None:
    """checksave_section_footer()."""
    if f.get_byte() != QEMU_VM_SECTION_FOOTER:
        raise StreamError(f"Missing section footer for {idstr}")
    read_id = f.get_be32()
    if read_id != sid:
        raise StreamError(
            f"Mismatched section id in footer for {idstr} - read 0x{read_id:x} expected 0x{sid:x}"
        )


def load_configuration(f: QEMUFileIn, stats: LoadStats, machine: str | None) -> None:
    """vmstate_configuration: the machine type (checked as configuration_post_load() does), then its
    capabilities and uuid subsections."""
    n = f.get_be32()
    if n > 255:
        raise StreamError(f"Machine type name of {n} bytes")
    name = f.get_bytes(n).decode(errors="backslashreplace")
    if machine is not None and name != machine:
        raise StreamError(f"Machine type received is '{name}' and local is '{machine}'")
    stats.machine = name
    while f.peek(1)[0] == QEMU_VM_SUBSECTION:
        f.get_byte()
        sub = f.get_counted_string()
        f.get_be32()
        if sub == "configuration/capabilities":
            count = f.get_be32()
            if count > 64:
                raise StreamError(f"Too many capabilities ({count})")
            stats.capabilities += [f.get_counted_string() for _ in range(count)]
        elif sub == "configuration/uuid":
            f.get_bytes(16)
        else:
            raise StreamError(f"configuration: subsection {sub} not found")


def load_command(f: QEMUFileIn) -> int:
    """loadvm_process_command(): only the switchover notice is meaningful to a precopy destination."""
    cmd: int
    length: int
    cmd, length = struct.unpack(">HH", f.get_bytes(4))
    if cmd == 0 or cmd >= MIG_CMD_MAX:
        raise StreamError(f"MIG_CMD 0x{cmd:x} unknown (len 0x{length:x})")
    if cmd == MIG_CMD_SWITCHOVER_START and length != 0:
        raise StreamError(f"SWITCHOVER_START received with bad length - expecting 0, got {length}", ERANGE)
    f.skip(length)
    return cmd



def unknown_section(idstr: str, instance_id: int) -> StreamError:
    """qemu_loadvm_section_start_full()'s error for a section this side has no handler for."""
    return StreamError(
        f"Unknown savevm section or instance '{idstr}' {instance_id}. Make sure that your current VM setup "
        "matches your saved VM setup, including any hotplugged devices"
    )



def load_vmdescription(f: QEMUFileIn, stats: LoadStats, start: int) -> None:
    """After EOF QEMU reads the vmdesc too, "so that dumping tools that intercept our migration stream have
    the chance to see it"; a stream that ends at EOF is accepted, another byte only noted (as QEMU does)."""
    offset = f.bytes_received - start
    try:
        section_type = f.get_byte()
    except StreamError:
        return
    if section_type != QEMU_VM_VMDESCRIPTION:
        stats.warnings.append(f"Expected vmdescription section, but got {section_type}")
        return
    size = f.get_be32()
    if size > MAX_VMDESC:
        raise StreamError(f"vmdescription of {size} bytes exceeds the limit of {MAX_VMDESC}")
    stats.vmdesc = f.get_bytes(size)
    stats.records.append(SectionRecord("VMDESCRIPTION", None, "", None, None, offset, 5 + size))
