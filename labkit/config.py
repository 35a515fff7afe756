"""VM descriptions: QEMU's size syntax, memory backends and the VMConfig that renders to a command line.

One VMConfig renders to the argv of the emulated VM (`labkit-vm`) or of real `qemu-system-x86_64`, with the
options spelled as QEMU spells them, so that what a learner types for one works for the other.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace

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


def human_size(n: float) -> str:
    """A readable size for people: 1.5 GiB, 12.0 MiB."""
    for unit, mult in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= mult:
            return f"{n / mult:.1f} {unit}"
    return f"{int(n)} B"


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


@dataclass
class VMConfig:
    """Everything that describes one VM, for either backend.

    memory_backend picks how guest RAM is held: "memfd" (memory-backend-memfd, what cpr-transfer needs),
    "ram" (memory-backend-ram), "file" (memory-backend-file at mem_path), "epc" (memory-backend-epc, which CPR
    refuses) or "none" (QEMU's default pc.ram block, private anonymous memory).
    """

    name: str = "vm"
    ram: int = 256 * MiB
    memory_backend: str = "memfd"
    share: bool | None = True  # None: leave the backend's default (off)
    aux_ram_share: bool = True
    mem_path: str | None = None
    guest: GuestConfig = field(default_factory=GuestConfig)
    incoming: list[str] = field(
        default_factory=list
    )  # -incoming values as typed: URI, "defer", JSON or keyval
    start_paused: bool = False  # -S
    backend_id: str = "ram0"
    serial_path: str | None = None  # -serial file:PATH
    holds: list[str] = field(default_factory=list)  # -x-hold (emulator only): migration points to wait at
    nodefaults: bool = True  # -nodefaults; off gives QEMU's default devices (VGA, NIC) and their RAM blocks

    def __post_init__(self) -> None:
        self.ram = parse_size(self.ram, "m") if isinstance(self.ram, str) else self.ram
        if self.memory_backend not in ("memfd", "ram", "file", "epc", "none"):
            raise ValueError(
                f"memory_backend must be memfd, ram, file, epc or none, not {self.memory_backend!r}"
            )
        if self.memory_backend == "file" and not self.mem_path:
            raise ValueError("memory_backend 'file' needs mem_path")
        if isinstance(self.guest, dict):
            self.guest = GuestConfig(**self.guest)

    def with_incoming(self, *values: str | dict) -> VMConfig:
        """A copy of this VM as a migration destination: same machine, plus -incoming options."""
        rendered = [v if isinstance(v, str) else json.dumps(v, separators=(",", ":")) for v in values]
        return replace(self, incoming=rendered)

    def machine_option(self) -> str:
        parts = ["q35", f"aux-ram-share={'on' if self.aux_ram_share else 'off'}"]
        if self.memory_backend != "none":
            parts.append(f"memory-backend={self.backend_id}")
        return ",".join(parts)

    def object_option(self) -> str | None:
        if self.memory_backend == "none":
            return None
        parts = [
            f"memory-backend-{self.memory_backend}",
            f"id={self.backend_id}",
            f"size={format_size(self.ram)}",
        ]
        if self.share is not None and self.memory_backend != "epc":
            parts.append(f"share={'on' if self.share else 'off'}")
        if self.memory_backend == "file":
            parts.append(f"mem-path={self.mem_path}")
        return ",".join(parts)

    def common_argv(self, qmp_path: str) -> list[str]:
        """The options both backends share, in QEMU's spelling."""
        argv = ["-name", self.name, "-m", format_size(self.ram), "-machine", self.machine_option()]
        obj = self.object_option()
        if obj:
            argv += ["-object", obj]
        if self.nodefaults:
            argv.append("-nodefaults")
        argv += ["-display", "none", "-qmp", f"unix:{qmp_path},server=on,wait=off"]
        if self.serial_path:
            argv += ["-serial", f"file:{self.serial_path}"]
        for value in self.incoming:
            argv += ["-incoming", value]
        if self.start_paused:
            argv.append("-S")
        return argv

    def emulated_argv(self, qmp_path: str) -> list[str]:
        """Arguments for `labkit-vm` (the program name not included)."""
        argv = self.common_argv(qmp_path) + ["-x-guest", self.guest.to_option()]
        if self.holds:
            argv += ["-x-hold", ",".join(self.holds)]
        return argv
