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
from typing import TYPE_CHECKING

from labkit.host.machine import Machine
from labkit.host.qmp_sync import QMPCommandError, QMPTimeout
from labkit.lab.collect import SourceRecord
from labkit.lab.phase import Phase

if TYPE_CHECKING:
    from labkit.lab.engine import Lab

QEMU_CPR_EXEC_VERSION = (10, 2, 0)


def qemu_cpr_exec_refusal() -> str | None:
    """Why real QEMU here cannot run cpr-exec (one line naming the version needed), or None."""
    from labkit.host.runners.qemu_guest import qemu_binary, qemu_version

    binary = qemu_binary()
    version = qemu_version(binary) if binary else None
    if version is None or version < QEMU_CPR_EXEC_VERSION:
        have = "not installed" if binary is None else f"{binary} is version {'.'.join(map(str, version or ()))}"
        return f"cpr-exec needs QEMU 10.2 or later ({have})"
    return "cpr-exec on the qemu backend is not implemented: labkit follows QEMU 10.2's source in the emulator"


class CprExecPhases:
    """Mixed into Lab: the cpr-exec phases after "source running" (PHASES, at the end of this module)."""

    def _cpr_exec_incoming(self: Lab) -> str:
        """The new program loads from the file at once, or waits (defer) so that a step can look at it first."""
        return "defer" if (self.defer or self.stepping) else f"file:{self.file_path}"

    def _migrate_cpr_exec(self: Lab) -> None:
        """cpr-exec-command is the destination's own command line; then migrate to a file and wait for it."""
        if self.error is not None:
            return
        self._hold(self.src, "cpr-exec")
        self.src_record.mappings = self._block_mappings("source", self.src)  # the old program's, for later
        self.dst = Machine(self._dest_config(self._cpr_exec_incoming(), holds=("loaded",)), self.runner)
        try:
            self.src.cmd("migrate-set-parameters", {"cpr-exec-command": self.dst.argv})
        except QMPCommandError as e:
            self._failed(str(e))
            return
        if not self._migrate({"uri": f"file:{self.file_path}"}):
            return
        # Not _wait_status: the old program may exec (and its monitor vanish) right after `completed`.
        self._wait_for(
            lambda: os.path.exists(self.dst.qmp_path) or self._source_status() in ("completed", "failed"),
            "the source to save its state",
            self.src,
        )
        if self._source_status() == "failed" and not os.path.exists(self.dst.qmp_path):
            self._failed(self._progress(self.src).error_desc or "migration failed")
            return
        self._wait_held(self.src, "cpr-exec")

    def _source_status(self: Lab) -> str | None:
        """The old program's last migration status: from its MIGRATION events, else asked (None once gone)."""
        if self.scenario.events:
            seen = [
                ev["data"]["status"]
                for ev in self.src.events[self._events_from :]
                if ev.get("event") == "MIGRATION" and "status" in ev.get("data", {})
            ]
            return seen[-1] if seen else None
        try:
            return self._progress(self.src).status
        except Exception:  # noqa: BLE001 - the monitor went away with the exec: no status to read
            return None

    def _exec_failed(self: Lab) -> bool:
        """execvp returned in the old program: it reports `failed` after `completed` and resumes the guest."""
        return self.src.qmp.connected and self._source_status() == "failed"

    def _exec_new_program(self: Lab) -> None:
        if self.error is not None or self.dst is None:
            return
        if self.stepping:
            # what the old program holds before the exec: its memfds and QEMU_CPR_EXEC_STATE
            self._continue(self.src, "cpr-exec")
        self._wait_for(
            lambda: os.path.exists(self.dst.qmp_path) or self._exec_failed(),
            "the new program's monitor",
            self.src,
        )
        if self._exec_failed():
            self._failed(self._progress(self.src).error_desc or "cpr-exec failed")
            self.dst = None
            return
        self.dst.adopt(self.src)
        self.src.qmp.close()  # the old program's monitor went away with it
        self.exec_done = True
        self.mark("lab", "process", f"the new program's monitor is up (same pid {self.src.pid})")
        try:
            self.dst.connect(self.timeout)
        except (QMPTimeout, ConnectionError) as e:
            self._failed(f"destination monitor: {e}")
            return
        record = self.runner.migration_details(self.dst).get("pre-exec") or {}
        self.pre_exec = record
        self.src_record = SourceRecord(
            query_migrate=record.get("query-migrate", {}),
            details=record.get("x-labkit-query-migrate", {}),
            events=record.get("events", []),
            checkpoints=[{**c, "kind": "checkpoint", "detail": ""} for c in record.get("checkpoints", [])],
            runstate=record.get("runstate", "(exec'd)"),
            mappings=self.src_record.mappings,
        )

    def _load_after_exec(self: Lab) -> None:
        if self.error is not None or self.dst is None:
            return
        if self._cpr_exec_incoming() == "defer":
            self._set_capability(self.dst, "events", self.scenario.events)
            self.dst.cmd("migrate-incoming", {"uri": f"file:{self.file_path}"})
        if self.stepping:
            self._wait_held(self.dst, "loaded")
        else:
            self._wait_for(self._dst_done, "the new program to load and resume", self.dst)

    def _wait_resumed_after_exec(self: Lab) -> None:
        if self.error is not None or self.dst is None:
            return
        self._continue(self.dst, "loaded")
        self._wait_for(self._dst_done, "the new program to resume", self.dst)


PHASES = (
    Phase("save", "source stopped, device state saved to a file", CprExecPhases._migrate_cpr_exec),
    Phase("exec", "exec: same PID, new program, guest RAM mapped", CprExecPhases._exec_new_program),
    Phase("load", "device state loaded", CprExecPhases._load_after_exec),
    Phase("resume", "destination running in the same process", CprExecPhases._wait_resumed_after_exec),
)
