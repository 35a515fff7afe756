"""Result of one migration: what a learner or a benchmark reads, as a dataclass, a dict for JSON, and frames.

pause_ms is measured three ways, because they disagree and the difference teaches something:
  reported  query-migrate "downtime" on the source (QEMU's own figure: stop to completed, source side)
  events    source STOP event to destination RESUME event, on the host's CLOCK_MONOTONIC
  guest     the longest gap between two heartbeats, read from guest memory after the migration
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from labkit.lab.facts import HostFacts
from labkit.lab.scenario import Scenario

if TYPE_CHECKING:
    import pandas as pd

from labkit.lab.guest_progress import ProgressRow


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
    # the guest's own bytes-written counter sampled through the memfd (labkit.lab.guest_progress), and the
    # first-touch cost after RESUME measured from it (labkit.lab.post_resume)
    progress: list[ProgressRow] = field(default_factory=list)
    post_resume: dict[str, Any] = field(default_factory=dict)

    def progress_frame(self) -> pd.DataFrame:
        """The guest's progress as a DataFrame (t_ms, side, bytes written since boot, bytes_per_s)."""
        import pandas as pd

        return pd.DataFrame(
            [asdict(r) for r in self.progress], columns=["t_ms", "side", "bytes", "bytes_per_s"]
        )
    scenario: Scenario | None = None  # what was asked: a Result read back can be run again
    host: HostFacts | None = None  # the machine it ran on, and its load

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, **dumps: Any) -> str:
        """The Result as `labkit migrate --json` prints it; from_json() reads it back."""
        return json.dumps(self.to_dict(), default=str, **dumps)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Result:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in data.items() if k in known}
        d["mappings"] = [MappingRow(**r) for r in d.get("mappings", [])]
        d["timeline"] = [TimelineRow(**r) for r in d.get("timeline", [])]
        d["pause_breakdown"] = [BreakdownRow(**r) for r in d.get("pause_breakdown", [])]
        d["progress"] = [ProgressRow(**r) for r in d.get("progress", [])]
        d["scenario"] = Scenario.from_dict(d["scenario"]) if d.get("scenario") else None
        d["host"] = HostFacts.from_dict(d["host"]) if d.get("host") else None
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> Result:
        """A Result from to_json()'s text (or a saved `labkit migrate --json` line)."""
        return cls.from_dict(json.loads(text))

    def timeline_frame(self) -> pd.DataFrame:
        """The timeline as a pandas DataFrame (t_ms, side, kind, detail), on the host's CLOCK_MONOTONIC."""
        import pandas as pd

        return pd.DataFrame([asdict(r) for r in self.timeline], columns=["t_ms", "side", "kind", "detail"])

    def breakdown_frame(self) -> pd.DataFrame:
        """The pause by checkpoint as a DataFrame (checkpoint, side, t_ms from STOP, delta_ms from the one
        before), QEMU's checkpoint names on both backends."""
        import pandas as pd

        return pd.DataFrame(
            [asdict(r) for r in self.pause_breakdown], columns=["checkpoint", "side", "t_ms", "delta_ms"]
        )

    def phase_durations(self) -> pd.DataFrame:
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
                "progress",
                "scenario",
                "host",
            ):
                continue
            if isinstance(value, dict):
                for k, v in value.items():
                    row[f"{key}_{k}"] = v
            else:
                row[key] = value
        row["pages_per_pass"] = " ".join(map(str, self.pages_per_pass))
        if self.scenario is not None:  # the settings it ran with, by their Scenario names (ram is ram_bytes)
            for key, value in self.scenario.to_dict().items():
                if key != "ram":
                    row.setdefault(key, value)
        return row

    def to_frame(self) -> pd.DataFrame:
        """One row with the same fields as `labkit migrate --json`, flattened (pause_ms_reported, bytes_main, ...)."""
        import pandas as pd

        return pd.DataFrame([self.flat()])

    def mappings_frame(self) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame([asdict(r) for r in self.mappings])

    def summary(self, include_error: bool = True) -> str:
        """A few readable lines for the terminal (the CLI prints the error once, on stderr, instead)."""
        from labkit.qemu_syntax import format_ms as ms
        from labkit.qemu_syntax import human_size

        p = self.pause_ms
        pages = self.scenario.hugetlb if self.scenario is not None else None
        paged = f" in {human_size(pages)} pages" if pages else ""  # a hugetlb memfd (Scenario.hugetlb)
        lines = [
            f"{self.mode} migration ({self.backend}, {human_size(self.ram_bytes)} guest RAM{paged}): {self.status}",
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
        if self.post_resume.get("steady_bytes_per_s"):
            lines.append("  after RESUME: " + post_resume_line(self.post_resume))
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


def post_resume_line(pr: dict[str, Any]) -> str:
    """post_resume in one line: the guest's rate against its steady rate, recovery, time lost, faults."""
    from labkit.qemu_syntax import human_size

    def rate(v: float | None) -> str:
        return "n/a" if v is None else f"{human_size(int(v))}/s"

    rec = pr.get("recover_ms")
    return (
        f"guest wrote {rate(pr.get('first_window_bytes_per_s'))} in its first {pr.get('window_ms')} ms "
        f"(steady {rate(pr.get('steady_bytes_per_s'))}), back to 90 % after "
        f"{'more than the window' if rec is None else f'{rec} ms'}, {pr.get('lost_ms')} ms of guest time lost, "
        f"{pr.get('pages_faulted')} page faults in the destination"
    )


def concat(results: Iterable[Result | pd.DataFrame]) -> pd.DataFrame:
    """Many Results (or frames) as one DataFrame, one row each."""
    import pandas as pd

    frames = [r.to_frame() if isinstance(r, Result) else r for r in results]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def to_csv(frame: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    frame.to_csv(path, index=False)


def read_csv(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a results CSV back (written by to_csv or `labkit bench`)."""
    import pandas as pd

    return pd.read_csv(path, comment="#")
