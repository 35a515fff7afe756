"""What the Lab holds to record the guest's progress: a sampler started with the source, told about each VM
as it is spawned, kept running for a settable time after RESUME, then turned into Result.progress and
Result.post_resume. A few calls from labkit.lab.engine; the logic is in progress.py and post_resume.py."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from labkit.lab.guest_progress import ProgressRow, ProgressSampler, counter_location, sample_rate_hz, stitch
from labkit.lab.post_resume import PostResume, post_resume
from labkit.lab.report import TimelineRow

if TYPE_CHECKING:
    from labkit.host.machine import Machine

DEFAULT_AFTER_MS = 250.0


class ProgressRecorder:
    """Samples the guest's counter through each VM's memfd from the source's start to `after_ms` past the
    migration's end (or is inert when disabled)."""

    def __init__(self, backend: str, t0_ns: int, enabled: bool = True, after_ms: float = DEFAULT_AFTER_MS):
        self.backend = backend
        self.t0_ns = t0_ns
        self.enabled = enabled
        self.after_ms = after_ms
        self.sampler: ProgressSampler | None = None
        self.first_pass_bytes = 0  # what the guest writes in one pass over its RAM (its working set)

    def attach(self, side: str, machine: Machine | None) -> None:
        """Sample `machine` as `side` ("source" or "destination"); the first call starts the sampler."""
        if not self.enabled or machine is None or machine.proc is None:
            return
        if self.sampler is None:
            self.sampler = ProgressSampler()
            self.sampler.start()
        self.sampler.attach(side, machine.pid, counter_location(self.backend, machine.config))
        guest = machine.config.guest
        self.first_pass_bytes = int(0.95 * min(machine.config.ram, guest.working_set or machine.config.ram))

    def wait_after(self, resume_ns: int | None) -> None:
        """Let the guest run `after_ms` past RESUME (or past now, if RESUME is not known yet) while sampled."""
        if self.sampler is None:
            return
        until = (resume_ns or time.monotonic_ns()) + int(self.after_ms * 1e6)
        while (left := until - time.monotonic_ns()) > 0:
            time.sleep(min(left / 1e9, 0.05))

    def finish(self, timeline: Sequence[TimelineRow]) -> tuple[list[ProgressRow], PostResume]:
        """Stop sampling and build the series and post_resume from it and the migration's timeline."""
        if self.sampler is None:
            return [], PostResume(note="progress not recorded (Lab(progress=False))")
        self.sampler.stop()
        stop_ms = _first(timeline, "source", "STOP")
        resume_ms = _first(timeline, "destination", "RESUME")
        migrate_ms = next((r.t_ms for r in timeline if r.kind == "qmp" and r.detail == "migrate"), None)
        phases = [r.t_ms for r in timeline if r.side == "lab" and r.kind == "phase"]
        alone_until = phases[1] if len(phases) > 1 else None  # the source ran alone until the second phase
        src, dst = self.sampler.side("source"), self.sampler.side("destination")
        resume_ns = None if resume_ms is None else self.t0_ns + int(resume_ms * 1e6)
        dst_sides = [dst] if dst is not None else []
        if src is not None and dst is not None and src.pid == dst.pid:
            dst_sides = [src, dst]  # cpr-exec: one process, seen from its start; its RAM is the same memfd
        dst_samples = sorted((t, v) for d in dst_sides for t, v in zip(d.t_ns, d.value, strict=True))
        rows = stitch(
            (list(src.t_ns), list(src.value)) if src else None,
            ([t for t, _ in dst_samples], [v for _, v in dst_samples]) if dst_samples else None,
            resume_ns,
            self.t0_ns,
        )
        stat = sorted(
            ((t - self.t0_ns) / 1e6, mn, mj)
            for d in dst_sides
            for t, mn, mj in zip(d.stat_t_ns, d.minflt, d.majflt, strict=True)
        )
        hz = [h for h in (sample_rate_hz(list(s.t_ns)) for s in (src, dst) if s is not None) if h]
        return rows, post_resume(
            rows,
            migrate_ms=migrate_ms,
            stop_ms=stop_ms,
            resume_ms=resume_ms,
            window_ms=self.after_ms,
            first_pass_bytes=self.first_pass_bytes,
            steady_until_ms=alone_until,
            dst_stat=stat,
            sample_hz=min(hz) if hz else None,
        )

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()


def _first(timeline: Sequence[TimelineRow], side: str, event: str) -> float | None:
    return next((r.t_ms for r in timeline if r.side == side and r.kind == event), None)
