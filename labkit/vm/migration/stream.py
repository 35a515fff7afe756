"""The main migration stream as one whole: qemu_loadvm_state(), the one parser the destination and
`labkit stream-inspect` share, and the stream's names in one namespace for its readers and writers.

The stream is built from QEMU 10's own files: ``migration/qemu-file.c`` (the buffered QEMUFile, qemu_file.py),
``migration/savevm.c`` (sections, savevm.py), ``migration/ram.c`` (RAM pages, ram.py) and
``migration/vmstate.c`` (device fields, vmstate.py), with the same names and constants, so each can be read
beside QEMU's source. The load loop sits here, above savevm.py and ram.py, because it dispatches to both. The layout is
QEMU 10.0.2's own, byte for byte where the emulator models the state (checked against real QEMU's streams by
tests/test_stream_inspect.py). Everything is big-endian, like QEMU's ``qemu_put_be32``/``qemu_put_be64``.

Stream layout::

    header         | be32 0x5145564d "QEVM" | be32 3 |             QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION
    configuration  | 0x07 | be32 len | machine name ("pc-q35-10.0") |            QEMU_VM_CONFIGURATION
    RAM setup      | 0x01 | be32 sec | u8 3 "ram" | be32 instance 0 | be32 version 4 |   QEMU_VM_SECTION_START
                   | be64 total | RAM_SAVE_FLAG_MEM_SIZE | then per block: | u8 len | name | be64 used length |
                   | be64 RAM_SAVE_FLAG_EOS | 0x7e | be32 sec |        EOS, section footer
    RAM pages      | 0x02 | be32 sec |   QEMU_VM_SECTION_PART, one per pass (0x03 QEMU_VM_SECTION_END: the last)
                   then one record per 4 KiB page:
                   | be64 offset | flags | (u8 len | block name) | 4096 bytes |   RAM_SAVE_FLAG_PAGE 0x08
                   | be64 offset | flags | (u8 len | block name) | u8 fill    |   RAM_SAVE_FLAG_ZERO 0x02
                   the name is left out, and RAM_SAVE_FLAG_CONTINUE 0x20 set, when the block is the one the
                   previous record named (QEMU's last_sent_block, which carries over from one section to
                   the next);
                   | be64 RAM_SAVE_FLAG_EOS 0x10 | 0x7e | be32 sec |
    switchover     | 0x08 | be16 0x0b | be16 0 |   QEMU_VM_COMMAND MIG_CMD_SWITCHOVER_START, before the END section
    device         | 0x04 | be32 sec | u8 len | idstr | be32 instance | be32 version |   QEMU_VM_SECTION_FULL
                   | fields, no length (vmstate.py) | 0x7e | be32 sec |
    end            | 0x00 |                              QEMU_VM_EOF
    vmdesc         | 0x06 | be32 len | JSON |           QEMU_VM_VMDESCRIPTION: every device section's fields

Section ids are QEMU's: numbered when QEMU registers each handler (vmstate.Q35_SAVEVM_HANDLERS), not when a
section is first sent, so "timer" is 0 and "ram" 1 although RAM goes first. In cpr-transfer the RAM START
section lists every block although all of them are ignored (no page follows), as QEMU's does.

Where this differs from QEMU (docs/conformance.md): the emulator sends only the device sections it models
(timer, cpu, serial, globalstate), and its cpu section carries the emulated vCPU's state under QEMU's name;
x-ignore-shared's per-block address, postcopy, multifd and mapped-ram fields are not written.

Speed: the writer finds zero pages with numpy over a cache-sized chunk at a time; a chunk of real pages is
laid out, headers and pages, in one buffer and sent at once, any other chunk goes as headers and pages in one
``sendmsg`` (the pages straight from guest RAM). The reader takes a run of plain page records from its 1 MiB
read-ahead in one numpy step (ram_runs.py) and everything else record by record. ``scripts/bench_stream.py``
measures the stream alone, ``scripts/precopy_throughput.py`` a whole pre-copy beside the socket ceiling.
"""

from __future__ import annotations

from collections.abc import Callable
from errno import ENOTSUP

from labkit.vm.migration.qemu_file import (
    IO_BUF_SIZE,
    MAX_IOV_SIZE,
    SOCKET_BUFFER_SIZE,
    QEMUFileIn,
    QEMUFileOut,
    StreamError,
)
from labkit.vm.migration.ram import (
    MAX_RAM_BLOCKS,
    PAGE_SIZE,
    RAM_SAVE_CHUNK_PAGES,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_ZERO,
    RAM_SECTION_IDSTR,
    RAM_SECTION_VERSION,
    TARGET_PAGE_BITS,
    TARGET_PAGE_MASK,
    RamLoad,
    parse_ramblocks,
    ram_load_precopy,
    ram_save_complete_end,
    ram_save_complete_start,
    ram_save_iterate_end,
    ram_save_pages,
    ram_save_setup,
)
from labkit.vm.migration.savevm import (
    MAX_VMDESC,
    MIG_CMD_MAX,
    MIG_CMD_SWITCHOVER_START,
    Q35_MACHINE_NAME,
    QEMU_VM_COMMAND,
    QEMU_VM_CONFIGURATION,
    QEMU_VM_EOF,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    QEMU_VM_FILE_VERSION_COMPAT,
    QEMU_VM_SECTION_END,
    QEMU_VM_SECTION_FOOTER,
    QEMU_VM_SECTION_FULL,
    QEMU_VM_SECTION_PART,
    QEMU_VM_SECTION_START,
    QEMU_VM_SUBSECTION,
    QEMU_VM_VMDESCRIPTION,
    SECTION_KINDS,
    LoadStats,
    SectionRecord,
    check_section_footer,
    load_command,
    load_configuration,
    load_vmdescription,
    qemu_save_device_state,
    qemu_savevm_send_switchover_start,
    qemu_savevm_state_end,
    qemu_savevm_state_header,
    unknown_section,
)
from labkit.vm.migration.vmstate import VMStateError

__all__ = [
    "IO_BUF_SIZE",
    "MAX_IOV_SIZE",
    "MAX_RAM_BLOCKS",
    "MAX_VMDESC",
    "MIG_CMD_MAX",
    "MIG_CMD_SWITCHOVER_START",
    "PAGE_SIZE",
    "Q35_MACHINE_NAME",
    "QEMU_VM_COMMAND",
    "QEMU_VM_CONFIGURATION",
    "QEMU_VM_EOF",
    "QEMU_VM_FILE_MAGIC",
    "QEMU_VM_FILE_VERSION",
    "QEMU_VM_FILE_VERSION_COMPAT",
    "QEMU_VM_SECTION_END",
    "QEMU_VM_SECTION_FOOTER",
    "QEMU_VM_SECTION_FULL",
    "QEMU_VM_SECTION_PART",
    "QEMU_VM_SECTION_START",
    "QEMU_VM_SUBSECTION",
    "QEMU_VM_VMDESCRIPTION",
    "RAM_SAVE_CHUNK_PAGES",
    "RAM_SAVE_FLAG_CONTINUE",
    "RAM_SAVE_FLAG_EOS",
    "RAM_SAVE_FLAG_MEM_SIZE",
    "RAM_SAVE_FLAG_PAGE",
    "RAM_SAVE_FLAG_ZERO",
    "RAM_SECTION_IDSTR",
    "RAM_SECTION_VERSION",
    "SECTION_KINDS",
    "SOCKET_BUFFER_SIZE",
    "TARGET_PAGE_BITS",
    "TARGET_PAGE_MASK",
    "LoadStats",
    "QEMUFileIn",
    "QEMUFileOut",
    "SectionRecord",
    "StreamError",
    "qemu_loadvm_state",
    "qemu_save_device_state",
    "qemu_savevm_send_switchover_start",
    "qemu_savevm_state_end",
    "qemu_savevm_state_header",
    "ram_save_complete_end",
    "ram_save_complete_start",
    "ram_save_iterate_end",
    "ram_save_pages",
    "ram_save_setup",
    "unknown_section",
]


def _be32_or_zero(f: QEMUFileIn) -> int:
    """qemu_get_be32() for the header: past the end of the stream QEMU reads zeros (and notes the error
    for later), so an empty or short stream is "Not a migration stream", not an I/O error."""
    try:
        return f.get_be32()
    except StreamError:
        return 0


def qemu_loadvm_state(
    f: QEMUFileIn,
    ram: Callable[[str], memoryview | None],
    on_device: Callable[[str, int, int, QEMUFileIn], None],
    on_ram_blocks: Callable[[list[tuple[str, int]]], None] | None = None,
    zero_page_needs_write: Callable[[str], bool] | None = None,
    machine: str | None = None,
    require_configuration: bool = False,
) -> LoadStats:
    """Read a whole stream up to QEMU_VM_EOF and the vmdesc after it, validating before touching memory.

    ``ram(name)`` gives a block's writable memory, or None to count its pages without keeping them (asked
    once, after ``on_ram_blocks`` saw the list); ``on_device(idstr, instance_id, version_id, f)`` reads one
    device section's fields from ``f`` (vmstate_load()) and raises for a section it does not know;
    ``zero_page_needs_write(name)`` may say False for a block known to be all zeros (a fresh memfd);
    ``machine``, when given, must match the stream's CONFIGURATION; ``require_configuration`` refuses a
    stream without one, as a destination of a QEMU 10 machine type does (send_configuration).
    """
    start = f.bytes_received
    stats = LoadStats()
    magic, version = _be32_or_zero(f), _be32_or_zero(f)
    if magic != QEMU_VM_FILE_MAGIC:
        raise StreamError("Not a migration stream")
    if version == QEMU_VM_FILE_VERSION_COMPAT:
        raise StreamError("SaveVM v2 format is obsolete and don't work anymore", ENOTSUP)
    if version != QEMU_VM_FILE_VERSION:
        raise StreamError("Unsupported migration stream version", ENOTSUP)
    if (
        require_configuration
    ):  # a QEMU 10 machine sends its CONFIGURATION first; its destination insists on it
        try:
            first = f.peek(1)[0]
        except StreamError:
            first = 0  # qemu_get_byte() past the end
        if first != QEMU_VM_CONFIGURATION:
            raise StreamError("Configuration section missing")
    rl = RamLoad(ram, zero_page_needs_write)
    sections: dict[int, str] = {}
    while True:
        offset = f.bytes_received - start
        section_type = f.get_byte()
        if section_type == QEMU_VM_EOF:
            stats.records.append(SectionRecord("EOF", None, "", None, None, offset, 1))
            break
        if section_type == QEMU_VM_CONFIGURATION:
            if stats.records:
                raise StreamError("Configuration section not at the start of the stream")
            load_configuration(f, stats, machine)
            size = f.bytes_received - start - offset
            stats.records.append(
                SectionRecord("CONFIGURATION", None, stats.machine or "", None, None, offset, size)
            )
            continue
        if section_type == QEMU_VM_COMMAND:
            cmd = load_command(f)
            size = f.bytes_received - start - offset
            stats.records.append(SectionRecord("COMMAND", None, f"0x{cmd:x}", None, None, offset, size))
            continue
        if section_type not in SECTION_KINDS:
            raise StreamError(f"Unknown savevm section type {section_type}")
        sid = f.get_be32()
        rec = SectionRecord(SECTION_KINDS[section_type], sid, "", None, None, offset)
        if section_type in (QEMU_VM_SECTION_START, QEMU_VM_SECTION_FULL):
            idstr = f.get_counted_string()
            instance_id = f.get_be32()
            version_id = f.get_be32()
            rec.idstr, rec.instance_id, rec.version_id = idstr, instance_id, version_id
            if section_type == QEMU_VM_SECTION_START:
                if idstr != RAM_SECTION_IDSTR or instance_id != 0:
                    raise unknown_section(idstr, instance_id)
                if version_id > RAM_SECTION_VERSION:
                    raise StreamError(
                        f"qemu_loadvm_section_start_full: unsupported version {version_id} for '{idstr}' "
                        f"v{RAM_SECTION_VERSION}"
                    )
                if RAM_SECTION_IDSTR in sections.values():
                    raise StreamError("RAM setup section sent twice")
                sections[sid] = idstr
                parse_ramblocks(f, rl, stats, on_ram_blocks)
            else:
                try:
                    on_device(idstr, instance_id, version_id, f)
                except VMStateError as e:
                    raise StreamError(
                        f"error while loading state for instance 0x{instance_id:x} of device '{idstr}': {e}"
                    ) from None
        else:
            idstr = sections.get(sid, "")
            rec.idstr = idstr
            if idstr != RAM_SECTION_IDSTR:
                raise StreamError(f"Unknown savevm section {sid}")
            ram_load_precopy(f, rl, rec)
            stats.normal_pages += rec.normal_pages
            stats.zero_pages += rec.zero_pages
        check_section_footer(f, idstr, sid)
        rec.size = f.bytes_received - start - offset
        stats.records.append(rec)
        stats.sections.append(idstr)
    load_vmdescription(f, stats, start)
    stats.bytes = f.bytes_received - start
    return stats
