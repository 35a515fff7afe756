"""HostFacts: the machine a migration ran on, carried in its Result (guestperf's hardware.py, read not set).

A pause measured on a busy 2-core VM and one on an idle workstation are different figures; the Result says
which it was, so a report read back later can still be judged.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class HostFacts:
    """CPUs, memory and load when the migration ran, and the versions of what ran it."""

    cpus: int = 0
    mem_total: int = 0  # bytes
    mem_available: int = 0  # bytes, when the Lab started
    load_avg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    kernel: str = ""
    python: str = ""
    labkit: str = ""
    qemu: str | None = None  # qemu-system-x86_64's version when the run used it

    @classmethod
    def measure(cls, qemu: str | None = None) -> HostFacts:
        import psutil

        from labkit import __version__

        mem = psutil.virtual_memory()
        load = os.getloadavg()
        return cls(
            cpus=os.cpu_count() or 0, mem_total=int(mem.total), mem_available=int(mem.available),
            load_avg=(round(load[0], 2), round(load[1], 2), round(load[2], 2)),
            kernel=platform.release(), python=platform.python_version(), labkit=__version__, qemu=qemu,
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HostFacts:
        data = dict(data)
        if "load_avg" in data:
            data["load_avg"] = tuple(data["load_avg"])
        return cls(**data)
