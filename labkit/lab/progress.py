"""query-migrate, parsed once: QEMU's MigrationInfo and MigrationStats (qapi/migration.json) as dataclasses.

Every reader of a migration's progress (the Lab, sweeps, the walkthrough) takes these instead of digging in a
dict, so a member is spelled once. Attribute names are QEMU's member names with '-' as '_' (guestperf's
progress.py does the same). The reply itself is kept (`raw`), since the Result's JSON carries query-migrate as
QEMU wrote it. `MigrationDetails` is what the emulator adds beyond QEMU (the runner's migration_details()).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

# QEMU's MigrationStatus (qapi/migration.json)
MigrationStatus = Literal[
    "none", "setup", "cancelling", "cancelled", "active", "postcopy-active", "postcopy-paused",
    "postcopy-recover-setup", "postcopy-recover", "completed", "failed", "colo", "pre-switchover", "device",
    "wait-unplug",
]  # fmt: skip
FINISHED: tuple[str, ...] = ("completed", "failed", "cancelled")


def _members(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of a dataclass read from QMP members ('-' in QEMU's names, '_' in Python's)."""
    names = {f.name for f in fields(cls)} - {"raw"}
    return {k.replace("-", "_"): v for k, v in data.items() if k.replace("-", "_") in names}


@dataclass(frozen=True)
class MigrationStats:
    """query-migrate's "ram" (MigrationStats): counters of the RAM the migration has sent."""

    transferred: int = 0  # every byte on the main channel (migration_transferred_bytes)
    remaining: int = 0
    total: int = 0
    duplicate: int = 0
    normal: int = 0
    normal_bytes: int = 0
    dirty_pages_rate: int = 0
    mbps: float | None = None
    dirty_sync_count: int = 0
    postcopy_requests: int = 0
    page_size: int = 0
    multifd_bytes: int = 0
    pages_per_second: int = 0
    precopy_bytes: int = 0
    downtime_bytes: int = 0
    postcopy_bytes: int = 0
    dirty_sync_missed_zero_copy: int = 0

    @classmethod
    def from_qmp(cls, data: dict[str, Any] | None) -> MigrationStats:
        return cls(**_members(cls, data or {}))


@dataclass(frozen=True)
class MigrationInfo:
    """One query-migrate reply (MigrationInfo). Members QEMU leaves out in a state are None here."""

    status: str = "none"
    ram: MigrationStats | None = None
    total_time: int | None = None
    expected_downtime: int | None = None
    downtime: int | None = None
    setup_time: int | None = None
    error_desc: str | None = None
    blocked_reasons: list[str] = field(default_factory=list)
    socket_address: list[dict[str, Any]] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_qmp(cls, data: dict[str, Any] | None) -> MigrationInfo:
        data = dict(data or {})
        kw = _members(cls, data)
        kw["ram"] = MigrationStats.from_qmp(data["ram"]) if "ram" in data else None
        return cls(**kw, raw=data)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @property
    def stats(self) -> MigrationStats:
        """The RAM counters, zero where QEMU sent none (setup, failed)."""
        return self.ram or MigrationStats()

    @property
    def live_ms(self) -> int | None:
        """How long the guest ran while RAM was sent: total minus setup minus downtime."""
        if self.total_time is None:
            return None
        return self.total_time - (self.downtime or 0) - (self.setup_time or 0)


@dataclass(frozen=True)
class MigrationDetails:
    """The source's record in x-labkit-query-migrate: what QEMU's query-migrate has no member for (the
    emulator's only; real QEMU's runner has none)."""

    status: str = "none"
    bytes_main: int = 0
    bytes_cpr: int | None = None
    pages_per_pass: list[int] = field(default_factory=list)
    bytes_per_pass: list[int] = field(default_factory=list)
    seconds_per_pass: list[float] = field(default_factory=list)

    @classmethod
    def from_qmp(cls, data: dict[str, Any] | None) -> MigrationDetails | None:
        """From the whole x-labkit-query-migrate reply (its "source" record); None when there is none."""
        source = (data or {}).get("source")
        return None if source is None else cls(**_members(cls, source))
