"""`labkit cpr-inspect` (also ``python -m labkit.vm.migration.cpr_inspect``): receive one CPR state as a
destination would, and decode it field by field, for teaching.

Apart from cpr.py because it is a tool around the wire format, not part of a migration: it reads with
cpr.py's parser and listens with cpr_transfer.py's channel.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

from labkit.vm.migration.channels import MigrationAddress
from labkit.vm.migration.cpr import (
    QEMU_CPR_FILE_MAGIC,
    BytesSource,
    CprError,
    CprFd,
    cpr_state_parse,
    cpr_state_receive,
    describe_fd,
)
from labkit.vm.migration.cpr_transfer import cpr_transfer_input

_FIELD_NOTES: dict[str, Callable[[Any], str]] = {
    "magic": lambda v: f"0x{v:08x} ('QCPR')" if v == QEMU_CPR_FILE_MAGIC else f"0x{v:08x} (bad magic)",
    "version": lambda v: f"{v}",
    "marker": lambda v: "1: a CprFd follows" if v else "0: end of the fd list",
}


def cpr_inspect(data: bytes, nfds: int | None = None) -> dict[str, Any]:
    """Decode captured CPR state bytes field by field, for teaching.

    Returns ``{"length", "fields": [{"offset", "size", "field", "value", "hex"}...], "fds":
    [{"name", "id", "offset", "fd_offset"}...], "complete", "error", "trailing", "nfds",
    "fds_match"}``.  ``nfds`` is how many fds arrived with the bytes, if known.
    """
    fields: list[dict[str, Any]] = []

    def on_field(offset: int, size: int, name: str, value: Any) -> None:
        fields.append(
            {
                "offset": offset,
                "size": size,
                "field": name,
                "value": value,
                "hex": data[offset : offset + size].hex(" "),
            }
        )

    src = BytesSource(bytes(data))
    error = None
    entries: list[CprFd] = []
    try:
        entries = cpr_state_parse(src, max_name=1 << 20, on_field=on_field)
    except CprError as err:
        error = str(err)
    fds = []
    for f in fields:
        if f["field"].endswith(".namelen"):
            fds.append({"offset": f["offset"] - 1})
        elif f["field"].endswith(".name"):
            fds[-1]["name"] = f["value"]
        elif f["field"].endswith(".id"):
            fds[-1]["id"] = f["value"]
        elif f["field"].endswith(".fd"):
            fds[-1]["fd_offset"] = f["offset"]
    complete = error is None
    return {
        "length": len(data),
        "fields": fields,
        "fds": fds,
        "count": len(entries),
        "complete": complete,
        "error": error,
        "trailing": len(data) - src.offset if complete else 0,
        "nfds": nfds,
        "fds_match": None if nfds is None or not complete else nfds == len(entries),
    }


def _format_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << (shift - 4)) == 0:
            return f"{n / (1 << shift):g} {unit}"
    return f"{n} B"


def format_cpr_inspect(report: dict[str, Any], fd_info: list[dict[str, Any]] | None = None) -> str:
    """Render :func:`cpr_inspect`'s report (plus optional :func:`describe_fd` results) as text."""
    lines = [
        f"CPR state: {report['length']} bytes"
        + (f", {report['nfds']} fds" if report["nfds"] is not None else "")
    ]
    lines.append(f"{'offset':>6}  {'size':>4}  {'field':<18} {'bytes':<24} value")
    for f in report["fields"]:
        note = _FIELD_NOTES.get(f["field"])
        value = note(f["value"]) if note else repr(f["value"]) if isinstance(f["value"], str) else f["value"]
        if f["field"].endswith(".fd"):
            value = "' ' + SCM_RIGHTS" + ("" if f["value"] is None else f" -> fd {f['value']}")
        hexs = f["hex"] if len(f["hex"]) <= 24 else f["hex"][:20] + " ..."
        lines.append(f"{f['offset']:>6}  {f['size']:>4}  {f['field']:<18} {hexs:<24} {value}")
    if report["error"]:
        lines.append(f"error: {report['error']}")
    if report["trailing"]:
        lines.append(f"{report['trailing']} trailing bytes after the end of the list")
    for i, info in enumerate(fd_info or []):
        entry = report["fds"][i] if i < len(report["fds"]) else {}
        lines.append(
            f"fd[{i}] {entry.get('name', '?')!r} id {entry.get('id', '?')}: {info['kind']} {info['target']}, "
            f"inode {info['inode']}, size {_format_size(info['size'])}"
        )
    return "\n".join(lines)


def cpr_inspect_listen(
    path: str, *, timeout: float | None = None, file: TextIO | None = sys.stdout
) -> dict[str, Any]:
    """Listen on ``path`` like a destination QEMU, receive one CPR state, print what came.

    For each fd it prints what /proc says (memfd name, inode, size), then closes the fds and the
    connection (which also tells a waiting source "go ahead").  Returns the report with
    ``"fd_info"`` added.
    """
    conn = cpr_transfer_input(MigrationAddress("socket", "unix", path=path), timeout=timeout)
    try:
        conn.settimeout(timeout)
        entries, src = cpr_state_receive(conn, 64, 4096, 1 << 20)
    finally:
        conn.close()
    try:
        fd_info = [describe_fd(e.fd) for e in entries]
    finally:
        for e in entries:
            os.close(e.fd)
    report = cpr_inspect(bytes(src.raw), nfds=len(src.received))
    report["fd_info"] = fd_info
    if file is not None:
        print(format_cpr_inspect(report, fd_info), file=file)
    return report


def main(argv: list[str] | None = None) -> int:
    """``labkit cpr-inspect PATH [--timeout S]`` (also ``python -m labkit.vm.migration.cpr_inspect``).

    Point a source's cpr channel at PATH: the tool plays destination for the CPR state only,
    prints it, and closes the connection (so a real source then fails to connect its main channel).
    """
    import argparse

    parser = argparse.ArgumentParser(
        prog="cpr-inspect", description="Receive one CPR state on a unix socket and show what it holds."
    )
    parser.add_argument("path", help="unix socket path to listen on (the source's cpr channel path)")
    parser.add_argument("timeout_pos", nargs="?", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    args = parser.parse_args(argv)
    timeout = args.timeout if args.timeout is not None else args.timeout_pos
    try:
        cpr_inspect_listen(args.path, timeout=timeout)
    except CprError as err:
        print(f"cpr-inspect: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
