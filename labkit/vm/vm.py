"""One emulated VM: start-up in QEMU's order, the run state, the QMP commands, and shutdown.

Start-up follows qemu_init(): parse options, create the machine, *load CPR state* (blocking on the cpr channel,
before any RAM, device or monitor exists, because the fds it carries are what RAM is made of), create RAM
blocks and devices, open the monitor, then either start incoming migration, wait (-incoming defer), stay in
prelaunch (-S) or run.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from typing import Any

from labkit import __version__
from labkit.vm import runstate as rs
from labkit.vm.devices import CPUDevice, Device, GlobalState, SerialDevice, TimerDevice
from labkit.vm.guest import VCPU, Guest, verify_guest_memory
from labkit.vm.memory import RAMList, format_ramblock_info, verify_roms
from labkit.vm.migration.migration import MigrationState
from labkit.vm.monitor.monitor import Event, Monitor
from labkit.vm.options import MachineOptions
from labkit.vm.qapi.error import QMPErrorResponse

# a command's arguments, checked against its schema by the monitor
QMPArgs = dict[str, Any]


class VM:
    """The machine: RAM, guest, devices, run state and monitor, owned by one process."""

    def __init__(self, opts: MachineOptions, ram: RAMList, incoming: bool):
        self.opts = opts
        self.ram = ram
        self.guest = Guest(ram.system, opts.guest, fresh=not incoming and not ram.system.reused)
        self.vcpu = VCPU(self.guest)
        self.serial = SerialDevice(self.guest, opts.serial_file)
        self.global_state = GlobalState()
        # QEMU's q35 -nodefaults has a serial port only when -serial gives one; its sections follow QEMU's order
        serial = [self.serial] if opts.serial_file else []
        self.devices: list[Device] = [TimerDevice(self.guest), CPUDevice(self.guest), *serial, self.global_state]
        self.runstate = rs.RunState(rs.INMIGRATE if incoming else rs.PRELAUNCH)
        self.autostart = not opts.start_paused
        self.monitor = Monitor(package=f"labkit-vm {__version__}")
        self.last_quiesce_ns: int | None = None
        self.events: list[Event] = []  # every event this VM emitted, with CLOCK_MONOTONIC ns, for the timeline
        self.monitor.add_event_listener(self._record_event)
        self.migration = MigrationState(self)
        self.monitor.hold_events = self._in_switchover
        self.runstate.on_change = self._runstate_changed
        self.loop: asyncio.AbstractEventLoop | None = None
        self.quit_requested: asyncio.Event | None = None
        self._register_commands()

    # -- events and run state ------------------------------------------------------------------------------
    def _record_event(self, ev: Event) -> None:
        self.events.append({**ev, "monotonic-ns": time.monotonic_ns()})
        del self.events[:-10000]

    def _in_switchover(self) -> bool:
        """The guest is stopped for migration's completion and no client waits on an event to go on (no
        x-labkit hold armed, no pause-before-switchover): its events can wait until the device state is out.
        They keep the time they were emitted; only their sending waits, and the pause loses the loop thread's
        GIL hand-overs."""
        mig = self.migration
        return (
            self.runstate.state == rs.FINISH_MIGRATE
            and not mig.holds
            and not mig.caps["pause-before-switchover"]
        )

    def _runstate_changed(self, old: rs.RunStateName, new: rs.RunStateName) -> None:
        if old == rs.FINISH_MIGRATE and new != old:
            self.monitor.release_events()

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        self.monitor.emit_event(name, data)

    def vm_start(self) -> None:
        """vm_start(): announce RESUME, then run, in QEMU's order: vm_prepare_start() sends RESUME before it
        sets the run state ("the CPUs will be resumed shortly later") and resume_all_vcpus() follows. Waking
        the vCPU first would also put its thread's first slice between the guest's stop and RESUME."""
        self.emit("RESUME")
        self.runstate.set(rs.RUNNING)
        self.vcpu.resume()

    def vm_stop(self, new_state: rs.RunStateName) -> bool:
        """vm_stop_force_state(): quiesce the vCPU and STOP if it runs, then enter new_state in any case (as
        migration does); returns whether the VM was running."""
        was_running = self.runstate.running
        if was_running:
            t0 = time.monotonic_ns()
            self.vcpu.pause()
            self.last_quiesce_ns = time.monotonic_ns() - t0  # how long the vCPU took to finish its slice
            self.runstate.set(new_state)
            self.emit("STOP")
        else:
            self.runstate.set(new_state)
        return was_running

    # -- QMP -----------------------------------------------------------------------------------------------
    def _register_commands(self) -> None:
        m = self.monitor
        m.register(
            "query-status", lambda a: {"running": self.runstate.running, "status": self.runstate.state}
        )
        m.register("stop", self.qmp_stop)
        m.register("cont", self.qmp_cont)
        m.register("quit", self.qmp_quit)
        m.register("query-name", lambda a: {"name": self.opts.name})
        m.register("query-memdev", self.qmp_query_memdev)
        m.register("x-labkit-guest-stats", self.qmp_guest_stats, {"*reset-gap": "bool"})
        m.register("x-labkit-verify", self.qmp_verify)
        m.register("x-labkit-console", lambda a: {"lines": list(self.guest.console)})
        m.register("x-labkit-ram-blocks", self.qmp_ram_blocks)
        m.register("x-query-ramblock", lambda a: {"human-readable-text": format_ramblock_info(self.ram)})
        m.register("x-labkit-events", lambda a: list(self.events))
        m.register(
            "x-labkit-info",
            lambda a: {"pid": os.getpid(), "runstate": self.runstate.state, "autostart": self.autostart},
        )
        self.migration.register_commands(m)

    def qmp_stop(self, args: QMPArgs) -> None:
        if self.runstate.state == rs.INMIGRATE:
            self.autostart = False  # qmp_stop(): "the VM will not start after migration"
            return
        if self.runstate.running:  # do_vm_stop(): a VM that is not running keeps its state (prelaunch stays
            self.vm_stop(rs.PAUSED)  # prelaunch, postmigrate stays postmigrate), as QEMU 10.0.2 does here

    def qmp_cont(self, args: QMPArgs) -> None:
        state = self.runstate.state
        if state == rs.INMIGRATE:
            self.autostart = True
            return
        if self.migration.active():
            raise QMPErrorResponse("Migration is not finished: the VM cannot resume while migrating")
        if state != rs.RUNNING:
            self.vm_start()

    def qmp_quit(self, args: QMPArgs) -> None:
        self.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        assert self.loop and self.quit_requested
        self.loop.call_soon(self.quit_requested.set)

    def qmp_query_memdev(self, args: QMPArgs) -> list[dict[str, Any]]:
        out = []
        for b in self.ram:
            if b.backend.startswith("memory-backend-"):
                out.append(
                    {
                        "id": b.idstr,
                        "size": b.size,
                        "merge": False,
                        "dump": True,
                        "prealloc": b.prealloc,
                        "share": b.shared,
                        "host-nodes": [],
                        "policy": "default",
                    }
                )
        return out

    def qmp_guest_stats(self, args: QMPArgs) -> dict[str, Any]:
        stats = self.guest.stats()
        stats["last-stop-quiesce-ns"] = self.last_quiesce_ns
        if args.get("reset-gap"):
            with self.vcpu.lock:
                self.guest.reset_gap()
        return stats

    def qmp_ram_blocks(self, args: QMPArgs) -> list[dict[str, Any]]:
        """The blocks in creation order (CPR fd registration order); x-query-ramblock gives ram_list's."""
        view = []
        for b in self.ram.created:
            addr = 0
            if b.mm is not None:
                import ctypes

                addr = ctypes.addressof(ctypes.c_char.from_buffer(b.mm))
            view.append(
                {
                    "name": b.idstr,
                    "size": b.size,
                    "max-size": b.max_length,
                    "kind": b.kind,
                    "backend": b.backend,
                    "shared": b.shared,
                    "fd": b.fd,
                    "path": b.path,
                    "reused": b.reused,
                    "host-addr": addr,
                }
            )
        return view

    def qmp_verify(self, args: QMPArgs) -> dict[str, Any]:
        """Prove guest memory is what the guest wrote; the vCPU holds still meanwhile (a stall the guest sees)."""
        with self.vcpu.lock:
            result = verify_guest_memory(self.ram.system)
            result["bad-roms"] = verify_roms(self.ram)
        result["ok"] = result["ok"] and not result["bad-roms"]
        return result

    # -- life cycle ----------------------------------------------------------------------------------------
    async def run(self) -> int:
        self.loop = asyncio.get_running_loop()
        self.quit_requested = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self.loop.add_signal_handler(sig, self.quit_requested.set)
        self.vcpu.start()
        for path in self.opts.qmp:
            try:
                await self.monitor.serve_unix(path)
            except OSError as e:  # QEMU's text: chardev socket's bind failure, one line, exit 1
                print(
                    f"labkit-vm: -qmp unix:{path}: Failed to bind socket to {path}: {e.strerror}",
                    file=sys.stderr,
                    flush=True,
                )
                await self.shutdown()
                return 1
        if self.runstate.state == rs.INMIGRATE:
            main = self.opts.incoming.get("main")
            # QEMU's order: monitor, then incoming (qmp_x_exit_preconfig). No await stands between the two, so
            # no client is greeted before we listen on main. With -incoming defer, migrate-incoming starts it
            # (and closes the cpr channel then).
            if main is not None:
                await self.migration.start_incoming_from_cmdline(main)
        if self.runstate.state == rs.PRELAUNCH and self.autostart:
            self.vm_start()
        await self.quit_requested.wait()
        await self.shutdown()
        return self.migration.exit_status

    async def shutdown(self) -> None:
        self.vcpu.quit()
        self.vcpu.join(2)
        await self.migration.close()
        await self.monitor.close()
        self.serial.close()

    def fatal(self, message: str) -> None:
        """error_report() then exit(1), as QEMU does when an incoming migration cannot load."""
        print(f"labkit-vm: {message}", file=sys.stderr, flush=True)
        self.migration.exit_status = 1
        if self.loop and self.quit_requested:
            self.loop.call_soon_threadsafe(self.quit_requested.set)
