"""What the Lab reads from both VMs once a migration has ended, and the Result it builds from that.

Each step is one small function: the source's record (read live, or kept from before it quit or exec'd), the
status, the times and bytes, the pause as the events show it, the timeline, the run states, the mappings and
the guest's own check. `collect(lab)` runs them in that order.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from labkit.host.machine import Machine
from labkit.host.procfs import page_frames, read_maps
from labkit.host.qmp_sync import QMPCommandError, QMPTimeout
from labkit.host.runners.base import Runner
from labkit.lab.breakdown import pause_breakdown
from labkit.lab.progress import MigrationDetails, MigrationInfo
from labkit.lab.report import MappingRow, Result, TimelineRow

if TYPE_CHECKING:
    from labkit.lab.engine import Lab

_QMP_GONE = (QMPCommandError, QMPTimeout, ConnectionError)


# -- reading one VM ----------------------------------------------------------------------------------------
def events_of(runner: Runner, m: Machine | None) -> list[dict[str, Any]]:
    """The VM's events on the host's clock; what this client saw (without times) if the VM cannot say."""
    if m is None or not m.alive() or not m.qmp.connected:
        return []
    try:
        return runner.events(m)
    except _QMP_GONE:
        return [{**e, "monotonic-ns": None} for e in m.events]


def checkpoints_of(runner: Runner, m: Machine | None) -> list[dict[str, Any]]:
    """The VM's trace points (QEMU's trace log, or the emulator's record); none if unreadable."""
    if m is None or not m.alive():
        return []
    try:
        return runner.checkpoints(m)
    except (*_QMP_GONE, OSError):
        return []


def details_of(runner: Runner, m: Machine | None) -> dict[str, Any]:
    """What the VM knows beyond query-migrate; {} on real QEMU, or when the VM cannot be asked."""
    if not runner.has_migration_details or m is None or not m.alive() or not m.qmp.connected:
        return {}
    with contextlib.suppress(*_QMP_GONE):
        return runner.migration_details(m)
    return {}


def block_mappings(runner: Runner, side: str, m: Machine | None) -> list[MappingRow]:
    """Where each RAM block of `m` is mapped, with the page frames at four points of it."""
    if m is None or not m.alive():
        return []
    try:
        blocks = runner.ram_blocks(m) if m.qmp.connected else []
        maps = read_maps(m.pid)
    except (*_QMP_GONE, OSError):  # it exited meanwhile
        return []
    rows = []
    for b in blocks:
        for mp in maps:
            if mp.start == b["host-addr"]:
                frames = page_frames(m.pid, [mp.start + i * (mp.size // 4) for i in range(4)])
                row = MappingRow(side, b["name"], mp.start, mp.end, mp.size, mp.inode, mp.path, mp.offset, frames)
                rows.append(row)
    return rows


@dataclass
class SourceRecord:
    """What the lab knows of the source: read live, or kept from before it quit (cpr-reboot) or exec'd into
    the destination (cpr-exec), when it can no longer be asked."""

    query_migrate: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)  # x-labkit-query-migrate, where the runner has it
    events: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    runstate: str = "(exited)"
    mappings: list[MappingRow] = field(default_factory=list)


def read_source(runner: Runner, m: Machine) -> SourceRecord:
    """Everything the Result needs of a live source, read now."""
    return SourceRecord(
        query_migrate=m.cmd("query-migrate", timeout=10) if m.qmp.connected else {},
        details=details_of(runner, m),
        events=events_of(runner, m),
        checkpoints=checkpoints_of(runner, m),
        runstate=m.cmd("query-status", timeout=10)["status"],
        mappings=block_mappings(runner, "source", m),
    )


# -- the steps of collect() ---------------------------------------------------------------------------------
def _status(error: str | None, info: MigrationInfo) -> str:
    """The migration's status; an error the lab saw makes it failed, whatever the source last said."""
    if error and info.status in ("none", "setup", "completed"):
        return "failed"
    return info.status if info.raw.get("status") else "failed"


def _times_and_bytes(res: Result, info: MigrationInfo, details: MigrationDetails | None, mode: str) -> None:
    """QEMU's times, the bytes per channel and per pass, and the pre-copy rates."""
    ram = info.stats
    res.query_migrate = info.raw
    res.total_ms, res.setup_ms = info.total_time, info.setup_time
    res.pause_ms["reported"] = info.downtime
    res.passes = ram.dirty_sync_count
    res.throughput_mbps = ram.mbps
    # ram.transferred counts the whole main stream on both backends (QEMU's migration_transferred_bytes);
    # only the emulator counts its cpr channel's bytes, and only it answers after a failure
    res.bytes = {
        "main": details.bytes_main if details else ram.transferred,
        "cpr": None if mode == "cpr-exec" or details is None else details.bytes_cpr,
    }  # cpr-exec has no cpr channel: the state went into a memfd that the exec kept open
    res.pages_per_pass = list(details.pages_per_pass) if details else []
    live_ms = info.live_ms or 0
    if mode == "normal" and ram.precopy_bytes and live_ms > 0:
        res.precopy_bytes_per_s = round(ram.precopy_bytes / (live_ms / 1000), 1)
    if mode == "normal" and details and details.bytes_per_pass and details.seconds_per_pass:
        if details.seconds_per_pass[0] > 0:
            res.first_pass_bytes_per_s = round(details.bytes_per_pass[0] / details.seconds_per_pass[0], 1)


def _pause_from_events(res: Result, src_events: list[dict[str, Any]], dst_events: list[dict[str, Any]], has_dst: bool) -> None:
    """STOP on the source to RESUME on the destination, on the host's CLOCK_MONOTONIC."""
    stop = next((e for e in src_events if e.get("event") == "STOP"), None)
    resume = next((e for e in dst_events if e.get("event") == "RESUME"), None)
    if stop and resume and stop.get("monotonic-ns") and resume.get("monotonic-ns"):
        res.pause_ms["events"] = round((resume["monotonic-ns"] - stop["monotonic-ns"]) / 1e6, 3)
    elif stop and not resume and has_dst and res.status == "completed":
        res.notes.append("no RESUME seen: the destination resumed before the lab connected to its monitor "
                         "(start it with -incoming defer, --defer, so the lab connects first)")


def _timeline(lab: Lab, res: Result, src: SourceRecord, dst_events: list[dict[str, Any]]) -> None:
    """Both sides' events and trace points and the lab's own marks, in time order, from the lab's start."""

    def row(ns: int, side: str, kind: str, detail: str) -> TimelineRow:
        return TimelineRow(round((ns - lab.t0) / 1e6, 3), side, kind, detail)

    for side, evs in (("source", src.events), ("destination", dst_events)):
        for e in evs:
            if e.get("monotonic-ns") is not None:
                data = e.get("data", {})
                detail = data.get("status") or str(data.get("pass", "")) or ""
                res.timeline.append(row(e["monotonic-ns"], side, e["event"], detail))
    dst_marks = checkpoints_of(lab.runner, lab.dst)
    for side, marks in (("source", src.checkpoints), ("destination", dst_marks)):
        for c in marks:
            detail = c["name"] if c["kind"] == "checkpoint" else f"{c['name']} {c['detail']}".rstrip()
            res.timeline.append(row(c["monotonic-ns"], side, c["kind"], detail))
    res.timeline += lab.marks
    res.timeline.sort(key=lambda r: r.t_ms)
    res.pause_breakdown = pause_breakdown(res.timeline)


def _destination_state(dst: Machine | None) -> str:
    if dst is None or dst.proc is None:
        return "(not started)"
    if dst.alive() and dst.qmp.connected:
        with contextlib.suppress(*_QMP_GONE):  # a destination whose migration failed exits as QEMU's does
            state: str = dst.cmd("query-status", timeout=10)["status"]
            return state
    return "(no monitor yet)" if dst.alive() else "(exited)"


def _check_guest(lab: Lab, res: Result, dst_ok: bool, src_alive: bool) -> None:
    """The guest's own figures: its longest heartbeat gap and its memory check, on the destination after a
    completed migration; on the source after a failed one (it must still hold the guest intact)."""
    if dst_ok and lab.dst is not None:
        res.mappings += block_mappings(lab.runner, "destination", lab.dst)
        if res.status == "completed":
            time.sleep(0.01)  # let the guest beat at least once after resuming
            stats = lab.runner.guest_stats(lab.dst)
            gap = stats.get("max-gap-ns")
            res.pause_ms["guest"] = None if gap is None else round(gap / 1e6, 3)
            if gap is None:
                res.notes.append(f"guest pause unavailable: {stats.get('max-gap-why', 'unknown')}")
            res.verify = lab.runner.verify(lab.dst)
            res.guest_verified = bool(res.verify.get("ok"))
    if not res.guest_verified and src_alive and res.status != "completed" and lab.src is not None:
        res.verify = lab.runner.verify(lab.src)
        res.guest_verified = bool(res.verify.get("ok"))


def collect(lab: Lab) -> Result:
    """The Result of the migration `lab` ran, read from both VMs (and what was kept of a source that left)."""
    s = lab.scenario
    if lab.error is None:
        lab.recorder.wait_after(None)  # the guest runs on, sampled, for progress_after_ms after RESUME
    res = Result(backend=s.backend, mode=s.mode, ram_bytes=s.ram, status="", dirty_rate=s.dirty_rate)
    res.scenario = s
    res.host = lab.host
    res.error = lab.error
    src_alive = lab.src is not None and lab.src.alive() and not lab.exec_done
    src = read_source(lab.runner, lab.src) if src_alive and lab.src is not None else lab.src_record
    info = MigrationInfo.from_qmp(src.query_migrate)
    res.status = _status(lab.error, info)
    _times_and_bytes(res, info, MigrationDetails.from_qmp(src.details), s.mode)
    dst_events = events_of(lab.runner, lab.dst)
    _pause_from_events(res, src.events, dst_events, lab.dst is not None)
    res.pids = {side: m.pid if m is not None and m.proc is not None else None
                for side, m in (("source", lab.src), ("destination", lab.dst))}  # fmt: skip
    _timeline(lab, res, src, dst_events)
    res.states["source"] = src.runstate
    res.states["destination"] = _destination_state(lab.dst)
    res.mappings = list(src.mappings)
    dst_ok = lab.dst is not None and lab.dst.proc is not None and lab.dst.alive() and lab.dst.qmp.connected
    _check_guest(lab, res, dst_ok, src_alive)
    res.progress, post = lab.recorder.finish(res.timeline)
    res.post_resume = post.to_dict()
    return res
