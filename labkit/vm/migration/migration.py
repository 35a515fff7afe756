"""Migration's state machine, on both sides (QEMU's migration/migration.c), as QEMU 10 runs it.

Source, in the order QEMU 10.0.2 showed here (events capability on):

    normal        setup, PASS 1, active, PASS 2..n (one per exact bitmap sync: none when the first pass
                  ends within 100 ms), STOP, device, PASS n+1, completed
    cpr-reboot    setup, STOP, PASS 1, active, PASS 2..n (the same rule as normal), device, PASS n+1,
                  completed                                                   (main channel is a file)
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
import errno
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from labkit.qemu_syntax import MIG_MODES
from labkit.vm import runstate as rs
from labkit.vm.devices import DeviceError
from labkit.vm.memory import PAGE_SIZE, populate
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
    BUFFER_DELAY,
    MigrationCancelled,
    RAMState,
    RAMStats,
    RateLimiter,
    migrate_ram_is_ignored,
)
from labkit.vm.migration.stream import (
    Q35_MACHINE_NAME,
    QEMUFileIn,
    QEMUFileOut,
    StreamError,
    qemu_loadvm_state,
    qemu_save_device_state,
    qemu_savevm_send_switchover_start,
    qemu_savevm_state_end,
    qemu_savevm_state_header,
    ram_save_complete_end,
    ram_save_complete_start,
    ram_save_iterate_end,
    ram_save_setup,
    unknown_section,
)
from labkit.vm.migration.vmstate import q35_savevm_handlers, vmstate_load_state
from labkit.vm.monitor import QMPError

if TYPE_CHECKING:
    from labkit.vm.monitor import Monitor
    from labkit.vm.vm import VM

DEFAULT_DOWNTIME_LIMIT = 300  # ms (DEFAULT_MIGRATE_SET_DOWNTIME)
MAX_MIGRATE_DOWNTIME = 2000 * 1000  # ms
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
#: What a migration cancelled during its completion records: the main channel's error after migrate_cancel
#: shut it down (qemu_file_shutdown() sets -EIO; qemu_file_get_error_obj() words it), as QEMU 10.0.2 reports.
CHANNEL_SHUTDOWN_ERROR = "Channel error: Input/output error"
CPR_INCOMPATIBLE = {
    "postcopy-ram": "postcopy",
    "background-snapshot": "background snapshot",
    "x-colo": "COLO",
}


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


def socket_address(sock: socket.socket, channel: MigrationChannel) -> dict:
    """A listening socket's address as QMP's SocketAddress (socket_sockaddr_to_address): what QEMU lists
    under the destination's socket-address, with the port the kernel chose for port 0. A unix socket is
    named by the path asked for (labkit binds a temporary name and renames it into place)."""
    if sock.family == socket.AF_UNIX:
        name = channel.addr.path or sock.getsockname()
        return {"path": name.decode() if isinstance(name, bytes) else name, "type": "unix"}
    host, port = sock.getsockname()[:2]
    family = "ipv4" if sock.family == socket.AF_INET else "ipv6"
    return {"host": host, "port": str(port), family: True, "type": "inet"}


def _loadvm_errno(e: Exception) -> int:
    """The errno qemu_loadvm_state() returns for a fault: the stream's own (StreamError.errno), EIO for a
    channel that failed (qemu_fill_buffer() records -EIO whatever the socket said), else EINVAL."""
    if isinstance(e, StreamError):
        return e.errno
    return errno.EIO if isinstance(e, OSError) else errno.EINVAL


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
        self.incoming_socket_address: list[dict] = []  # mis->socket_address_list
        self.incoming_exit_on_error = True
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
        self._limiter: RateLimiter | None = None  # max-bandwidth on the main channel, changeable mid-way
        self.counters = MigrationCounters(time.monotonic())

    # -- QMP ---------------------------------------------------------------------------------------------
    def register_commands(self, m: Monitor) -> None:
        m.register(
            "migrate-set-parameters",
            self.qmp_set_parameters,
            {
                "*mode": MIG_MODES,
                "*downtime-limit": "uint64",
                "*max-bandwidth": "size",
                "*cpr-exec-command": "list",
            },
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
        m.register("x-labkit-query-migrate", self.qmp_labkit_query_migrate)
        m.register("x-labkit-hold", self.qmp_hold, {"*points": "list"})
        m.register("x-labkit-continue", self.qmp_continue, {"*point": "str"})
        m.register("x-labkit-checkpoints", lambda a: self.checkpoint_list())

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
        """migrate_params_check() then migrate_params_apply(): accepted during a migration too, as QEMU does.

        A new max-bandwidth reaches the running migration's rate limiter at once (migration_rate_set); a
        new downtime-limit is read at the next convergence check. Raising either is how one rescues a
        migration that does not converge."""
        if "downtime-limit" in args and args["downtime-limit"] > MAX_MIGRATE_DOWNTIME:
            # QEMU's text stringifies the macro MAX_MIGRATE_DOWNTIME, hence "(2000 * 1000)"
            raise QMPError(
                "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms"
            )
        for i, word in enumerate(args.get("cpr-exec-command", [])):
            if not isinstance(word, str):
                raise QMPError(f"Invalid parameter type for 'cpr-exec-command[{i}]', expected: string")
        self.params.update(args)
        if "max-bandwidth" in args and self._limiter is not None and self.status in ("setup", "active"):
            self._limiter.max_bandwidth = args["max-bandwidth"]  # stop-and-copy stays unlimited

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
        self._migrate_prepare()
        if mode == "cpr-exec" and not self.params["cpr-exec-command"]:
            raise QMPError(cpr_exec.NO_COMMAND_TEXT)
        self._reset_outgoing()
        self.expected_downtime = self.params["downtime-limit"]  # migrate_init()'s first estimate
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
        blockers = self._blockers()  # migration_is_blocked() comes before the CPR conflicts in QEMU 10.0.2
        if blockers:
            raise QMPError(blockers[-1])  # the head of QEMU's list: the blocker added last
        if self.mode() != "normal":
            for cap, label in CPR_INCOMPATIBLE.items():
                if self.caps[cap]:
                    raise QMPError(f"Cannot use {label} with CPR")

    def cpr_state_save(self, channel: MigrationChannel) -> None:
        """cpr_state_save(): connect the cpr channel, send every RAM fd, half-close to await the hang-up."""
        sock = cpr_transfer_output(channel)
        self.cpr_out = sock
        self.checkpoint("labkit-cpr-connected")  # labkit's marks for the sequence diagram (labkit.measure.plots)
        # cpr_save_fd() inserts at the head of its list: the block registered last goes first on the wire
        fds = [CprFd(name, 0, fd) for name, fd in reversed(self.vm.ram.cpr_fds())]
        self.bytes_cpr = cpr_state_save(sock, fds)
        self.checkpoint("labkit-cpr-fds-sent")
        sock.shutdown(socket.SHUT_WR)
        self.checkpoint("labkit-cpr-shut-wr")

    def _cpr_hup(self) -> None:
        """The destination closed the cpr channel (it listens on main now, or it died): finish."""
        self.checkpoint("labkit-cpr-hup")
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
            "x-labkit-query-migrate": self.qmp_labkit_query_migrate({}),
            "checkpoints": self.checkpoint_list(),
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
        if isinstance(sink, socket.socket):
            self.checkpoint("migration_socket_outgoing_connected")
        self._limiter = RateLimiter(self.params["max-bandwidth"], self.cancelled)
        f = QEMUFileOut(
            sink,
            rate_limit=self._rate_limit,
            handlers=q35_savevm_handlers(serial=self.vm.serial in self.vm.devices),
        )
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
        """QEMU's trace points, at the places QEMU 10.0.2 fires them, kept on CLOCK_MONOTONIC for the lab's
        timeline: vmstate_downtime_checkpoint's names ("src-vm-stopped", ...), the main channel's
        migration_socket_outgoing_connected / _incoming_accepted, and labkit's own, named "labkit-..."."""
        self.checkpoints.append((name, time.monotonic_ns()))

    def checkpoint_list(self) -> list[dict]:
        """x-labkit-checkpoints: every checkpoint so far, oldest first."""
        return [{"name": n, "monotonic-ns": t} for n, t in self.checkpoints]

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
        self.counters = MigrationCounters(time.monotonic())  # update_iteration_initial_status()
        qemu_savevm_state_header(f)
        ram_save_setup(f, [(b.idstr, b.size) for b in self.vm.ram])  # ignored blocks are listed too
        for b in blocks:
            b.dirty_sync()  # start tracking now; the migration bitmap already has every page set
        ram = RAMState(blocks, self.stats)
        ram.stats.dirty_sync_count = 1
        self._pass_event()
        self.t_active = time.monotonic()
        self._set_status("active")
        # migration_iteration_run(): pre-copy passes while RAM is pending, in cpr-reboot too (with the guest
        # already stopped, so the first exact sync finds nothing new); cpr-transfer ignores every block, so with
        # nothing pending it goes straight to completion, as QEMU does, without a PART section
        if blocks:
            self._precopy_iterate(f, ram)
        if mode == "normal":
            self.hold("switchover")
            self._stop_vm()
        # completion (migration_completion_precopy)
        if self.caps["pause-before-switchover"]:
            self._set_status("pre-switchover")
            while not self.continue_event.wait(0.05):
                if self.cancelled.is_set():
                    # migration_maybe_pause() fails; migration_completion() then records the error of the
                    # main channel migrate_cancel shut down (qemu_file_get_error_obj) as the migration's
                    self.error_desc = CHANNEL_SHUTDOWN_ERROR
                    raise MigrationCancelled()
        self._set_status("device")
        ram.bitmap_sync()
        self._pass_event()
        self._limiter.max_bandwidth = 0  # the guest is stopped: send the rest at full speed (downtime)
        qemu_savevm_send_switchover_start(f)
        ram_save_complete_start(f)
        ram.save_dirty(f, downtime=True, cancelled=self.cancelled)
        ram_save_complete_end(f)
        self.checkpoint("src-iterable-saved")
        for dev in sorted(self.vm.devices, key=lambda d: f.savevm.section_id(d.name, 0)):
            self.stats.downtime_bytes += qemu_save_device_state(f, dev.name, 0, dev.vmsd, dev.save())
        # QEMU marks it at the end of qemu_savevm_state_complete_precopy_non_iterable(), before its caller's
        # final qemu_fflush(): the destination cannot have loaded everything by then. Here the flush comes
        # with the EOF (qemu_savevm_state_end), so the mark goes just before it.
        self.checkpoint("src-non-iterable-saved")
        qemu_savevm_state_end(f)
        f.flush()
        self.stats.remaining = 0
        self.t_end = time.monotonic()
        # migration_calculate_complete(): the final mbps is the whole stream over the time after setup
        transfer_ms = _ms(self.t_start, self.t_end) - _ms(self.t_start, self.t_active)
        if transfer_ms:
            self.stats.mbps = f.bytes_sent * 8 / transfer_ms / 1000
        self.vm.runstate.set(rs.POSTMIGRATE)
        self.checkpoint("src-downtime-end")
        self._set_status("completed")

    def _precopy_iterate(self, f: QEMUFileOut, ram: RAMState) -> None:
        """migration_iteration_run(), decided at the end of each pass: until what is pending fits in
        downtime-limit at the measured bandwidth (s->threshold_size).

        The threshold is 0 until a BUFFER_DELAY (100 ms) window of sending has measured a bandwidth
        (MigrationCounters). Only when the cheap estimate of what is pending (the pages still marked in
        the migration bitmap: none, after a whole pass) is below the threshold does QEMU sync the dirty
        bitmap exactly (ram_state_pending_exact -> migration_bitmap_sync_precopy: one MIGRATION_PASS). So a
        small guest whose first pass ends within 100 ms goes straight to stop-and-copy with no sync in
        between: dirty-sync-count 2 in all. downtime-limit is read afresh at every check, so raising it
        mid-migration takes effect at the end of the current pass (QEMU checks every ~50 ms, mid-pass)."""
        while True:
            ram.save_dirty(f, downtime=False, cancelled=self.cancelled)
            ram_save_iterate_end(f)
            f.flush()
            bandwidth = self.counters.bandwidth
            threshold = bandwidth * self.params["downtime-limit"] / 1000
            pending = ram.dirty_pages() * PAGE_SIZE  # ram_state_pending_estimate()
            if pending < threshold:
                ram.bitmap_sync()  # ram_state_pending_exact()
                self._pass_event()
                pending = ram.dirty_pages() * PAGE_SIZE
                self.expected_downtime = int(pending / bandwidth * 1000)
            if not pending or pending < threshold:
                return
            if self.cancelled.is_set():
                raise MigrationCancelled()

    def _rate_limit(self, nbytes: int) -> None:
        """Every write on the main channel: wait for max-bandwidth, then count the bytes towards the
        bandwidth estimate (QEMU's migration_rate_limit() and migration_update_counters())."""
        self._limiter(nbytes)
        self.counters.account(nbytes, time.monotonic())
        if self.counters.bandwidth:
            self.stats.mbps = self.counters.bandwidth * 8 / 1e6

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
        """migration_iteration_finish() restarts a guest it stopped (RESUME), then the cleanup bottom half
        announces `cancelled` and reports an error the completion recorded (migrate_fd_cleanup())."""
        self.t_end = time.monotonic()
        self._restart_guest()
        self._set_status("cancelled")
        if self.error_desc:
            print(f"labkit-vm: {self.error_desc}", file=sys.stderr, flush=True)  # error_report_err()

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
        """qmp_query_migrate(): fill_destination_migration_info(), then fill_source_migration_info() over it.

        Exactly QEMU 10.0.2's members in each state: nothing but status (and error-desc) in setup, failed
        and cancelled; times, expected-downtime or downtime, and ram while active and once completed. What
        only labkit knows is in x-labkit-query-migrate."""
        out: dict = {}
        self._fill_destination_info(out)
        blockers = self._blockers()
        if blockers:
            out["blocked-reasons"] = blockers
        if self.status == "none":
            return out  # do not overwrite the destination's status
        out["status"] = self.status
        if self.status in ("active", "cancelling", "pre-switchover", "device", "completed"):
            self._populate_time_info(out)
            out["ram"] = self._ram_info()
        if self.error_desc:
            out["error-desc"] = self.error_desc
        return out

    def _fill_destination_info(self, out: dict) -> None:
        """fill_destination_migration_info(): the listening address while there is one, and the status."""
        if self.incoming_socket_address:
            out["socket-address"] = list(self.incoming_socket_address)
        if self.incoming_status == "none":
            return
        out["status"] = self.incoming_status
        if self.incoming_error:
            out["error-desc"] = self.incoming_error

    def _populate_time_info(self, out: dict) -> None:
        """populate_time_info(): downtime once completed, else the expected downtime."""
        end = self.t_end or time.monotonic()
        out["setup-time"] = _ms(self.t_start, self.t_active or end)
        out["total-time"] = _ms(self.t_start, end)
        if self.status == "completed":
            out["downtime"] = _ms(self.t_stop, self.t_end)
        else:
            out["expected-downtime"] = self.expected_downtime

    def _ram_info(self) -> dict:
        """populate_ram_info(): `transferred` is every byte on the main channel (QEMU's
        migration_transferred_bytes), device state and headers included; the other counters are RAM's."""
        ram = self.stats.to_qmp()
        ram["transferred"] = self._main_bytes()
        if self.status == "completed":
            ram["remaining"] = ram["dirty-pages-rate"] = 0  # QEMU leaves both unset (0) once completed
        return ram

    def _main_bytes(self) -> int:
        return self._out.bytes_sent if self._out is not None else self.bytes_main

    def qmp_labkit_query_migrate(self, args: dict) -> dict:
        """x-labkit-query-migrate: what QEMU's query-migrate has no member for, on both sides."""
        out: dict = {
            "mode": self.mode(),
            "held-at": self.held_at,
        }
        if self.status != "none":
            out["source"] = {
                "status": self.status,
                "bytes-main": self._main_bytes(),
                "bytes-cpr": self.bytes_cpr,
                "pages-per-pass": list(self.stats.pages_per_pass),
                "bytes-per-pass": list(self.stats.bytes_per_pass),
                "seconds-per-pass": [round(x, 6) for x in self.stats.seconds_per_pass],
            }
        if self.incoming_status != "none":
            out["destination"] = {"status": self.incoming_status, "ram": dict(self.incoming_stats)}
        if self.pre_exec is not None:  # cpr-exec: the old program's record, kept across the exec
            out["pre-exec"] = self.pre_exec
        return out

    # -- destination --------------------------------------------------------------------------------------
    def incoming_cpr(self, sock: socket.socket, marks: tuple[tuple[str, int], ...] = ()) -> None:
        """CPR state was loaded at start-up: remember the socket; closing it tells the source we listen.
        `marks` are the start-up's own checkpoints (no Migration existed yet to record them)."""
        self.cpr_in = sock
        self.incoming_mode = "cpr-transfer"
        self.checkpoints += list(marks)

    def cpr_state_close(self) -> None:
        if isinstance(self.cpr_in, socket.socket) and self.cpr_in.fileno() >= 0:
            self.checkpoint("labkit-cpr-closed")  # the hang-up the source waits for
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
        self.incoming_exit_on_error = args.get("exit-on-error", True)
        try:
            self.qemu_start_incoming_migration(channel)
        except (ValueError, OSError) as e:
            raise QMPError(str(e)) from None

    def qemu_start_incoming_migration(self, channel: MigrationChannel) -> None:
        """Listen on (or open) the main channel, then close the cpr channel: the source's cue to connect."""
        if self.mode() == "cpr-transfer":
            if channel.addr.transport == "file":
                raise QMPError("Migration requires streamable transport (eg unix)")
        if channel.addr.transport == "file":
            source = open_incoming_file(channel)
        else:
            source = migration_listen(channel)
            self._incoming_listener = source
            self.incoming_socket_address = [socket_address(source, channel)]
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
            self.checkpoint("labkit-dst-populated")
            if isinstance(source, socket.socket):
                conn, _ = source.accept()
                self.checkpoint("migration_socket_incoming_accepted")
                source.close()
                self._incoming_listener = None
                self._incoming_conn = conn
            self._set_incoming_status("active")
            stats = qemu_loadvm_state(
                QEMUFileIn(conn),
                ram=self._incoming_ram,
                on_device=self._load_device,
                on_ram_blocks=self._check_ram_blocks,
                zero_page_needs_write=self._zero_page_needs_write,
                machine=Q35_MACHINE_NAME,
                require_configuration=True,
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
            # qemu_loadvm_state() reports the fault itself (error_report, so on stderr whatever exit-on-error
            # says) and returns an errno; process_incoming_migration_co() words only that errno
            print(f"labkit-vm: {e}", file=sys.stderr, flush=True)
            self.incoming_error = f"load of migration failed: {os.strerror(_loadvm_errno(e))}"
            self._set_incoming_status("failed")
            self.incoming_socket_address = []  # migration_incoming_state_destroy()
            if self.incoming_exit_on_error:
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

    def _load_device(self, name: str, instance: int, version: int, f: QEMUFileIn) -> None:
        """vmstate_load(): the device reads its own fields; a section it does not model stops the load, named."""
        dev = next((d for d in self.vm.devices if d.name == name and instance == 0), None)
        if dev is None:
            raise unknown_section(name, instance)
        values = vmstate_load_state(f.get_bytes, f.peek, dev.vmsd, version)
        try:
            dev.load(values)
        except DeviceError as e:  # a device's own validation error
            raise StreamError(
                f"error while loading state for instance 0x{instance:x} of device '{name}': {e}"
            ) from None

    def process_incoming_migration_bh(self) -> None:
        """Resume if the source was running and -S was not given; then report completed (QEMU's order).
        There is no NIC to announce: dst-precopy-bh-announced follows bh-enter at once. QEMU marks
        dst-precopy-bh-vm-started whether or not it started the guest."""
        self.checkpoint("dst-precopy-bh-enter")
        self.checkpoint("dst-precopy-bh-announced")
        self.vm.guest.block.dirty[:] = 0
        if self.vm.global_state.runstate == rs.RUNNING and self.vm.autostart:
            self.vm.vm_start()
        else:
            self.vm.runstate.set(rs.PAUSED)
        self.checkpoint("dst-precopy-bh-vm-started")
        # migration_incoming_state_destroy() (QEMU runs it just after): back to MIG_MODE_NONE, the listening
        # address forgotten; done first here so that no answer after the event still shows them
        self.incoming_mode = None
        self.incoming_socket_address = []
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
