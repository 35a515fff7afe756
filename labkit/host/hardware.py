"""VMConfig: one VM described once, rendered to the argv of labkit-vm or of qemu-system-x86_64.

Options are spelled as QEMU spells them, so that what a learner types for one works for the other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from labkit.qemu_syntax import GuestConfig, MiB, format_size, parse_size


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
    nodefaults: bool = True  # -nodefaults; off adds q35's VGA and e1000e NIC, and with them their RAM blocks
    hugetlb: int | str | None = None  # huge page size ("2M"): memory-backend-memfd,hugetlb=on,hugetlbsize=
    prealloc: bool = False  # prealloc=on on the memory backend: every page faulted in at start (both backends)

    def __post_init__(self) -> None:
        self.ram = parse_size(self.ram, "m") if isinstance(self.ram, str) else self.ram
        if self.memory_backend not in ("memfd", "ram", "file", "epc", "none"):
            raise ValueError(
                f"memory_backend must be memfd, ram, file, epc or none, not {self.memory_backend!r}"
            )
        if self.memory_backend == "file" and not self.mem_path:
            raise ValueError("memory_backend 'file' needs mem_path")
        if self.hugetlb is not None:
            self.hugetlb = parse_size(self.hugetlb, "m")
            if self.memory_backend != "memfd":
                raise ValueError(
                    "hugetlb needs memory_backend 'memfd' (hugetlb= is a property of memory-backend-memfd only)"
                )
        if isinstance(self.guest, dict):
            self.guest = GuestConfig(**self.guest)

    def with_incoming(self, *values: str | dict[str, Any]) -> VMConfig:
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
        if self.hugetlb is not None:
            parts += ["hugetlb=on", f"hugetlbsize={format_size(int(self.hugetlb))}"]
        if self.prealloc:
            parts.append("prealloc=on")
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
