"""Migration's state machine, on both sides (QEMU's migration/migration.c), as QEMU 10 runs it.

Source, in the order QEMU 10.0.2 showed here (events capability on):

    normal        setup, PASS 1, active, PASS 2..n (one per pass), STOP, device, PASS n+1, completed
    cpr-reboot    setup, STOP, PASS 1, active, device, PASS 2, completed      (main channel is a file)
    cpr-transfer  setup, [CPR state sent over the cpr channel; `migrate` returns; guest still runs;
                  wait for the destination to hang up the cpr channel], STOP, PASS 1, active, device, PASS 2,
                  completed; no RAM pages at all, every block is ignored in this mode

Destination: setup, active, RESUME (if the source was running and there is no -S), completed.

qmp_migrate() is split in two as in QEMU 10: start (checks, CPR state save, arm the hang-up watch) and finish
(connect main, then the migration thread). One phase lives in one method, source and destination side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING

from labkit.vm import runstate as rs
from labkit.vm.memory import populate
from labkit.vm.migration import cpr_exec
from labkit.vm.migration.channels import (
    MigrationChannel,
    migration_connect,
    migration_listen,
    open_incoming_file,
    parse_channels,
    parse_incoming_option,
    parse_uri,
)
from labkit.vm.migration.cpr import CprError, CprFd, cpr_state_save, cpr_transfer_output
from labkit.vm.migration.ram import (
    MigrationCancelled,
    RAMState,
    RAMStats,
    RateLimiter,
    migrate_ram_is_ignored,
)
from labkit.vm.migration.stream import (
    QEMUFileIn,
    QEMUFileOut,
    StreamError,
    qemu_loadvm_state,
    qemu_save_device_state,
    qemu_savevm_state_end,
    qemu_savevm_state_header,
    ram_save_iterate_end,
    ram_save_setup,
)
from labkit.vm.monitor import QMPError

if TYPE_CHECKING:
    from labkit.vm.monitor import Monitor
    from labkit.vm.vm import VM

MIG_MODES = ("normal", "cpr-reboot", "cpr-transfer", "cpr-exec")
DEFAULT_DOWNTIME_LIMIT = 300  # ms (DEFAULT_MIGRATE_SET_DOWNTIME)
MAX_THROTTLE = 128 << 20  # bytes/s, QEMU's default max-bandwidth
CAPABILITIES = (
    "events",
    "pause-before-switchover",
    "x-ignore-shared",
    "postcopy-ram",
    "background-snapshot",
    "x-colo",
    "return-path",
    "multifd",
    "zero-copy-send",
)
ACTIVE = ("setup", "active", "device", "pre-switchover", "cancelling")
# Where a migration can be held so a learner can look at both processes mid-way (x-labkit, generalising
# QEMU's pause-before-switchover + migrate-continue to named points). Each waits for x-labkit-continue.
HOLD_POINTS = {
    "cpr-load": "destination: CPR state is in its socket, not yet read (no monitor yet: continue with SIGUSR1)",
    "cpr-hup": "source: the destination hung up the cpr channel; the main channel is not connected yet",
    "switchover": "source: pre-copy converged; the guest is about to stop for stop-and-copy",
    "main-connected": "source: main channel connected (CPR modes: guest stopped); nothing sent on it yet",
    "loaded": "destination: the whole stream is loaded; the guest is about to resume",
    "cpr-exec": "source: device state saved, migration completed; the old program is about to exec the new one",
}
CPR_INCOMPATIBLE = {
    "postcopy-ram": "postcopy",
    "background-snapshot": "background snapshot",
    "x-colo": "COLO",
}


def _ms(t0: float | None, t1: float | None) -> int:
    return int(round((t1 - t0) * 1000)) if t0 is not None and t1 is not None else 0


class MigrationState:
    """One VM's migration state (QEMU's MigrationState for outgoing, MigrationIncomingState for incoming)."""

    def __init__(self, vm: VM):
        self.vm = vm
        self.params = {
            "mode": "normal",
            "downtime-limit": DEFAULT_DOWNTIME_LIMIT,
            "max-bandwidth": MAX_THROTTLE,
            "cpr-exec-command": [],  # QEMU 10.2: the new program and its arguments, for mode cpr-exec
        }
        self.caps = dict.fromkeys(CAPABILITIES, False)
        self.exit_status = 0
        self._lock = threading.Lock()
        self._reset_outgoing()
        # incoming
        self.incoming_mode: str | None = (
            None  # "cpr-transfer" once CPR state was loaded (cpr_set_incoming_mode)
        )
        self.cpr_in: socket.socket | cpr_exec.CprExecState | None = None
        self.incoming_status = "none"
        self.incoming_started = False
        self.incoming_error: str | None = None
        self.incoming_stats: dict = {}
        self._incoming_listener: socket.socket | None = None
        self._incoming_conn: socket.socket | None = None  # shut down on quit so a blocked load wakes up
        self._threads: list[threading.Thread] = []
        self.checkpoints: list[tuple[str, int]] = []
        self.pre_exec: dict | None = None  # cpr-exec: the old program's record, reported by the new one
        self.cpr_exec_state_bytes = 0
        self.holds: set[str] = set(vm.opts.holds)
        self.held_at: str | None = None
        self._hold_cv = threading.Condition()
        self._closing = False

    def _reset_outgoing(self) -> None:
        self.status = "none"
        self.error_desc: str | None = None
        self.stats = RAMStats()
        self.t_start = self.t_active = self.t_stop = self.t_end = None
        self.expected_downtime = 0
        self.bytes_main = 0
        self.bytes_cpr = 0
        self.cpr_out: socket.socket | None = None
        self.cancelled = threading.Event()
        self.continue_event = threading.Event()
        self.vm_was_running = False
        self.main_channel: MigrationChannel | None = None
        self._out: QEMUFileOut | None = None
        self._sink = None  # the main channel, so that cancel can shut it down under a blocked write

    # -- QMP ---------------------------------------------------------------------------------------------
    def register_commands(self, m: Monitor) -> None:
        m.register(
            "migrate-set-parameters",
            self.qmp_set_parameters,
            {"*mode": "str", "*downtime-limit": "int", "*max-bandwidth": "int", "*cpr-exec-command": "list"},
        )
        m.register(
            "query-migrate-parameters",
            lambda a: {**self.params, "cpr-exec-command": list(self.params["cpr-exec-command"])},
        )
        m.register("migrate-set-capabilities", self.qmp_set_capabilities, {"capabilities": "list"})
        m.register(
            "query-migrate-capabilities",
            lambda a: [{"capability": k, "state": v} for k, v in self.caps.items()],
        )
        m.register(
            "migrate",
            self.qmp_migrate,
            {"*uri": "str", "*channels": "list", "*detach": "bool", "*resume": "bool"},
        )
        m.register(
            "migrate-incoming",
            self.qmp_migrate_incoming,
            {"*uri": "str", "*channels": "list", "*exit-on-error": "bool"},
        )
        m.register("migrate_cancel", self.qmp_migrate_cancel)
        m.register("migrate-continue", self.qmp_migrate_continue, {"state": "str"})
        m.register("query-migrate", self.qmp_query_migrate)
        m.register("x-labkit-hold", self.qmp_hold, {"*points": "list"})
        m.register("x-labkit-continue", self.qmp_continue, {"*point": "str"})

    # -- hold points (lab extension) ----------------------------------------------------------------------
    def qmp_hold(self, args: dict) -> dict:
        """Set the points to hold at (when "points" is given); answer where we hold now."""
        if "points" in args:
            unknown = [p for p in args["points"] if p not in HOLD_POINTS]
            if unknown:
                raise QMPError(f"unknown hold point '{unknown[0]}' (known: {', '.join(HOLD_POINTS)})")
            self.holds = set(args["points"])
        return {"points": sorted(self.holds), "held-at": self.held_at}

    def qmp_continue(self, args: dict) -> None:
        point = args.get("point", self.held_at)
        with self._hold_cv:
            if self.held_at is None or point != self.held_at:
                raise QMPError(f"Migration is not held at '{point}' (held at: {self.held_at or 'nothing'})")
            self.held_at = None
            self._hold_cv.notify_all()

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

    def qmp_set_parameters(self, args: dict) -> None:
        if self.active():
            raise QMPError("There's a migration process in progress")
        if "mode" in args and args["mode"] not in MIG_MODES:
            raise QMPError(f"Parameter 'mode' does not accept value '{args['mode']}'")
        if "downtime-limit" in args and not 0 <= args["downtime-limit"] <= 2000000:
            raise QMPError("Parameter 'downtime_limit' expects an integer in the range of 0 to 2000 seconds")
        for i, word in enumerate(args.get("cpr-exec-command", [])):
            if not isinstance(word, str):
                raise QMPError(f"Invalid parameter type for 'cpr-exec-command[{i}]', expected: string")
        if "max-bandwidth" in args and args["max-bandwidth"] < 0:
            raise QMPError(
                "Parameter 'max_bandwidth' expects an integer in the range of 0 to 18446744073709551615 bytes/second"
            )
        self.params.update(args)

    def qmp_set_capabilities(self, args: dict) -> None:
        if self.active():
            raise QMPError("There's a migration process in progress")
        new = dict(self.caps)
        for item in args["capabilities"]:
            if not isinstance(item, dict) or not isinstance(item.get("capability"), str):
                raise QMPError("Parameter 'capability' is missing")
            name = item["capability"]
            if name not in self.caps:
                raise QMPError(f"Parameter 'capability' does not accept value '{name}'")
            state = item.get("state")
            if not isinstance(state, bool):
                raise QMPError("Invalid parameter type for 'state', expected: boolean")
            new[name] = state
        self.caps = new

    def mode(self) -> str:
        """migrate_mode(): the incoming mode while a CPR incoming is pending, else the parameter."""
        return self.incoming_mode or self.params["mode"]

    def active(self) -> bool:
        return self.status in ACTIVE

    def _set_status(self, new: str) -> None:
        self.status = new
        if self.caps["events"]:
            self.vm.emit("MIGRATION", {"status": new})

    def _set_incoming_status(self, new: str) -> None:
        self.incoming_status = new
        if self.caps["events"]:
            self.vm.emit("MIGRATION", {"status": new})

    def _blockers(self) -> list[str]:
        """migration_blockers[mode]: CPR needs every block shared and backed by an fd."""
        if self.mode() not in ("cpr-transfer", "cpr-exec"):
            return []  # labkit also blocks cpr-exec, where QEMU 10.2 registers these for cpr-transfer only
        return self.vm.ram.cpr_blockers()

    # -- source: start -----------------------------------------------------------------------------------
    def qmp_migrate(self, args: dict) -> None:
        """qmp_migrate(): parse channels, check, CPR state save; finish now, or on the cpr channel's hang-up."""
        uri, channels = args.get("uri"), args.get("channels")
        if (uri is None) == (channels is None):
            raise QMPError("need either 'uri' or 'channels' argument")
        try:
            if channels is not None:
                parsed = parse_channels(channels)
            else:
                parsed = {"main": parse_uri(uri)}
        except ValueError as e:
            raise QMPError(str(e)) from None
        main, cpr = parsed.get("main"), parsed.get("cpr")
        if main is None:
            raise QMPError("Channel list has no main entry")  # QEMU 10.0.2 crashes here
        mode = self.mode()
        if mode == "cpr-transfer" and main.addr.transport == "file":
            raise QMPError("Migration requires streamable transport (eg unix)")
        if mode == "cpr-transfer" and cpr is None:
            raise QMPError("missing 'cpr' migration channel")
        if mode == "cpr-transfer" and main.addr.type == "inet" and str(main.addr.port) == "0":
            raise QMPError("cpr-transfer: the main channel's inet port cannot be 0 (dynamically chosen)")
        self._migrate_prepare()
        if mode == "cpr-exec" and not self.params["cpr-exec-command"]:
            raise QMPError(cpr_exec.NO_COMMAND_TEXT)
        self._reset_outgoing()
        self.main_channel = main
        self.t_start = time.monotonic()
        self._set_status("setup")
        if mode == "cpr-exec":  # cpr_state_save(): no channel; the state goes into a memfd (the cpr one, if
            self.cpr_exec_state_save()  # given, is ignored, as QEMU 10.2 ignores it)
            return None
        if mode == "cpr-transfer":
            try:
                self.cpr_state_save(cpr)
            except (CprError, ValueError, OSError) as e:
                self.error_desc = str(e)
                self._close_cpr_out()
                self._set_status("failed")
                raise QMPError(str(e)) from None
            # The destination hangs up the cpr channel once it listens on main; then we finish.
            self.vm.loop.add_reader(self.cpr_out.fileno(), self._cpr_hup)
            return None
        self.qmp_migrate_finish()
        return None

    def _migrate_prepare(self) -> None:
        state = self.vm.runstate.state
        if self.active():
            raise QMPError("There's a migration process in progress")
        if state == rs.INMIGRATE:
            raise QMPError("Guest is waiting for an incoming migration")
        if state == rs.POSTMIGRATE and self.status == "completed":
            raise QMPError("Can't migrate the vm that was paused due to previous migration")
        if self.mode() != "normal":
            for cap, label in CPR_INCOMPATIBLE.items():
                if self.caps[cap]:
                    raise QMPError(f"Cannot use {label} with CPR")
        blockers = self._blockers()
        if blockers:
            raise QMPError(blockers[-1])  # the head of QEMU's list: the blocker added last

    def cpr_state_save(self, channel: MigrationChannel) -> None:
        """cpr_state_save(): connect the cpr channel, send every RAM fd, half-close to await the hang-up."""
        sock = cpr_transfer_output(channel)
        self.cpr_out = sock
        # cpr_save_fd() inserts at the head of its list: the block registered last goes first on the wire
        fds = [CprFd(name, 0, fd) for name, fd in reversed(self.vm.ram.cpr_fds())]
        self.bytes_cpr = cpr_state_save(sock, fds)
        sock.shutdown(socket.SHUT_WR)

    def _cpr_hup(self) -> None:
        """The destination closed the cpr channel (it listens on main now, or it died): finish."""
        self._close_cpr_out()
        if self.status == "setup":
            self.qmp_migrate_finish()

    def _close_cpr_out(self) -> None:
        if self.cpr_out is not None:
            with contextlib.suppress(ValueError, OSError):
                self.vm.loop.remove_reader(self.cpr_out.fileno())
            self.cpr_out.close()
            self.cpr_out = None

    def qmp_migrate_finish(self) -> None:
        target = self.cpr_exec_migration_thread if self.mode() == "cpr-exec" else self.migration_thread
        t = threading.Thread(target=target, name="live_migration", daemon=True)
        self._threads.append(t)
        t.start()

    # -- source: cpr-exec (QEMU 10.2, migration/cpr-exec.c; the work is in cpr_exec.py) ----------------------
    def cpr_exec_state_save(self) -> None:
        """cpr_state_save() for cpr-exec: the RAM fds' names and numbers into the QEMU_CPR_EXEC_STATE memfd."""
        fds = [CprFd(name, 0, fd) for name, fd in reversed(self.vm.ram.cpr_fds())]
        _, self.cpr_exec_state_bytes = cpr_exec.cpr_exec_state_save(fds)
        self.qmp_migrate_finish()

    def cpr_exec_migration_thread(self) -> None:
        """The migration, then the notifiers: PRECOPY_DONE exec's the new program, PRECOPY_FAILED drops the state."""
        self.migration_thread()
        if self.status != "completed":
            cpr_exec.cpr_exec_unpersist_state()
            return
        self.hold("cpr-exec")
        if self._closing:  # `quit` while held: the old program ends, nothing is exec'd
            cpr_exec.cpr_exec_unpersist_state()
            return
        # A bottom half, as QEMU schedules it: on the loop, after the `migrate` reply and the events queued
        # before it have gone out (exec'ing from this thread could cut them off).
        self.vm.loop.call_soon_threadsafe(self.cpr_exec_cb)

    def cpr_exec_cb(self) -> None:
        """cpr_exec_cb(): exec the new program; returns only if execvp failed, and then recovers as QEMU does."""
        self.checkpoint("cpr-exec")
        t0 = int(self.t_start * 1e9) if self.t_start else 0
        pre_exec = {
            "pid": os.getpid(),
            "runstate": self.vm.runstate.state,
            "query-migrate": self.qmp_query_migrate({}),
            "events": [e for e in self.vm.events if e.get("monotonic-ns", 0) >= t0 - 1_000_000][-500:],
            "cpr-exec-state-bytes": self.cpr_exec_state_bytes,
        }
        fds = [fd for _, fd in self.vm.ram.cpr_fds()]
        error = cpr_exec.cpr_exec(list(self.params["cpr-exec-command"]), fds, pre_exec)
        print(f"labkit-vm: {error}", file=sys.stderr, flush=True)  # error_report_err()
        self.error_desc = error
        self._set_status("failed")  # "we can go from state COMPLETED to FAILED"
        cpr_exec.cpr_exec_unpersist_state()
        if self.vm_was_running:
            self.vm.vm_start()

    def incoming_cpr_exec(self, state: cpr_exec.CprExecState) -> None:
        """The new program found CPR state left by cpr-exec: RAM is adopted; keep the memfd until incoming."""
        from labkit.vm import T_ENTERED_NS

        self.cpr_in = state  # closed by cpr_state_close() when the incoming migration starts, as the socket is
        self.incoming_mode = "cpr-exec"
        self.pre_exec = state.pre_exec
        self.checkpoints += [
            ("dst-exec-entered", T_ENTERED_NS),
            ("dst-cpr-state-loaded", state.t_loaded_ns),
            ("dst-ram-mapped", state.t_mapped_ns),
        ]

    # -- source: the migration thread ---------------------------------------------------------------------
    def migration_thread(self) -> None:
        mode = self.mode()
        try:
            if mode == "cpr-transfer":
                self.hold("cpr-hup")
        except MigrationCancelled:
            self._cancelled()
            return
        try:
            sink = migration_connect(self.main_channel, timeout=10)
        except (OSError, ValueError) as e:
            self._fail(str(e))
            return
        f = QEMUFileOut(sink, rate_limit=RateLimiter(self.params["max-bandwidth"], self.cancelled))
        self._out = f  # query-migrate reads its byte count while the thread runs
        self._sink = sink
        if self.cancelled.is_set():  # cancelled while connecting: nobody shut this channel down yet
            self._shutdown_sink()
        try:
            self._save(f, mode)
        except MigrationCancelled:
            self._cancelled()
        except (OSError, StreamError) as e:
            if self.cancelled.is_set():  # migrate_cancel shut the channel down under a blocked write
                self._cancelled()
                return
            text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            self._fail(f"Unable to write to socket: {text}" if isinstance(e, OSError) else text)
        finally:
            self.bytes_main = f.bytes_sent
            with contextlib.suppress(OSError):
                sink.close()

    def checkpoint(self, name: str) -> None:
        """QEMU's vmstate_downtime_checkpoint trace points, kept on CLOCK_MONOTONIC for the lab's timeline."""
        self.checkpoints.append((name, time.monotonic_ns()))

    def _stop_vm(self) -> None:
        """migration_stop_vm(): the guest pauses here; the downtime clock starts."""
        self.t_stop = time.monotonic()
        self.checkpoint("src-downtime-start")
        self.vm_was_running = self.vm.vm_stop(rs.FINISH_MIGRATE)
        self.checkpoint("src-vm-stopped")
        self.vm.global_state.runstate = rs.RUNNING if self.vm_was_running else rs.PAUSED

    def _save(self, f: QEMUFileOut, mode: str) -> None:
        ignore_shared = self.caps["x-ignore-shared"]
        blocks = [b for b in self.vm.ram if not migrate_ram_is_ignored(b, mode, ignore_shared)]
        if mode != "normal":
            self._stop_vm()  # CPR stops the guest before any state is saved (migration_connect)
        self.hold("main-connected")
        qemu_savevm_state_header(f)
        ram_save_setup(f, [(b.idstr, b.size) for b in blocks])
        for b in blocks:
            b.dirty_sync()  # start tracking now; the migration bitmap already has every page set
        ram = RAMState(blocks, self.stats)
        ram.stats.dirty_sync_count = 1
        self._pass_event()
        self.t_active = time.monotonic()
        self._set_status("active")
        if mode == "normal":
            self._precopy_iterate(f, ram)
            self.hold("switchover")
            self._stop_vm()
        # completion (migration_completion_precopy)
        if self.caps["pause-before-switchover"]:
            self._set_status("pre-switchover")
            while not self.continue_event.wait(0.05):
                if self.cancelled.is_set():
                    raise MigrationCancelled()
        self._set_status("device")
        ram.bitmap_sync()
        self._pass_event()
        f.rate_limit = None  # the guest is stopped: send the rest at full speed (downtime)
        ram.save_dirty(f, downtime=True, cancelled=self.cancelled)
        ram_save_iterate_end(f)
        self.checkpoint("src-iterable-saved")
        for dev in self.vm.devices:
            data = dev.save()
            qemu_save_device_state(f, dev.name, 0, dev.version, data)
            self.stats.downtime_bytes += len(data)
        qemu_savevm_state_end(f)
        f.flush()
        self.checkpoint("src-non-iterable-saved")
        self.stats.remaining = 0
        self.t_end = time.monotonic()
        self.vm.runstate.set(rs.POSTMIGRATE)
        self.checkpoint("src-downtime-end")
        self._set_status("completed")

    def _precopy_iterate(self, f: QEMUFileOut, ram: RAMState) -> None:
        """Passes over the dirty bitmap until what is left fits in downtime-limit at the measured bandwidth."""
        while True:
            t0, b0 = time.monotonic(), f.bytes_sent
            ram.save_dirty(f, downtime=False, cancelled=self.cancelled)
            ram_save_iterate_end(f)
            f.flush()
            elapsed = max(time.monotonic() - t0, 1e-6)
            bandwidth = (f.bytes_sent - b0) / elapsed  # bytes/s measured over this pass
            if f.bytes_sent - b0 < 64 << 10:
                # too little sent to measure: fall back to the limit itself (as QEMU's initial estimate)
                bandwidth = self.params["max-bandwidth"] or 1 << 30
            self.stats.mbps = bandwidth * 8 / 1e6
            ram.bitmap_sync()
            self._pass_event()
            pending = ram.dirty_pages() * 4096
            threshold = bandwidth * self.params["downtime-limit"] / 1000
            self.expected_downtime = int(pending / bandwidth * 1000) if bandwidth else 0
            if pending <= threshold:
                return
            if self.cancelled.is_set():
                raise MigrationCancelled()

    def _pass_event(self) -> None:
        if self.caps["events"]:
            self.vm.emit("MIGRATION_PASS", {"pass": self.stats.dirty_sync_count})

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
        self.t_end = time.monotonic()
        self._set_status("cancelled")
        self._restart_guest()

    # -- source: cancel, continue, query ------------------------------------------------------------------
    def qmp_migrate_cancel(self, args: dict) -> None:
        """migrate_cancel: before finish (waiting for the hang-up) it is immediate; later the thread stops."""
        if not self.active():
            return
        if self.status == "setup" and self.cpr_out is not None:
            self._close_cpr_out()
            self._set_status("cancelling")
            self.t_end = time.monotonic()
            self._set_status("cancelled")
            return
        self._set_status("cancelling")
        self.cancelled.set()
        self._shutdown_sink()

    def _shutdown_sink(self) -> None:
        """migration_cancel() -> qemu_file_shutdown(): wake a write blocked on a peer that stopped reading."""
        sink = self._sink
        if isinstance(sink, socket.socket):
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_RDWR)

    def qmp_migrate_continue(self, args: dict) -> None:
        if args["state"] != "pre-switchover" or self.status != "pre-switchover":
            raise QMPError(f"Migration not in expected state: {self.status}")
        self.continue_event.set()

    def qmp_query_migrate(self, args: dict) -> dict:
        out = self._query_migrate(args)
        if self.pre_exec is not None:  # cpr-exec: the old program's figures, kept across the exec (lab-only)
            out.setdefault("x-labkit", {})["pre-exec"] = self.pre_exec
        return out

    def _query_migrate(self, args: dict) -> dict:
        if self.status == "none" and self.incoming_status != "none":
            out: dict = {
                "status": self.incoming_status,
                "x-labkit": {"checkpoints": [{"name": n, "monotonic-ns": t} for n, t in self.checkpoints]},
            }
            if self.incoming_error:
                out["error-desc"] = self.incoming_error
            if self.incoming_stats:
                out["ram"] = self.incoming_stats
            return out
        # QEMU 10.0.2 answers {} before any migration, and only status and error-desc after a failure
        out = {} if self.status == "none" else {"status": self.status}
        blockers = self._blockers()
        if blockers:
            out["blocked-reasons"] = blockers
        if self.status == "none":
            return out
        if self.status == "failed":
            out["error-desc"] = self.error_desc or "unknown error"
            out["x-labkit"] = {
                "bytes-main": self.bytes_main,
                "bytes-cpr": self.bytes_cpr,
                "mode": self.mode(),
                "checkpoints": [{"name": n, "monotonic-ns": t} for n, t in self.checkpoints],
            }
            return out
        now = time.monotonic()
        end = self.t_end or now
        out["total-time"] = _ms(self.t_start, end)
        out["setup-time"] = _ms(self.t_start, self.t_active or end)
        if self.status == "completed":
            out["downtime"] = _ms(self.t_stop, self.t_end)
        elif self.status in ("active", "device", "pre-switchover"):
            out["expected-downtime"] = self.expected_downtime
        out["ram"] = self.stats.to_qmp()
        if self.error_desc:
            out["error-desc"] = self.error_desc
        out["x-labkit"] = {
            "bytes-main": self._out.bytes_sent if self._out is not None else self.bytes_main,
            "bytes-cpr": self.bytes_cpr,
            "mode": self.mode(),
            "held-at": self.held_at,
            "checkpoints": [{"name": n, "monotonic-ns": t} for n, t in self.checkpoints],
            "pages-per-pass": list(self.stats.pages_per_pass),
            "bytes-per-pass": list(self.stats.bytes_per_pass),
            "seconds-per-pass": [round(x, 6) for x in self.stats.seconds_per_pass],
        }
        return out

    # -- destination --------------------------------------------------------------------------------------
    def incoming_cpr(self, sock: socket.socket) -> None:
        """CPR state was loaded at start-up: remember the socket; closing it tells the source we listen."""
        self.cpr_in = sock
        self.incoming_mode = "cpr-transfer"

    def cpr_state_close(self) -> None:
        if self.cpr_in is not None:
            self.cpr_in.close()
            self.cpr_in = None

    async def start_incoming_from_cmdline(self, raw: str) -> None:
        try:
            _, channel = parse_incoming_option(raw)
            self.qemu_start_incoming_migration(channel)
        except (ValueError, OSError, QMPError) as e:
            self.vm.fatal(str(e))

    def qmp_migrate_incoming(self, args: dict) -> None:
        uri, channels = args.get("uri"), args.get("channels")
        if self.vm.runstate.state != rs.INMIGRATE or "main" not in self.vm.opts.incoming:
            raise QMPError("'-incoming' was not specified on the command line")
        if self.incoming_started:
            raise QMPError("The incoming migration has already been started")
        if (uri is None) == (channels is None):
            raise QMPError("need either 'uri' or 'channels' argument")
        try:
            if channels is not None:
                channel = parse_channels(channels, single_main=True)["main"]
            else:
                channel = parse_uri(uri)
        except ValueError as e:
            raise QMPError(str(e)) from None
        try:
            self.qemu_start_incoming_migration(channel)
        except (ValueError, OSError) as e:
            raise QMPError(str(e)) from None

    def qemu_start_incoming_migration(self, channel: MigrationChannel) -> None:
        """Listen on (or open) the main channel, then close the cpr channel: the source's cue to connect."""
        if self.mode() == "cpr-transfer":
            if channel.addr.transport == "file":
                raise QMPError("Migration requires streamable transport (eg unix)")
            if channel.addr.type == "inet" and str(channel.addr.port) == "0":
                raise QMPError("cpr-transfer: the main channel's inet port cannot be 0 (dynamically chosen)")
        if channel.addr.transport == "file":
            source = open_incoming_file(channel)
        else:
            source = migration_listen(channel)
            self._incoming_listener = source
        self.incoming_started = True
        self._set_incoming_status("setup")
        t = threading.Thread(
            target=self.incoming_thread, args=(source, channel), name="incoming", daemon=True
        )
        self._threads.append(t)
        t.start()
        self.cpr_state_close()

    def incoming_thread(self, source, channel: MigrationChannel) -> None:
        conn = source
        try:
            # Fault the destination's fresh RAM in while nobody is connected yet, so the stream lands in pages
            # that exist (first touch costs ~1-3 s per GiB here; QEMU would pay it during the stream instead).
            # Blocks adopted over CPR or backed by a file keep what they hold.
            for b in self.vm.ram:
                if not b.reused and b.kind != "file":
                    populate(b)
            self.checkpoint("dst-populated")
            if isinstance(source, socket.socket):
                conn, _ = source.accept()
                source.close()
                self._incoming_listener = None
                self._incoming_conn = conn
            self.checkpoint("dst-accepted")
            self._set_incoming_status("active")
            stats = qemu_loadvm_state(
                QEMUFileIn(conn),
                ram=self._incoming_ram,
                on_device=self._load_device,
                on_ram_blocks=self._check_ram_blocks,
                zero_page_needs_write=self._zero_page_needs_write,
            )
            self.incoming_stats = {
                "normal": stats.normal_pages,
                "duplicate": stats.zero_pages,
                "transferred": stats.bytes,
            }
            self.checkpoint("dst-precopy-loadvm-completed")
            self.hold("loaded")
        except (OSError, StreamError, QMPError, ValueError) as e:
            if (
                self._closing
            ):  # `quit` (or SIGTERM) while waiting or loading: an exit asked for, not a failure
                return
            self.incoming_error = f"load of migration failed: {e}"
            self._set_incoming_status("failed")
            self.vm.fatal(self.incoming_error)
            return
        finally:
            with contextlib.suppress(OSError):
                conn.close()
        self.process_incoming_migration_bh()

    def _zero_page_needs_write(self, name: str) -> bool:
        """A fresh mapping is already zero (QEMU skips those writes too); a file or adopted memory may not be."""
        block = self.vm.ram.find(name)
        return block is None or block.kind == "file" or block.reused

    def _incoming_ram(self, name: str) -> memoryview:
        block = self.vm.ram.find(name)
        if block is None:
            raise StreamError(f'Unknown ramblock "{name}", cannot accept migration')
        return block.view()

    def _check_ram_blocks(self, blocks: list[tuple[str, int]]) -> None:
        for name, size in blocks:
            block = self.vm.ram.find(name)
            if block is None:
                raise StreamError(f'Unknown ramblock "{name}", cannot accept migration')
            if block.size != size:
                raise StreamError(
                    f"Length mismatch: {name}: 0x{size:x} in != 0x{block.size:x}: Invalid argument"
                )

    def _load_device(self, name: str, instance: int, version: int, data: bytes) -> None:
        for dev in self.vm.devices:
            if dev.name == name and instance == 0:
                try:
                    dev.load(data, version)
                except Exception as e:  # a device's own validation error
                    raise StreamError(
                        f"error while loading state for instance 0x{instance:x} of device '{name}': {e}"
                    ) from None
                return
        raise StreamError(
            f"Unknown savevm section or instance '{name}' {instance}. Make sure that your current VM setup matches your saved VM setup, including any hotplugged devices"
        )

    def process_incoming_migration_bh(self) -> None:
        """Resume if the source was running and -S was not given; then report completed (QEMU's order)."""
        self.checkpoint("dst-precopy-bh-enter")
        self.vm.guest.block.dirty[:] = 0
        if self.vm.global_state.runstate == rs.RUNNING and self.vm.autostart:
            self.vm.vm_start()
            self.checkpoint("dst-vm-started")
        else:
            self.vm.runstate.set(rs.PAUSED)
        self.incoming_mode = None  # migration_incoming_state_destroy(): back to MIG_MODE_NONE
        self._set_incoming_status("completed")

    async def close(self) -> None:
        self._closing = True
        self.cancelled.set()
        self._shutdown_sink()  # a migration thread blocked writing to a peer that stopped reading
        self._close_cpr_out()
        self.cpr_state_close()
        if self._incoming_listener is not None:
            with contextlib.suppress(OSError):
                self._incoming_listener.shutdown(socket.SHUT_RDWR)
            self._incoming_listener.close()
        if self._incoming_conn is not None:
            with contextlib.suppress(OSError):
                self._incoming_conn.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            await asyncio.get_running_loop().run_in_executor(None, t.join, 2)
