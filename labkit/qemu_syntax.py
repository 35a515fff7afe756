"""QEMU's size and option syntax, shared by the lab and the emulated VM (a leaf: imports nothing of labkit).

Also the few words every layer shows the same way: a migration's two sides, sizes and milliseconds for people,
and a `migrate` channel on a UNIX socket, so that no layer keeps its own copy of them.

One VMConfig renders to the argv of the emulated VM (`labkit-vm`) or of real `qemu-system-x86_64`, with the
options spelled as QEMU spells them, so that what a learner types for one works for the other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, get_args

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

# QEMU's qemu_strtosz() suffixes (util/cutils.c): B, K, M, G, T, P, E, case-insensitive.
_SUFFIX = {"b": 1, "k": KiB, "m": MiB, "g": GiB, "t": TiB, "p": 1 << 50, "e": 1 << 60}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([bkmgtpeBKMGTPE]?)\s*$")

MEMORY_BACKENDS = ("memory-backend-memfd", "memory-backend-ram", "memory-backend-file", "memory-backend-epc")
GUEST_PATTERNS = ("sequential", "random", "hotset")


class SizeError(ValueError):
    """A size that QEMU's qemu_strtosz() would refuse."""


def parse_size(text: str | int, default_suffix: str = "b") -> int:
    """Parse a size the way QEMU does ("1G", "512M", "4096"); `-m` uses default_suffix "M" as QEMU does."""
    if isinstance(text, int):
        if text < 0:
            raise SizeError(f"invalid size: {text}")
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise SizeError(f"invalid size: '{text}'")
    number, suffix = m.group(1), (m.group(2) or default_suffix).lower()
    if "." in number and suffix == "b":
        raise SizeError(f"invalid size: '{text}' (fractions need a suffix)")
    value = float(number) * _SUFFIX[suffix] if "." in number else int(number) * _SUFFIX[suffix]
    value = int(value)
    if value >= 1 << 64:
        raise SizeError(f"invalid size: '{text}' (must be below 2^64)")
    return value


def format_size(n: int) -> str:
    """The shortest exact QEMU spelling of a size: 1073741824 -> '1G', 1536 -> '1536'."""
    for suffix, mult in (("T", TiB), ("G", GiB), ("M", MiB), ("K", KiB)):
        if n and n % mult == 0:
            return f"{n // mult}{suffix}"
    return str(n)


def human_size(n: float, spec: str = ".1f") -> str:
    """A readable size for people: 1.5 GiB, 12.0 MiB (`spec` formats the number: ".3g" gives 1 GiB)."""
    for unit, mult in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= mult:
            return f"{n / mult:{spec}} {unit}"
    return f"{int(n)} B"


def format_ms(ms: float | None, digits: int = 2) -> str:
    """A duration for people, "12.35 ms", or "n/a" where nothing was measured (a failed run has no pause)."""
    return "n/a" if ms is None else f"{ms:.{digits}f} ms"


#: QAPI's MigMode, in QEMU's order: the one list of migration modes (cpr-exec is QEMU 10.2's)
MigMode = Literal["normal", "cpr-reboot", "cpr-transfer", "cpr-exec"]
MIG_MODES: tuple[MigMode, ...] = get_args(MigMode)

# a migration's two QEMU processes, in QEMU's words: the outgoing and the incoming side
SIDES = ("source", "destination")


def unix_channel(path: str, channel_type: str = "main") -> dict[str, Any]:
    """A MigrationChannel (QAPI) over a UNIX socket, as `migrate` and `migrate-incoming` take it."""
    return {"channel-type": channel_type, "addr": {"transport": "socket", "type": "unix", "path": path}}


@dataclass
class GuestConfig:
    """The emulated guest workload (`-x-guest`): how fast and where the vCPU dirties guest RAM."""

    dirty_rate: int = 0  # bytes per second written to guest RAM; 0 = only the heartbeat
    pattern: str = "sequential"  # sequential | random | hotset
    working_set: int | None = None  # bytes of RAM the workload touches; None = all of it
    seed: int = 1
    prefill: bool = False  # write every page once at boot, as a guest that has used all its memory

    def to_option(self) -> str:
        parts = [f"dirty-rate={format_size(self.dirty_rate)}", f"pattern={self.pattern}"]
        if self.prefill:
            parts.append("prefill=on")
        if self.working_set is not None:
            parts.append(f"working-set={format_size(self.working_set)}")
        parts.append(f"seed={self.seed}")
        return ",".join(parts)
