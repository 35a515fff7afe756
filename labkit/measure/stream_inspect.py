"""`labkit stream-inspect FILE`: decode a main migration stream written by real QEMU or by labkit-vm.

The emulator's destination and this inspector read with the same parser (stream.qemu_loadvm_state); only what
they do with each section differs. A device section has no length on the wire, so, like QEMU's
scripts/analyze-migration.py, the inspector first reads the vmdesc JSON that QEMU appends after EOF (it is the
file's tail) and skips each device section by the sizes of the fields it lists; the footer after it checks
the guess. RAM pages are counted by kind and dropped.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict, dataclass, field
from typing import Any

from labkit.vm.migration.stream import (
    QEMU_VM_VMDESCRIPTION,
    QEMUFileIn,
    SectionRecord,
    StreamError,
    qemu_loadvm_state,
)
from labkit.vm.migration.vmstate import vmdesc_section_size

#: How far from the end of a file the vmdesc is looked for (QEMU's for q35 is about 44 KB).
VMDESC_TAIL = 16 << 20


@dataclass
class StreamReport:
    """Everything stream-inspect prints: sections in order, RAM blocks, page counts, devices, the vmdesc."""

    path: str
    bytes: int
    machine: str | None
    capabilities: list[str]
    sections: list[dict]
    ram_blocks: list[dict]
    pages: dict[str, int]
    devices: list[dict]
    vmdesc: dict | None
    vmdesc_bytes: int
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def read_vmdesc_tail(path: str) -> dict | None:
    """The vmdesc JSON at the end of a stream file: ``0x06``, be32 length, JSON, then nothing.

    JSON text never holds a raw 0x06 byte, so the last one in the file is the marker when there is a vmdesc."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        fh.seek(max(0, size - VMDESC_TAIL))
        tail = fh.read()
    i = tail.rfind(bytes([QEMU_VM_VMDESCRIPTION]))
    if i < 0 or len(tail) - i < 5:
        return None
    (length,) = struct.unpack(">I", tail[i + 1 : i + 5])
    if i + 5 + length != len(tail) or tail[i + 5 : i + 6] != b"{":
        return None
    try:
        desc = json.loads(tail[i + 5 :])
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return desc if isinstance(desc, dict) else None


def inspect_stream(path: str) -> StreamReport:
    """Decode the stream in ``path`` from its header to its vmdesc; a malformed stream raises StreamError."""
    vmdesc = read_vmdesc_tail(path)
    described = {}
    for dev in (vmdesc or {}).get("devices", []):
        if isinstance(dev, dict):
            described[(dev.get("name"), dev.get("instance_id"))] = dev
    devices: list[dict] = []

    def on_device(idstr: str, instance_id: int, version_id: int, f: QEMUFileIn) -> None:
        desc = described.get((idstr, instance_id))
        if desc is None:
            raise StreamError(f"section '{idstr}' {instance_id} is not in the vmdesc: its size is unknown")
        size = vmdesc_section_size(desc)
        f.skip(size)
        devices.append(
            {
                "idstr": idstr,
                "instance_id": instance_id,
                "version_id": version_id,
                "vmsd_name": desc.get("vmsd_name"),
                "size": size,
                "fields": len(desc.get("fields", [])),
                "subsections": [s.get("vmsd_name") for s in desc.get("subsections", [])],
            }
        )

    with open(path, "rb") as fh:
        stats = qemu_loadvm_state(QEMUFileIn(fh), ram=lambda name: None, on_device=on_device)
        trailing = len(fh.read(1))
    if trailing:
        stats.warnings.append("bytes after the vmdesc")
    parsed = json.loads(stats.vmdesc) if stats.vmdesc is not None else None
    return StreamReport(
        path=path,
        bytes=stats.bytes,
        machine=stats.machine,
        capabilities=stats.capabilities,
        sections=[_section(r) for r in stats.records],
        ram_blocks=[{"name": n, "used_length": length} for n, length in stats.ram_blocks],
        pages={"normal": stats.normal_pages, "zero": stats.zero_pages},
        devices=devices,
        vmdesc=parsed,
        vmdesc_bytes=len(stats.vmdesc or b""),
        warnings=stats.warnings,
    )


def _section(r: SectionRecord) -> dict:
    out: dict[str, Any] = {
        "kind": r.kind,
        "section_id": r.section_id,
        "idstr": r.idstr,
        "instance_id": r.instance_id,
        "version_id": r.version_id,
        "offset": r.offset,
        "size": r.size,
    }
    if r.kind in ("PART", "END"):
        out["pages"] = {"normal": r.normal_pages, "zero": r.zero_pages}
    return out


def format_report(rep: StreamReport) -> str:
    """The human-readable listing: one line per section, then the totals."""
    lines = [f"{rep.path}: {rep.bytes} bytes, machine {rep.machine or '-'}"]
    if rep.capabilities:
        lines.append(f"capabilities: {', '.join(rep.capabilities)}")
    lines.append(
        f"{'offset':>10} {'kind':<13} {'id':>3} {'idstr':<24} {'inst':>4} {'ver':>3} {'size':>9}  pages"
    )
    for s in rep.sections:
        pages = s.get("pages")
        col = f"{pages['normal']} normal, {pages['zero']} zero" if pages else ""
        sid = "" if s["section_id"] is None else s["section_id"]
        inst = "" if s["instance_id"] is None else s["instance_id"]
        ver = "" if s["version_id"] is None else s["version_id"]
        lines.append(
            f"{s['offset']:>10} {s['kind']:<13} {sid:>3} {s['idstr']:<24} {inst:>4} {ver:>3} {s['size']:>9}  {col}"
        )
    lines.append("RAM blocks: " + ", ".join(f"{b['name']} ({b['used_length']:#x})" for b in rep.ram_blocks))
    lines.append(f"pages: {rep.pages['normal']} normal, {rep.pages['zero']} zero")
    dev_bytes = sum(d["size"] for d in rep.devices)
    lines.append(f"device sections: {len(rep.devices)}, {dev_bytes} bytes of fields")
    if rep.vmdesc is not None:
        lines.append(
            f"vmdesc: {rep.vmdesc_bytes} bytes, {len(rep.vmdesc.get('devices', []))} devices described"
        )
    for w in rep.warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """`labkit stream-inspect FILE [--json]`: exit 1 with one line for a file that is not a valid stream."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="labkit stream-inspect", description=__doc__.splitlines()[0])
    p.add_argument("path")
    p.add_argument(
        "--json", action="store_true", help="one JSON object: sections, blocks, pages, devices, vmdesc"
    )
    args = p.parse_args(argv)
    try:
        rep = inspect_stream(args.path)
    except (OSError, StreamError) as e:
        text = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.strerror else str(e)
        print(f"labkit stream-inspect: {text}", file=sys.stderr)
        return 1
    print(json.dumps(rep.to_json(), indent=1) if args.json else format_report(rep))
    return 0
