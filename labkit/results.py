"""Result of one migration: what a learner or a benchmark reads, as a dataclass, a dict for JSON, and frames.

pause_ms is measured three ways, because they disagree and the difference teaches something:
  reported  query-migrate "downtime" on the source (QEMU's own figure: stop to completed, source side)
  events    source STOP event to destination RESUME event, on the host's CLOCK_MONOTONIC
  guest     the longest gap between two heartbeats, read from guest memory after the migration
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class MappingRow:
    side: str
    block: str
    start: int
    end: int
    size: int
    inode: int
    path: str
    offset: int = 0
    frames: list[int | None] = field(default_factory=list)


@dataclass
class TimelineRow:
    t_ms: float
    side: str
    kind: str
    detail: str


@dataclass
class Result:
    backend: str
    mode: str
    ram_bytes: int
    status: str
    error: str | None = None
    pause_ms: dict[str, float | None] = field(
        default_factory=lambda: {"reported": None, "events": None, "guest": None}
    )
    total_ms: float | None = None
    setup_ms: float | None = None
    bytes: dict[str, int | None] = field(default_factory=lambda: {"main": 0, "cpr": 0})
    passes: int = 0
    pages_per_pass: list[int] = field(default_factory=list)
    throughput_mbps: float | None = None
    guest_verified: bool | None = None
    verify: dict[str, Any] = field(default_factory=dict)
    states: dict[str, str] = field(default_factory=dict)
    mappings: list[MappingRow] = field(default_factory=list)
    timeline: list[TimelineRow] = field(default_factory=list)
    query_migrate: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def timeline_frame(self):
        """The timeline as a pandas DataFrame (t_ms, side, kind, detail)."""
        import pandas as pd

        return pd.DataFrame([asdict(r) for r in self.timeline], columns=["t_ms", "side", "kind", "detail"])

    def mappings_frame(self):
        import pandas as pd

        return pd.DataFrame([asdict(r) for r in self.mappings])

    def summary(self) -> str:
        """A few readable lines for the terminal."""
        from labkit.config import human_size

        p = self.pause_ms

        def ms(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.2f} ms"

        lines = [
            f"{self.mode} migration ({self.backend}, {human_size(self.ram_bytes)} guest RAM): {self.status}",
        ]
        if self.error:
            lines.append(f"  error: {self.error}")
        lines += [
            f"  pause: reported {ms(p.get('reported'))}, STOP->RESUME {ms(p.get('events'))}, "
            f"guest-seen {ms(p.get('guest'))}",
            f"  total time {ms(self.total_ms)}; passes {self.passes}; "
            f"main channel {human_size(self.bytes.get('main') or 0)}, cpr channel "
            f"{'n/a' if self.bytes.get('cpr') is None else str(self.bytes['cpr']) + ' B'}",
            f"  states: source {self.states.get('source')}, destination {self.states.get('destination')}",
            f"  guest memory verified: {self.guest_verified}",
        ]
        for m in self.mappings:
            if m.block in ("ram0", "pc.ram") or m.block == self.notes_block():
                lines.append(f"  {m.side:11s} {m.block}: {m.start:#x}-{m.end:#x} inode {m.inode} {m.path}")
        return "\n".join(lines)

    def notes_block(self) -> str:
        return next((m.block for m in self.mappings), "")
