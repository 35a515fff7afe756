"""A minimal reader of a main migration stream's section list, for the conformance harness.

TODO(stream): switch to the shared decoder (`labkit stream-inspect --json`, being written on the "stream"
branch) once it is merged, and delete this file; the harness needs only what `section_list` returns.

It reads QEMU's layout (savevm.c, ram.c): header, CONFIGURATION, START/PART/END/FULL sections with footers,
COMMAND, EOF and the VMDESCRIPTION JSON. RAM sections are walked record by record, as QEMU's ram_load does:
one `be64 addr|flags` per page (a name unless CONTINUE; a fill byte for ZERO, 4096 bytes for PAGE). A stream
without a CONFIGURATION section is labkit-vm's own today, whose RAM records carry runs (`be32 npages` after
the name). Device sections have no length in QEMU's layout: their end is found at their footer
(`0x7e be32 section-id`) followed by the start of a next section.
"""

from __future__ import annotations

import json
import struct

EOF_, START, PART, END, FULL, SUBSECTION, VMDESCRIPTION, CONFIGURATION, COMMAND = range(9)
FOOTER = 0x7E
KIND = {START: "START", PART: "PART", END: "END", FULL: "FULL"}
ZERO, MEM_SIZE, PAGE, EOS, CONTINUE = 0x02, 0x04, 0x08, 0x10, 0x20
FLAG_MASK = 0xFFF


class Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError(f"stream ends at {len(self.data)} inside a field at {self.pos}")
        b = self.data[self.pos : self.pos + n]
        self.pos += n
        return b

    def u8(self) -> int:
        return self.take(1)[0]

    def be16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def be32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def be64(self) -> int:
        return struct.unpack(">Q", self.take(8))[0]

    def counted(self) -> str:
        return self.take(self.u8()).decode(errors="replace")


def _ram_records(r: Reader, runs: bool, pages: dict) -> None:
    """Walk RAM records to RAM_SAVE_FLAG_EOS, counting pages by kind."""
    while True:
        flags = r.be64() & FLAG_MASK
        if flags & EOS:
            return
        if flags & (ZERO | PAGE) and not flags & CONTINUE:
            r.counted()
        n = r.be32() if runs else 1
        if flags & ZERO:
            pages["zero"] += n
            if not runs:
                r.take(1)
        elif flags & PAGE:
            pages["normal"] += n
            r.take(4096 * n)
        elif flags & ~CONTINUE:  # MULTIFD_FLUSH and friends carry nothing
            continue


def _skip_to_footer(r: Reader, sid: int) -> int:
    """Move past a section whose payload layout the reader does not know; returns the payload's size."""
    mark = bytes([FOOTER]) + struct.pack(">I", sid)
    at = r.pos
    while True:
        hit = r.data.find(mark, at)
        if hit < 0:
            raise ValueError(f"no footer for section {sid} after offset {r.pos}")
        after = hit + len(mark)
        if after >= len(r.data) or r.data[after] in (EOF_, START, PART, END, FULL, COMMAND):
            size = hit - r.pos
            r.pos = hit
            return size
        at = hit + 1


def section_list(data: bytes) -> dict:
    """{"sections": [{"kind", "id", "name", "instance", "version", "size", ...}], "pages", "vmdesc",
    "format", "error"}: every section in stream order; RAM START sections also list their blocks."""
    r = Reader(data)
    out: dict = {"sections": [], "pages": {"zero": 0, "normal": 0}, "vmdesc": None, "error": None}
    try:
        magic, version = r.be32(), r.be32()
        if magic != 0x5145564D:
            raise ValueError(f"bad magic {magic:#x}")
        out["version"] = version
        runs = r.data[r.pos] != CONFIGURATION
        out["format"] = "labkit runs" if runs else "qemu"
        names: dict[int, str] = {}
        while True:
            kind = r.u8()
            if kind == CONFIGURATION:
                name = r.take(r.be32()).decode(errors="replace")
                out["sections"].append({"kind": "CONFIGURATION", "name": name})
            elif kind in (START, FULL):
                sid, name, inst, ver = r.be32(), r.counted(), r.be32(), r.be32()
                names[sid] = name
                sec = {"kind": KIND[kind], "id": sid, "name": name, "instance": inst, "version": ver}
                out["sections"].append(sec)
                start = r.pos
                if name == "ram":
                    if kind == START:
                        total, blocks = r.be64() & ~FLAG_MASK, []
                        while total > 0 and len(blocks) < 4096:
                            blocks.append([r.counted(), r.be64()])
                            total -= blocks[-1][1]
                        sec["blocks"] = blocks
                    _ram_records(r, runs, out["pages"])
                else:
                    _skip_to_footer(r, sid)
                sec["size"] = r.pos - start
                if r.u8() != FOOTER or r.be32() != sid:
                    raise ValueError(f"section {sid} ({name}) has no footer at {r.pos}")
            elif kind in (PART, END):
                sid = r.be32()
                name = names.get(sid, "?")
                sec = {"kind": KIND[kind], "id": sid, "name": name}
                out["sections"].append(sec)
                start = r.pos
                if name == "ram":
                    _ram_records(r, runs, out["pages"])
                else:
                    _skip_to_footer(r, sid)
                sec["size"] = r.pos - start
                if r.u8() != FOOTER or r.be32() != sid:
                    raise ValueError(f"section {sid} ({name}) has no footer at {r.pos}")
            elif kind == COMMAND:
                cmd, length = r.be16(), r.be16()
                r.take(length)
                out["sections"].append({"kind": "COMMAND", "name": f"command {cmd}", "size": length})
            elif kind == EOF_:
                out["sections"].append({"kind": "EOF"})
                if r.pos < len(r.data) and r.data[r.pos] == VMDESCRIPTION:
                    r.u8()
                    desc = r.take(r.be32())
                    out["sections"].append({"kind": "VMDESCRIPTION", "size": len(desc)})
                    out["vmdesc"] = json.loads(desc)
                break
            else:
                raise ValueError(f"unknown section type {kind} at offset {r.pos - 1}")
        if r.pos != len(r.data):
            out["trailing"] = len(r.data) - r.pos
    except (ValueError, json.JSONDecodeError) as e:
        out["error"] = str(e)
    return out


def describe(sec: dict) -> str:
    """One section as the harness compares it: kind, name, instance, version and section id (no sizes)."""
    if sec["kind"] in ("START", "FULL"):
        return f"{sec['kind']} {sec['name']}.{sec['instance']} v{sec['version']} #{sec['id']}"
    if sec["kind"] in ("PART", "END"):
        return f"{sec['kind']} {sec['name']} #{sec['id']}"
    if sec["kind"] == "CONFIGURATION":
        return f"CONFIGURATION {sec['name']}"
    if sec["kind"] == "COMMAND":
        return sec["name"].upper()
    return sec["kind"]
