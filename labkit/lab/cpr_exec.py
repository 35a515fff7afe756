"""The Lab's phases for cpr-exec (QEMU 10.2): one process, two programs, the exec between them.

The source saves device state to a file and exec's the destination's command line in place: the same PID, a
new program, a new monitor socket. The Lab gives the new program a Machine of its own that adopts the process
(Machine.adopt), connects to the new monitor, and reads the old program's figures from the new one
(x-labkit-query-migrate's "pre-exec" record), since nothing of the old program survives the exec but the fds
it kept open.

Where the emulator can hold while stepping: after the save, before the exec (the source's `cpr-exec` hold
point); after the new program has mapped RAM (it starts with `-incoming defer` and waits for
`migrate-incoming`); before resume (the destination's `loaded` hold point).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from labkit.host.machine import Machine
from labkit.host.qmp_sync import QMPCommandError, QMPTimeout
from labkit.host.runners.qemu import QEMU_CPR_EXEC_VERSION, qemu_cpr_exec_refusal
from labkit.lab.collect import SourceRecord
from labkit.lab.phase import Phase

if TYPE_CHECKING:
    from labkit.lab.engine import Lab

__all__ = ["PHASES", "QEMU_CPR_EXEC_VERSION", "qemu_cpr_exec_refusal"]


def _incoming(lab: Lab) -> str:
    """The new program loads from the file at once, or waits (defer) so that a step can look at it first."""
    return "defer" if (lab.defer or lab.stepping) else f"file:{lab.file_path}"


def _source_status(lab: Lab, src: Machine) -> str | None:
    """The old program's last migration status: from its MIGRATION events, else asked (None once gone)."""
    if lab.scenario.events:
        seen = [
            ev["data"]["status"]
            for ev in src.events[lab.events_from :]
            if ev.get("event") == "MIGRATION" and "status" in ev.get("data", {})
        ]
        return seen[-1] if seen else None
    try:
        return lab.progress(src).status
    except Exception:  # noqa: BLE001 - the monitor went away with the exec: no status to read
        return None


def _exec_failed(lab: Lab, src: Machine) -> bool:
    """execvp returned in the old program: it reports `failed` after `completed` and resumes the guest."""
    return src.qmp.connected and _source_status(lab, src) == "failed"


def migrate_cpr_exec(lab: Lab) -> None:
    """cpr-exec-command is the destination's own command line; then migrate to a file and wait for it."""
    src = lab.src
    if lab.error is not None or src is None:
        return
    lab.hold(src, "cpr-exec")
    lab.src_record.mappings = lab.block_mappings("source", src)  # the old program's addresses, for later
    dst = lab.dst = Machine(lab.dest_config(_incoming(lab), holds=("loaded",)), lab.runner)
    try:
        src.cmd("migrate-set-parameters", {"cpr-exec-command": dst.argv})
    except QMPCommandError as e:
        lab.failed(str(e))
        return
    if not lab.start_migration({"uri": f"file:{lab.file_path}"}):
        return
    # Not wait_status: the old program may exec (and its monitor vanish) right after `completed`.
    lab.wait_for(
        lambda: os.path.exists(dst.qmp_path) or _source_status(lab, src) in ("completed", "failed"),
        "the source to save its state",
        src,
    )
    if _source_status(lab, src) == "failed" and not os.path.exists(dst.qmp_path):
        lab.failed(lab.progress(src).error_desc or "migration failed")
        return
    lab.wait_held(src, "cpr-exec")


def exec_new_program(lab: Lab) -> None:
    src, dst = lab.src, lab.dst
    if lab.error is not None or dst is None or src is None:
        return
    if lab.stepping:
        # what the old program holds before the exec: its memfds and QEMU_CPR_EXEC_STATE
        lab.continue_(src, "cpr-exec")
    lab.wait_for(lambda: os.path.exists(dst.qmp_path) or _exec_failed(lab, src), "the new program's monitor", src)
    if _exec_failed(lab, src):
        lab.failed(lab.progress(src).error_desc or "cpr-exec failed")
        lab.dst = None
        return
    dst.adopt(src)
    lab.recorder.attach("destination", dst)  # the same process: its RAM, read from RESUME on
    src.qmp.close()  # the old program's monitor went away with it
    lab.exec_done = True
    lab.mark("lab", "process", f"the new program's monitor is up (same pid {src.pid})")
    try:
        dst.connect(lab.timeout)
    except (QMPTimeout, ConnectionError) as e:
        lab.failed(f"destination monitor: {e}")
        return
    record: dict[str, Any] = lab.runner.migration_details(dst).get("pre-exec") or {}
    lab.pre_exec = record
    lab.src_record = SourceRecord(
        query_migrate=record.get("query-migrate", {}),
        details=record.get("x-labkit-query-migrate", {}),
        events=record.get("events", []),
        checkpoints=[{**c, "kind": "checkpoint", "detail": ""} for c in record.get("checkpoints", [])],
        runstate=record.get("runstate", "(exec'd)"),
        mappings=lab.src_record.mappings,
    )


def load_after_exec(lab: Lab) -> None:
    dst = lab.dst
    if lab.error is not None or dst is None:
        return
    if _incoming(lab) == "defer":
        lab.set_capability(dst, "events", lab.scenario.events)
        dst.cmd("migrate-incoming", {"uri": f"file:{lab.file_path}"})
    if lab.stepping:
        lab.wait_held(dst, "loaded")
    else:
        lab.wait_for(lab.dst_done, "the new program to load and resume", dst)


def wait_resumed_after_exec(lab: Lab) -> None:
    dst = lab.dst
    if lab.error is not None or dst is None:
        return
    lab.continue_(dst, "loaded")
    lab.wait_for(lab.dst_done, "the new program to resume", dst)


PHASES = (
    Phase("save", "source stopped, device state saved to a file", migrate_cpr_exec),
    Phase("exec", "exec: same PID, new program, guest RAM mapped", exec_new_program),
    Phase("load", "device state loaded", load_after_exec),
    Phase("resume", "destination running in the same process", wait_resumed_after_exec),
)
