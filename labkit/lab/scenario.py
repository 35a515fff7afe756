"""Scenario: everything one migration is asked to do, as one frozen value (guestperf's scenario.py).

A Scenario is what goes into a Lab and comes back inside its Result, so a run can be repeated, swept or read
back from JSON without anyone rebuilding a list of keywords. Sizes may be given as QEMU spells them ("256M",
"10G") and are held in bytes; `-m` takes megabytes by default, as QEMU's does. What this host can honour
(free memory, QEMU's ranges) is checked by `check()`, which the Lab calls before it spawns anything, so a
Scenario read back from another machine's JSON is still a value.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal, get_args

from labkit.errors import LabkitError
from labkit.host.limits import LimitError, check_request
from labkit.qemu_syntax import MIG_MODES, GuestConfig, MigMode, SizeError, parse_size

Mode = MigMode
Backend = Literal["emulated", "qemu"]
MemoryBackend = Literal["memfd", "ram", "file", "epc", "none"]
Pattern = Literal["sequential", "random", "hotset"]
Holds = Literal["when-stepped", "never"]

MODES: tuple[Mode, ...] = ("normal", "cpr-reboot", "cpr-transfer")
ALL_MODES: tuple[Mode, ...] = MIG_MODES  # cpr-exec (QEMU 10.2) runs on the emulated backend

# the size fields, with the label an error names and the suffix a bare number takes (QEMU's -m: megabytes)
_SIZES = {
    "ram": ("ram (--ram)", "m"),
    "dirty_rate": ("dirty rate (--dirty-rate)", "b"),
    "working_set": ("working set (--working-set)", "b"),
    "max_bandwidth": ("max bandwidth (--max-bandwidth)", "b"),
    "hugetlb": ("hugetlb (--hugetlb)", "m"),
}


class LabError(LabkitError, ValueError):
    """A request the lab refuses before or while running it; its text is one line for the user."""


@dataclass(frozen=True)
class Scenario:
    """One migration's settings: mode and backend; the VM (RAM, memory backend and sharing); the guest
    workload; QEMU's migration parameters; how the lab drives it (defer, warm-up, holds, timeout)."""

    mode: Mode = "cpr-transfer"
    backend: Backend = "emulated"
    # the VM: -m, -object memory-backend-*, -machine aux-ram-share
    ram: int = 256 << 20
    memory_backend: MemoryBackend = "memfd"
    share: bool | None = None  # None: the backend's own default (memfd on, ram off; the lab's file on)
    aux_ram_share: bool = True
    # the guest workload (-x-guest on the emulator; the tiny guest on QEMU)
    dirty_rate: int = 0
    pattern: Pattern = "sequential"
    working_set: int | None = None
    seed: int = 1
    prefill: bool = False
    prealloc: bool = False  # prealloc=on on the memory backend: RAM faulted in when the VM starts
    hugetlb: int | None = None  # huge page size (2M): memory-backend-memfd,hugetlb=on,hugetlbsize= (memfd only)
    # migration parameters and capabilities (migrate-set-parameters, migrate-set-capabilities)
    downtime_limit: int = 300
    max_bandwidth: int = 10 << 30
    events: bool = True
    # how the lab drives it
    # -incoming defer, then migrate-incoming. None: the lab's choice, which is to defer only a real QEMU
    # cpr-transfer destination: its monitor opens after CPR state loads and QEMU keeps no event history, so
    # the lab must connect before the main channel opens or it may miss RESUME (QEMU's own qtest defers too)
    defer: bool | None = None
    warmup: float = 0.3  # seconds the guest runs before migrate
    holds: Holds = "when-stepped"  # hold both sides at each phase when stepped, where the runner can
    timeout: float = 60.0
    # what the lab measures besides the migration itself
    progress: bool = True  # sample the guest's progress through the memfd (Result.progress)
    progress_after_ms: float = 250.0  # ... for this long after RESUME (Result.post_resume's window)

    def __post_init__(self) -> None:
        if self.mode not in ALL_MODES:
            raise LabError(f"mode must be one of {', '.join(ALL_MODES)}, not {self.mode!r}")
        if self.holds not in get_args(Holds):
            raise LabError(f"holds must be one of {', '.join(get_args(Holds))}, not {self.holds!r}")
        for name, (what, suffix) in _SIZES.items():
            value = getattr(self, name)
            if value is None or (isinstance(value, int) and not isinstance(value, bool)):
                continue
            try:
                object.__setattr__(self, name, parse_size(value, suffix))
            except SizeError as e:
                raise LabError(f"{what}: {e}") from None

    # -- what the host can honour -------------------------------------------------------------------------
    def check(self) -> None:
        """Refuse what this host or QEMU cannot do, with one line, before anything is spawned."""
        try:
            check_request(
                backend=self.backend, mode=self.mode, ram=self.ram, memory_backend=self.memory_backend,
                share=self.share, pattern=self.pattern, dirty_rate=self.dirty_rate,
                working_set=self.working_set, downtime_limit=self.downtime_limit,
                max_bandwidth=self.max_bandwidth, timeout=self.timeout, hugetlb=self.hugetlb,
            )  # fmt: skip
        except LimitError as e:
            raise LabError(str(e)) from None

    # -- what it becomes ------------------------------------------------------------------------------------
    @property
    def guest(self) -> GuestConfig:
        """The guest workload as the VM's -x-guest option holds it."""
        return GuestConfig(
            dirty_rate=self.dirty_rate, pattern=self.pattern, working_set=self.working_set,
            seed=self.seed, prefill=self.prefill,
        )  # fmt: skip

    @property
    def file_backed(self) -> bool:
        """Guest RAM in memory-backend-file (the lab's shared file; cpr-reboot may then skip it)."""
        return self.memory_backend in ("file",)

    @property
    def vm_share(self) -> bool | None:
        """share= on the memory backend: the lab's file backend is a shared file (cpr-reboot's docs)."""
        return True if self.share is None and self.file_backed else self.share

    def with_(self, **changes: Any) -> Scenario:
        """A copy with some settings changed (sizes may be spelled as QEMU spells them)."""
        return replace(self, **changes)

    # -- JSON --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scenario:
        """A Scenario from to_dict()'s output; keys this version does not know are refused by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LabError(f"scenario: unknown setting {', '.join(unknown)}")
        return cls(**data)
