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
class BreakdownRow:
    """One checkpoint of one migration (labkit.lab.breakdown): when, from the source's STOP event, and since the
    checkpoint before it."""

    checkpoint: str
    side: str
    t_ms: float
    delta_ms: float | None


@dataclass
class Result:
    backend: str
    mode: str
    ram_bytes: int
    status: str
    dirty_rate: int = 0
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
    first_pass_bytes_per_s: float | None = None  # pre-copy pass 1: every page, as fast as the link allows
    precopy_bytes_per_s: float | None = None  # bytes sent while the guest ran / time it ran (both backends)
    guest_verified: bool | None = None
    pids: dict[str, int | None] = field(default_factory=lambda: {"source": None, "destination": None})
    verify: dict[str, Any] = field(default_factory=dict)
    states: dict[str, str] = field(default_factory=dict)
    mappings: list[MappingRow] = field(default_factory=list)
    timeline: list[TimelineRow] = field(default_factory=list)
    pause_breakdown: list[BreakdownRow] = field(default_factory=list)  # QEMU's checkpoints, from STOP
    query_migrate: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def timeline_frame(self):
        """The timeline as a pandas DataFrame (t_ms, side, kind, detail), on the host's CLOCK_MONOTONIC."""
        import pandas as pd

        return pd.DataFrame([asdict(r) for r in self.timeline], columns=["t_ms", "side", "kind", "detail"])

    def breakdown_frame(self):
        """The pause by checkpoint as a DataFrame (checkpoint, side, t_ms from STOP, delta_ms from the one
        before), QEMU's checkpoint names on both backends."""
        import pandas as pd

        return pd.DataFrame(
            [asdict(r) for r in self.pause_breakdown], columns=["checkpoint", "side", "t_ms", "delta_ms"]
        )

    def phase_durations(self):
        """How long each lab phase lasted (ms): from its start mark to the next one, or the last event."""
        import pandas as pd

        starts = [r for r in self.timeline if r.side == "lab" and r.kind == "phase"]
        end = max((r.t_ms for r in self.timeline), default=0.0)
        rows = []
        for i, r in enumerate(starts):
            stop = starts[i + 1].t_ms if i + 1 < len(starts) else end
            rows.append({"phase": r.detail, "start_ms": r.t_ms, "duration_ms": round(stop - r.t_ms, 3)})
        return pd.DataFrame(rows, columns=["phase", "start_ms", "duration_ms"])

    def flat(self) -> dict[str, Any]:
        """One flat row: the scalar fields of `labkit migrate --json`, nested ones joined with '_'."""
        row: dict[str, Any] = {}
        for key, value in self.to_dict().items():
            if key in (
                "mappings",
                "timeline",
                "query_migrate",
                "verify",
                "notes",
                "pages_per_pass",
                "pause_breakdown",
            ):
                continue
            if isinstance(value, dict):
                for k, v in value.items():
                    row[f"{key}_{k}"] = v
            else:
                row[key] = value
        row["pages_per_pass"] = " ".join(map(str, self.pages_per_pass))
        return row

    def to_frame(self):
        """One row with the same fields as `labkit migrate --json`, flattened (pause_ms_reported, bytes_main, ...)."""
        import pandas as pd

        return pd.DataFrame([self.flat()])

    def mappings_frame(self):
        import pandas as pd

        return pd.DataFrame([asdict(r) for r in self.mappings])

    def summary(self, include_error: bool = True) -> str:
        """A few readable lines for the terminal (the CLI prints the error once, on stderr, instead)."""
        from labkit.qemu_syntax import format_ms as ms
        from labkit.qemu_syntax import human_size

        p = self.pause_ms
        lines = [
            f"{self.mode} migration ({self.backend}, {human_size(self.ram_bytes)} guest RAM): {self.status}",
        ]
        if self.error and include_error:
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
        if self.pause_breakdown:
            lines.append("  pause by checkpoint (ms from STOP, +ms since the one before):")
            for b in self.pause_breakdown:
                since = "" if b.delta_ms is None else f"+{b.delta_ms:.3f}"
                lines.append(f"    {b.side:11s} {b.checkpoint:36s} {b.t_ms:9.3f} {since:>9s}")
        for m in self.mappings:
            if m.block in ("ram0", "pc.ram") or m.block == self.notes_block():
                where = f"inode {m.inode} {m.path}" if m.inode else (m.path or "anonymous memory (no fd to pass)")
                lines.append(f"  {m.side:11s} {m.block}: {m.start:#x}-{m.end:#x} {where}")
        return "\n".join(lines)

    def notes_block(self) -> str:
        return next((m.block for m in self.mappings), "")


def concat(results):
    """Many Results (or frames) as one DataFrame, one row each."""
    import pandas as pd

    frames = [r.to_frame() if isinstance(r, Result) else r for r in results]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def to_csv(frame, path) -> None:
    frame.to_csv(path, index=False)


def read_csv(path):
    """Read a results CSV back (written by to_csv or `labkit bench`)."""
    import pandas as pd

    return pd.read_csv(path, comment="#")
