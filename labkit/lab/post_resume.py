"""The first-touch cost after RESUME, from the guest's progress series and the destination's fault counts.

After cpr-transfer the new process maps the same memfds at new addresses with empty page tables (and, under
KVM, an empty EPT), so each page the guest touches faults once more after it resumes. None of the three pause
figures sees this: they end at RESUME. `post_resume` measures it the way the guest lives it:

  steady_bytes_per_s   the guest's write rate while the source ran alone, before the destination started
                       (median of its 5 ms windows, once it has written its whole RAM: a guest's first pass
                       pays first touches too; a starting destination competes with it for the CPUs)
  recover_ms           from RESUME to the start of the first 5 ms window in which the destination's guest
                       writes at >= 90 % of that rate (0 when it resumes at full speed; None if not within
                       the window measured)
  lost_ms              guest time lost in the first window_ms after RESUME: window_ms minus the bytes it wrote
                       divided by its steady rate (negative is noise or the guest catching up a backlog)
  pages_faulted        the destination's minor + major page faults (/proc/PID/stat) over that window
  precopy_lost_ms      the same loss on the source between `migrate` and STOP: pre-copy's mirror image, the
                       guest slowed while its pages are tracked and copied

Pure functions of recorded numbers, so they are unit-tested on made-up series.
"""

from __future__ import annotations

import bisect
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from labkit.lab.guest_progress import RATE_WINDOW_MS, ProgressRow

RECOVERED = 0.9  # "recovered" means back to 90 % of the steady rate


@dataclass
class PostResume:
    window_ms: float | None = None
    steady_bytes_per_s: float | None = None
    first_window_bytes_per_s: float | None = None
    recover_ms: float | None = None
    lost_ms: float | None = None
    pages_faulted: int | None = None
    minor_faults: int | None = None
    major_faults: int | None = None
    precopy_lost_ms: float | None = None
    sample_hz: float | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def value_at(ts: Sequence[float], vs: Sequence[int], t: float) -> int | None:
    """The counter at time t: the last sample at or before it (None before the first)."""
    i = bisect.bisect_right(ts, t) - 1
    return vs[i] if i >= 0 else None


def steady_rate(rows: Sequence[ProgressRow], until_ms: float, from_bytes: int = 1) -> float | None:
    """Median of the source's windowed rates before `until_ms` (before the migration starts), counted once
    the guest has written `from_bytes` (its whole RAM: before that its own first touches slow it, the very
    cost being measured); None when there are too few, or the guest wrote nothing (no dirty rate)."""
    rates = [
        r.bytes_per_s
        for r in rows
        if r.side == "source"
        and r.t_ms < until_ms
        and r.bytes >= max(from_bytes, 1)
        and r.bytes_per_s is not None
    ]
    median = statistics.median(rates) if len(rates) >= 5 else 0.0
    return median or None


def recover_ms(
    rows: Sequence[ProgressRow], resume_ms: float, steady: float, window_ms: float, rate_window: float
) -> float | None:
    """From RESUME to the start of the first rate window at >= 90 % of steady, within window_ms."""
    for r in rows:
        if r.side != "destination" or r.bytes_per_s is None or r.t_ms > resume_ms + window_ms:
            continue
        if r.bytes_per_s >= RECOVERED * steady:
            return round(max(0.0, r.t_ms - rate_window - resume_ms), 3)
    return None


def lost_ms(ts: Sequence[float], vs: Sequence[int], start: float, end: float, steady: float) -> float | None:
    """Guest time lost between start and end: the span minus what was written there at the steady rate."""
    a, b = value_at(ts, vs, start), value_at(ts, vs, end)
    if a is None or b is None or steady <= 0 or end <= start:
        return None
    return round((end - start) - (b - a) / steady * 1000, 3)


def faults_between(
    stat: Sequence[tuple[float, int, int]], start: float, end: float
) -> tuple[int, int] | None:
    """(minor, major) faults counted between the last stat samples at or before start and end."""
    ts = [s[0] for s in stat]
    i, j = bisect.bisect_right(ts, start) - 1, bisect.bisect_right(ts, end) - 1
    if i < 0 or j < 0:
        return None
    return stat[j][1] - stat[i][1], stat[j][2] - stat[i][2]


def post_resume(
    rows: Sequence[ProgressRow],
    *,
    migrate_ms: float | None,
    stop_ms: float | None,
    resume_ms: float | None,
    window_ms: float,
    first_pass_bytes: int = 0,
    steady_until_ms: float | None = None,
    dst_stat: Sequence[tuple[float, int, int]] = (),
    sample_hz: float | None = None,
    rate_window_ms: float = RATE_WINDOW_MS,
) -> PostResume:
    """Everything `post_resume` reports, from one migration's progress rows (see the module docstring)."""
    out = PostResume(sample_hz=sample_hz)
    if resume_ms is None or migrate_ms is None:
        out.note = "no RESUME (or no migrate) on the lab's clock: nothing to measure after it"
        return out
    until = min(migrate_ms, steady_until_ms) if steady_until_ms is not None else migrate_ms
    steady = steady_rate(rows, until, first_pass_bytes)
    if not steady and first_pass_bytes:
        steady = steady_rate(rows, until)
        out.note = (
            "steady rate taken while the guest still touched its RAM for the first time (warm up longer)"
        )
    if not steady:
        out.note = "the guest wrote nothing measurable before the migration (set a dirty rate)"
        return out
    out.steady_bytes_per_s = round(steady, 1)
    dst = [r for r in rows if r.side == "destination"]
    if not dst:
        out.note = "no samples of the destination's RAM after RESUME"
        return out
    covered = min(window_ms, dst[-1].t_ms - resume_ms)
    out.window_ms = round(covered, 3)
    dts, dvs = [r.t_ms for r in dst], [r.bytes for r in dst]
    src = [r for r in rows if r.side == "source"]
    # the counter at RESUME is the one the source stopped with (the same memory, or its migrated copy)
    at_resume = src[-1].bytes if src else dvs[0]
    end = value_at(dts, dvs, resume_ms + covered)
    if end is not None and covered > 0:
        out.first_window_bytes_per_s = round((end - at_resume) / (covered / 1000), 1)
        out.lost_ms = round(covered - (end - at_resume) / steady * 1000, 3)
    out.recover_ms = recover_ms(rows, resume_ms, steady, covered, rate_window_ms)
    faults = faults_between(dst_stat, resume_ms, resume_ms + covered)
    if faults is not None:
        out.minor_faults, out.major_faults = faults
        out.pages_faulted = faults[0] + faults[1]
    if stop_ms is not None and src:
        out.precopy_lost_ms = lost_ms(
            [r.t_ms for r in src], [r.bytes for r in src], migrate_ms, stop_ms, steady
        )
    return out
