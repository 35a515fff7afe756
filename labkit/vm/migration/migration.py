"""Migration's control, on both sides (QEMU's migration/migration.c): the QMP commands (migrate, migrate_cancel,
migrate-continue, the parameters and capabilities, query-migrate; migrate-incoming is precopy.py's) and the
MigrationState that joins the phases, as QEMU 10 runs it.

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
(connect main, then the migration thread). Each phase lives in one module, source and destination side by
side: the cpr channel in cpr_transfer.py, the exec in cpr_exec.py, the main channel in precopy.py; what they
share is state.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from typing import Any

from labkit.vm import runstate as rs
from labkit.vm.migration.channels import parse_channels, parse_uri
from labkit.vm.migration.cpr import CprError
from labkit.vm.migration.cpr_exec import NO_COMMAND_TEXT, CprExecMigration
from labkit.vm.migration.cpr_transfer import CprTransferMigration
from labkit.vm.migration.holds import HOLD_POINTS
from labkit.vm.migration.precopy import PrecopyMigration
from labkit.vm.migration.qapi import MIG_MODES
from labkit.vm.migration.state import ms_between
from labkit.vm.monitor.monitor import Monitor
from labkit.vm.qapi.error import QMPErrorResponse

MAX_MIGRATE_DOWNTIME = 2000 * 1000  # ms
CPR_INCOMPATIBLE = {
    "postcopy-ram": "postcopy",
    "background-snapshot": "background snapshot",
    "x-colo": "COLO",
}


class MigrationState(PrecopyMigration, CprTransferMigration, CprExecMigration):
    """One VM's migration (QEMU's MigrationState for outgoing, MigrationIncomingState for incoming): the
    phases' mixins over state.MigrationStateBase, and the QMP commands that drive them."""

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

    def qmp_hold(self, args: dict[str, Any]) -> dict[str, Any]:
        """Set the points to hold at (when "points" is given); answer where we hold now."""
        if "points" in args:
            unknown = [p for p in args["points"] if p not in HOLD_POINTS]
            if unknown:
                raise QMPErrorResponse(f"unknown hold point '{unknown[0]}' (known: {', '.join(HOLD_POINTS)})")
            self.holds = set(args["points"])
        return {"points": sorted(self.holds), "held-at": self.held_at}

    def qmp_continue(self, args: dict[str, Any]) -> None:
        point = args.get("point", self.held_at)
        with self._hold_cv:
            if self.held_at is None or point != self.held_at:
                raise QMPErrorResponse(f"Migration is not held at '{point}' (held at: {self.held_at or 'nothing'})")
            self.held_at = None
            self._hold_cv.notify_all()

    def qmp_set_parameters(self, args: dict[str, Any]) -> None:
        """migrate_params_check() then migrate_params_apply(): accepted during a migration too, as QEMU does.

        A new max-bandwidth reaches the running migration's rate limiter at once (migration_rate_set); a
        new downtime-limit is read at the next convergence check. Raising either is how one rescues a
        migration that does not converge."""
        if "downtime-limit" in args and args["downtime-limit"] > MAX_MIGRATE_DOWNTIME:
            # QEMU's text stringifies the macro MAX_MIGRATE_DOWNTIME, hence "(2000 * 1000)"
            raise QMPErrorResponse(
                "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms"
            )
        for i, word in enumerate(args.get("cpr-exec-command", [])):
            if not isinstance(word, str):
                raise QMPErrorResponse(f"Invalid parameter type for 'cpr-exec-command[{i}]', expected: string")
        self.params.update(args)
        if "max-bandwidth" in args and self._limiter is not None and self.status in ("setup", "active"):
            self._limiter.max_bandwidth = args["max-bandwidth"]  # stop-and-copy stays unlimited

    def qmp_set_capabilities(self, args: dict[str, Any]) -> None:
        if self.active():
            raise QMPErrorResponse("There's a migration process in progress")
        new = dict(self.caps)
        for item in args["capabilities"]:
            if not isinstance(item, dict) or not isinstance(item.get("capability"), str):
                raise QMPErrorResponse("Parameter 'capability' is missing")
            name = item["capability"]
            if name not in self.caps:
                raise QMPErrorResponse(f"Parameter 'capability' does not accept value '{name}'")
            state = item.get("state")
            if not isinstance(state, bool):
                raise QMPErrorResponse("Invalid parameter type for 'state', expected: boolean")
            new[name] = state
        self.caps = new

    def qmp_migrate(self, args: dict[str, Any]) -> None:
        """qmp_migrate(): parse channels, check, CPR state save; finish now, or on the cpr channel's hang-up."""
        uri, channels = args.get("uri"), args.get("channels")
        if (uri is None) == (channels is None):
            raise QMPErrorResponse("need either 'uri' or 'channels' argument")
        try:
            if channels is not None:
                parsed = parse_channels(channels)
            else:
                assert uri is not None  # exactly one of the two is given (checked above)
                parsed = {"main": parse_uri(uri)}
        except ValueError as e:
            raise QMPErrorResponse(str(e)) from None
        main, cpr = parsed.get("main"), parsed.get("cpr")
        if main is None:
            raise QMPErrorResponse("Channel list has no main entry")  # QEMU 10.0.2 crashes here
        mode = self.mode()
        if mode == "cpr-transfer" and main.addr.transport == "file":
            raise QMPErrorResponse("Migration requires streamable transport (eg unix)")
        if mode == "cpr-transfer" and cpr is None:
            raise QMPErrorResponse("missing 'cpr' migration channel")
        self._migrate_prepare()
        if mode == "cpr-exec" and not self.params["cpr-exec-command"]:
            raise QMPErrorResponse(NO_COMMAND_TEXT)
        self._reset_outgoing()
        self.expected_downtime = self.params["downtime-limit"]  # migrate_init()'s first estimate
        self.main_channel = main
        self.t_start = time.monotonic()
        self._set_status("setup")
        if mode == "cpr-exec":  # cpr_state_save(): no channel; the state goes into a memfd (the cpr one, if
            self.cpr_exec_state_save()  # given, is ignored, as QEMU 10.2 ignores it)
            return None
        if mode == "cpr-transfer":
            assert cpr is not None  # checked above: cpr-transfer refuses a migrate without it
            try:
                self.cpr_state_save(cpr)
            except (CprError, ValueError, OSError) as e:
                self.error_desc = str(e)
                self.close_cpr_out()
                self._set_status("failed")
                raise QMPErrorResponse(str(e)) from None
            # The destination hangs up the cpr channel once it listens on main; then we finish.
            assert self.vm.loop is not None and self.cpr_out is not None  # the monitor runs on the loop
            self.vm.loop.add_reader(self.cpr_out.fileno(), self._cpr_hup)
            return None
        self.qmp_migrate_finish()
        return None

    def _migrate_prepare(self) -> None:
        state = self.vm.runstate.state
        if self.active():
            raise QMPErrorResponse("There's a migration process in progress")
        if state == rs.INMIGRATE:
            raise QMPErrorResponse("Guest is waiting for an incoming migration")
        if state == rs.POSTMIGRATE and self.status == "completed":
            raise QMPErrorResponse("Can't migrate the vm that was paused due to previous migration")
        blockers = self._blockers()  # migration_is_blocked() comes before the CPR conflicts in QEMU 10.0.2
        if blockers:
            raise QMPErrorResponse(blockers[-1])  # the head of QEMU's list: the blocker added last
        if self.mode() != "normal":
            for cap, label in CPR_INCOMPATIBLE.items():
                if self.caps[cap]:
                    raise QMPErrorResponse(f"Cannot use {label} with CPR")

    def qmp_migrate_finish(self) -> None:
        target = self.cpr_exec_migration_thread if self.mode() == "cpr-exec" else self.migration_thread
        t = threading.Thread(target=target, name="live_migration", daemon=True)
        self._threads.append(t)
        t.start()

    def qmp_migrate_cancel(self, args: dict[str, Any]) -> None:
        """migrate_cancel: before finish (waiting for the hang-up) it is immediate; later the thread stops."""
        if not self.active():
            return
        if self.status == "setup" and self.cpr_out is not None:
            self.close_cpr_out()
            self._set_status("cancelling")
            self.t_end = time.monotonic()
            self._set_status("cancelled")
            return
        self._set_status("cancelling")
        self.cancelled.set()
        self._shutdown_sink()

    def qmp_migrate_continue(self, args: dict[str, Any]) -> None:
        if args["state"] != "pre-switchover" or self.status != "pre-switchover":
            raise QMPErrorResponse(f"Migration not in expected state: {self.status}")
        self.continue_event.set()

    def qmp_query_migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        """qmp_query_migrate(): fill_destination_migration_info(), then fill_source_migration_info() over it.

        Exactly QEMU 10.0.2's members in each state: nothing but status (and error-desc) in setup, failed
        and cancelled; times, expected-downtime or downtime, and ram while active and once completed. What
        only labkit knows is in x-labkit-query-migrate."""
        out: dict[str, Any] = {}
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

    def _fill_destination_info(self, out: dict[str, Any]) -> None:
        """fill_destination_migration_info(): the listening address while there is one, and the status."""
        if self.incoming_socket_address:
            out["socket-address"] = list(self.incoming_socket_address)
        if self.incoming_status == "none":
            return
        out["status"] = self.incoming_status
        if self.incoming_error:
            out["error-desc"] = self.incoming_error

    def _populate_time_info(self, out: dict[str, Any]) -> None:
        """populate_time_info(): downtime once completed, else the expected downtime."""
        end = self.t_end or time.monotonic()
        out["setup-time"] = ms_between(self.t_start, self.t_active or end)
        out["total-time"] = ms_between(self.t_start, end)
        if self.status == "completed":
            out["downtime"] = ms_between(self.t_stop, self.t_end)
        else:
            out["expected-downtime"] = self.expected_downtime

    def _ram_info(self) -> dict[str, Any]:
        """populate_ram_info(): `transferred` is every byte on the main channel (QEMU's
        migration_transferred_bytes), device state and headers included; the other counters are RAM's."""
        ram = self.stats.to_qmp()
        ram["transferred"] = self._main_bytes()
        if self.status == "completed":
            ram["remaining"] = ram["dirty-pages-rate"] = 0  # QEMU leaves both unset (0) once completed
        return ram

    def _main_bytes(self) -> int:
        return self._out.bytes_sent if self._out is not None else self.bytes_main

    def qmp_labkit_query_migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        """x-labkit-query-migrate: what QEMU's query-migrate has no member for, on both sides."""
        out: dict[str, Any] = {
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

    async def close(self) -> None:
        self._closing = True
        self.cancelled.set()
        self._shutdown_sink()  # a migration thread blocked writing to a peer that stopped reading
        self.close_cpr_out()
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
