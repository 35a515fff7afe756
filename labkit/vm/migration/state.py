"""QEMU's MigrationState and MigrationIncomingState (migration.h): what every phase of a migration reads and
writes, and the steps the phases share (status and its events, checkpoints, holds, failing, cancelling).

Below the phases (cpr_transfer.py, cpr_exec.py, precopy.py) and the QMP commands (migration.py) so that none
of them imports another: each phase is a mixin over this base, and migration.MigrationState joins them. The
few calls from one phase into another go through the abstract methods declared here.
"""

from __future__ import annotations

import abc
import contextlib
import io
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from labkit.vm import runstate as rs
from labkit.vm.migration.channels import MigrationChannel
from labkit.vm.migration.interface import CprIncomingState, MigrationVM
from labkit.vm.migration.qapi import ACTIVE, CAPABILITIES, MigMode, MigrationStatus
from labkit.vm.migration.qemu_file import QEMUFileOut
from labkit.vm.migration.ram import BUFFER_DELAY, MigrationCancelled, RAMStats, RateLimiter

DEFAULT_DOWNTIME_LIMIT = 300  # ms (DEFAULT_MIGRATE_SET_DOWNTIME)
MAX_THROTTLE = 128 << 20  # bytes/s, QEMU's default max-bandwidth


@dataclass
class MigrationCounters:
    """migration_update_counters(): the bandwidth of the main channel, measured over each window of at
    least BUFFER_DELAY (100 ms) from the start of iterating; 0 until the first window has closed, and
    with it QEMU's threshold_size (bandwidth x downtime-limit)."""

    window_start: float
    window_bytes: int = 0
    bandwidth: float = 0.0  # bytes/s over the last closed window

    def account(self, nbytes: int, now: float) -> None:
        self.window_bytes += nbytes
        elapsed = now - self.window_start
        if elapsed >= BUFFER_DELAY:
            self.bandwidth = self.window_bytes / elapsed
            self.window_start, self.window_bytes = now, 0


def ms_between(t0: float | None, t1: float | None) -> int:
    """Whole milliseconds from t0 to t1 (monotonic seconds), 0 while either is unknown."""
    return int(round((t1 - t0) * 1000)) if t0 is not None and t1 is not None else 0


class MigrationStateBase(abc.ABC):
    """One VM's migration state (QEMU's MigrationState for outgoing, MigrationIncomingState for incoming)."""

    def __init__(self, vm: MigrationVM):
        self.vm = vm
        self.params: dict[str, Any] = {
            "mode": "normal",
            "downtime-limit": DEFAULT_DOWNTIME_LIMIT,
            "max-bandwidth": MAX_THROTTLE,
            "cpr-exec-command": [],  # QEMU 10.2: the new program and its arguments, for mode cpr-exec
        }
        self.caps: dict[str, bool] = dict.fromkeys(CAPABILITIES, False)
        self.exit_status = 0
        self._lock = threading.Lock()
        self._reset_outgoing()
        # incoming
        self.incoming_mode: MigMode | None = None  # "cpr-transfer" once CPR state was loaded (cpr_set_incoming_mode)
        self.cpr_in: socket.socket | CprIncomingState | None = None
        self.incoming_status: MigrationStatus = "none"
        self.incoming_started = False
        self.incoming_error: str | None = None
        self.incoming_stats: dict[str, int] = {}
        self.incoming_socket_address: list[dict[str, Any]] = []  # mis->socket_address_list
        self.incoming_exit_on_error = True
        self._incoming_listener: socket.socket | None = None
        self._incoming_conn: socket.socket | None = None  # shut down on quit so a blocked load wakes up
        self._threads: list[threading.Thread] = []
        self.checkpoints: list[tuple[str, int]] = []
        self.pre_exec: dict[str, Any] | None = None  # cpr-exec: the old program's record, reported by the new one
        self.cpr_exec_state_bytes = 0
        self.holds: set[str] = set(vm.opts.holds)
        self.held_at: str | None = None
        self._hold_cv = threading.Condition()
        self._closing = False

    def _reset_outgoing(self) -> None:
        self.status: MigrationStatus = "none"
        self.error_desc: str | None = None
        self.stats = RAMStats()
        self.t_start: float | None = None
        self.t_active: float | None = None
        self.t_stop: float | None = None
        self.t_end: float | None = None
        self.expected_downtime = 0
        self.bytes_main = 0
        self.bytes_cpr = 0
        self.cpr_out: socket.socket | None = None
        self.cancelled = threading.Event()
        self.continue_event = threading.Event()
        self.vm_was_running = False
        self.main_channel: MigrationChannel | None = None
        self._out: QEMUFileOut | None = None
        # the main channel, so that cancel can shut it down under a blocked write
        self._sink: socket.socket | io.RawIOBase | None = None
        self._limiter: RateLimiter | None = None  # max-bandwidth on the main channel, changeable mid-way
        self.counters = MigrationCounters(time.monotonic())

    # -- what one phase asks of another ---------------------------------------------------------------------
    @abc.abstractmethod
    def qmp_migrate_finish(self) -> None:
        """Start the migration thread (migration.py)."""

    @abc.abstractmethod
    def migration_thread(self) -> None:
        """The source's main channel: connect, pre-copy, stop-and-copy (precopy.py)."""

    @abc.abstractmethod
    def cpr_state_close(self) -> None:
        """Close the destination's cpr channel or state, the source's cue to connect main (cpr_transfer.py)."""

    @abc.abstractmethod
    def close_cpr_out(self) -> None:
        """Close the source's end of the cpr channel and stop watching it (cpr_transfer.py)."""

    @abc.abstractmethod
    def qmp_query_migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        """query-migrate (migration.py)."""

    @abc.abstractmethod
    def qmp_labkit_query_migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        """x-labkit-query-migrate (migration.py)."""

    # -- status -----------------------------------------------------------------------------------------------
    def mode(self) -> MigMode:
        """migrate_mode(): the incoming mode while a CPR incoming is pending, else the parameter."""
        mode: MigMode = self.incoming_mode or self.params["mode"]
        return mode

    def active(self) -> bool:
        return self.status in ACTIVE

    def _set_status(self, new: MigrationStatus) -> None:
        self.status = new
        if self.caps["events"]:
            self.vm.emit("MIGRATION", {"status": new})

    def _set_incoming_status(self, new: MigrationStatus) -> None:
        self.incoming_status = new
        if self.caps["events"]:
            self.vm.emit("MIGRATION", {"status": new})

    def _pass_event(self) -> None:
        if self.caps["events"]:
            self.vm.emit("MIGRATION_PASS", {"pass": self.stats.dirty_sync_count})

    def _blockers(self) -> list[str]:
        """migration_blockers[mode]: CPR needs every block shared and backed by an fd."""
        if self.mode() not in ("cpr-transfer", "cpr-exec"):
            return []  # labkit also blocks cpr-exec, where QEMU 10.2 registers these for cpr-transfer only
        return self.vm.ram.cpr_blockers()

    # -- checkpoints --------------------------------------------------------------------------------------
    def checkpoint(self, name: str) -> None:
        """QEMU's trace points, at the places QEMU 10.0.2 fires them, kept on CLOCK_MONOTONIC for the lab's
        timeline: vmstate_downtime_checkpoint's names ("src-vm-stopped", ...), the main channel's
        migration_socket_outgoing_connected / _incoming_accepted, and labkit's own, named "labkit-..."."""
        self.checkpoints.append((name, time.monotonic_ns()))

    def checkpoint_list(self) -> list[dict[str, Any]]:
        """x-labkit-checkpoints: every checkpoint so far, oldest first."""
        return [{"name": n, "monotonic-ns": t} for n, t in self.checkpoints]

    # -- hold points (lab extension) ----------------------------------------------------------------------
    def hold(self, point: str) -> None:
        """Wait at a named point until x-labkit-continue (or cancel, or quit), if asked to hold there."""
        if point not in self.holds:
            return
        with self._hold_cv:
            self.held_at = point
            while self.held_at == point and not self.cancelled.is_set() and not self._closing:
                self._hold_cv.wait(0.1)
            if self.held_at == point:
                self.held_at = None
        if self.cancelled.is_set() and point != "loaded":
            raise MigrationCancelled()

    # -- source: failing and cancelling -------------------------------------------------------------------
    def _fail(self, message: str) -> None:
        """migration_connect_set_error() / migration_iteration_finish(): failed, and the guest runs again."""
        self.error_desc = message
        self.t_end = time.monotonic()
        self._set_status("failed")
        self._restart_guest()

    def _restart_guest(self) -> None:
        if self.vm.runstate.state == rs.FINISH_MIGRATE:
            if self.vm_was_running:
                self.vm.vm_start()
            else:
                self.vm.runstate.set(rs.PAUSED)

    def _cancelled(self) -> None:
        """migration_iteration_finish() restarts a guest it stopped (RESUME), then the cleanup bottom half
        announces `cancelled` and reports an error the completion recorded (migrate_fd_cleanup())."""
        self.t_end = time.monotonic()
        self._restart_guest()
        self._set_status("cancelled")
        if self.error_desc:
            print(f"labkit-vm: {self.error_desc}", file=sys.stderr, flush=True)  # error_report_err()

    def _shutdown_sink(self) -> None:
        """migration_cancel() -> qemu_file_shutdown(): wake a write blocked on a peer that stopped reading."""
        sink = self._sink
        if isinstance(sink, socket.socket):
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_RDWR)
