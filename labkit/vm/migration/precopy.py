"""The main channel's phase, both sides (QEMU's migration/migration.c and savevm.c around it): the source's
migration thread (connect, pre-copy passes, stop, device state, completion) beside the destination's listen,
load and resume, so the stream can be read here as it is written and as it is read.

A mixin of migration.MigrationState; the stream itself is built by savevm.py, ram.py and stream.py.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import socket
import sys
import threading
import time
from typing import Any

from labkit.errors import LabkitError
from labkit.vm import runstate as rs
from labkit.vm.migration.channels import MigrationChannel, parse_channels, parse_incoming_option, parse_uri
from labkit.vm.migration.interface import MigratableRAMBlock
from labkit.vm.migration.qapi import MigMode
from labkit.vm.migration.qemu_file import QEMUFileIn, QEMUFileOut, StreamError
from labkit.vm.migration.qemu_sockets import (
    migration_connect,
    migration_listen,
    open_incoming_file,
    socket_address,
)
from labkit.vm.migration.ram import (
    PAGE_SIZE,
    MigrationCancelled,
    RAMState,
    RateLimiter,
    migrate_ram_is_ignored,
    ram_save_complete_end,
    ram_save_complete_start,
    ram_save_iterate_end,
    ram_save_setup,
)
from labkit.vm.migration.savevm import (
    Q35_MACHINE_NAME,
    qemu_savevm_send_switchover_start,
    qemu_savevm_state_complete_non_iterable,
    qemu_savevm_state_end,
    qemu_savevm_state_header,
    unknown_section,
)
from labkit.vm.migration.state import MigrationCounters, MigrationStateBase, ms_between
from labkit.vm.migration.stream import qemu_loadvm_state
from labkit.vm.migration.vmstate import q35_savevm_handlers, vmstate_load_state
from labkit.vm.migration.warm import warm_savevm_completion
from labkit.vm.oslib import qemu_prealloc_mem
from labkit.vm.qapi.error import QMPErrorResponse

#: What a migration cancelled during its completion records: the main channel's error after migrate_cancel
#: shut it down (qemu_file_shutdown() sets -EIO; qemu_file_get_error_obj() words it), as QEMU 10.0.2 reports.
CHANNEL_SHUTDOWN_ERROR = "Channel error: Input/output error"


def _loadvm_errno(e: Exception) -> int:
    """The errno qemu_loadvm_state() returns for a fault: the stream's own (StreamError.errno), EIO for a
    channel that failed (qemu_fill_buffer() records -EIO whatever the socket said), else EINVAL."""
    if isinstance(e, StreamError):
        return e.errno
    return errno.EIO if isinstance(e, OSError) else errno.EINVAL


def ram_block_populate(block: MigratableRAMBlock) -> None:
    """Fault the whole block in ahead of an incoming stream that writes every page anyway."""
    qemu_prealloc_mem(block.mm)


class PrecopyMigration(MigrationStateBase):
    """migration_thread() on the source, process_incoming_migration_co()/_bh() on the destination."""

    # -- source: the migration thread ---------------------------------------------------------------------
    def migration_thread(self) -> None:
        mode = self.mode()
        try:
            if mode == "cpr-transfer":
                self.hold("cpr-hup")
        except MigrationCancelled:
            self._cancelled()
            return
        assert self.main_channel is not None  # qmp_migrate() set it before starting this thread
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
            handlers=q35_savevm_handlers(serial=any(d.name == "serial" for d in self.vm.devices)),
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

    def _stop_vm(self) -> None:
        """migration_stop_vm(): the guest pauses here; the downtime clock starts. Just before, the completion
        is written once to nowhere, so that the pause runs it warm (warm.py)."""
        warm_savevm_completion([(b.idstr, b.size) for b in self.vm.ram], self.vm.devices)
        self.t_stop = time.monotonic()
        self.checkpoint("src-downtime-start")
        self.vm_was_running = self.vm.vm_stop(rs.FINISH_MIGRATE)
        self.checkpoint("src-vm-stopped")
        self.vm.global_state.runstate = rs.RUNNING if self.vm_was_running else rs.PAUSED

    def _save(self, f: QEMUFileOut, mode: MigMode) -> None:
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
        if self._limiter is not None:  # the guest is stopped: send the rest at full speed (downtime)
            self._limiter.max_bandwidth = 0
        qemu_savevm_send_switchover_start(f)
        ram_save_complete_start(f)
        ram.save_dirty(f, downtime=True, cancelled=self.cancelled)
        ram_save_complete_end(f)
        self.checkpoint("src-iterable-saved")
        self.stats.downtime_bytes += qemu_savevm_state_complete_non_iterable(f, self.vm.devices)
        # QEMU marks it at the end of qemu_savevm_state_complete_precopy_non_iterable(), before its caller's
        # final qemu_fflush(): the destination cannot have loaded everything by then. Here the flush comes
        # with the EOF (qemu_savevm_state_end), so the mark goes just before it.
        self.checkpoint("src-non-iterable-saved")
        qemu_savevm_state_end(f)
        f.flush()
        self.stats.remaining = 0
        self.t_end = time.monotonic()
        # migration_calculate_complete(): the final mbps is the whole stream over the time after setup
        transfer_ms = ms_between(self.t_start, self.t_end) - ms_between(self.t_start, self.t_active)
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
        assert self._limiter is not None  # set before the QEMUFileOut that calls this
        self._limiter(nbytes)
        self.counters.account(nbytes, time.monotonic())
        if self.counters.bandwidth:
            self.stats.mbps = self.counters.bandwidth * 8 / 1e6

    # -- destination: listen, load, resume ----------------------------------------------------------------
    async def start_incoming_from_cmdline(self, raw: str) -> None:
        try:
            _, channel = parse_incoming_option(raw)
            assert channel is not None  # the caller passes -incoming main only when it is not "defer"
            self.qemu_start_incoming_migration(channel)
        except (ValueError, OSError, QMPErrorResponse) as e:
            self.vm.fatal(str(e))

    def qmp_migrate_incoming(self, args: dict[str, Any]) -> None:
        uri, channels = args.get("uri"), args.get("channels")
        if self.vm.runstate.state != rs.INMIGRATE or "main" not in self.vm.opts.incoming:
            raise QMPErrorResponse("'-incoming' was not specified on the command line")
        if self.incoming_started:
            raise QMPErrorResponse("The incoming migration has already been started")
        if (uri is None) == (channels is None):
            raise QMPErrorResponse("need either 'uri' or 'channels' argument")
        try:
            if channels is not None:
                channel = parse_channels(channels, single_main=True)["main"]
            else:
                assert uri is not None  # exactly one of the two is given (checked above)
                channel = parse_uri(uri)
        except ValueError as e:
            raise QMPErrorResponse(str(e)) from None
        self.incoming_exit_on_error = args.get("exit-on-error", True)
        try:
            self.qemu_start_incoming_migration(channel)
        except (ValueError, OSError) as e:
            raise QMPErrorResponse(str(e)) from None

    def qemu_start_incoming_migration(self, channel: MigrationChannel) -> None:
        """Listen on (or open) the main channel, then close the cpr channel: the source's cue to connect."""
        if self.mode() == "cpr-transfer":
            if channel.addr.transport == "file":
                raise QMPErrorResponse("Migration requires streamable transport (eg unix)")
        source: socket.socket | io.RawIOBase
        if channel.addr.transport == "file":
            source = open_incoming_file(channel)
        else:
            listener = migration_listen(channel)
            assert listener is not None  # None only for a file channel
            source = self._incoming_listener = listener
            self.incoming_socket_address = [socket_address(listener, channel)]
        self.incoming_started = True
        self._set_incoming_status("setup")
        t = threading.Thread(
            target=self.incoming_thread, args=(source, channel), name="incoming", daemon=True
        )
        self._threads.append(t)
        t.start()
        self.cpr_state_close()

    def incoming_thread(self, source: socket.socket | io.RawIOBase, channel: MigrationChannel) -> None:
        conn = source
        loaded = False
        try:
            # Fault the destination's fresh RAM in while nobody is connected yet, so the stream lands in pages
            # that exist (first touch costs ~1-3 s per GiB here; QEMU would pay it during the stream instead).
            # Blocks adopted over CPR or backed by a file keep what they hold.
            for b in self.vm.ram:
                if not b.reused and b.kind != "file":
                    ram_block_populate(b)
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
            loaded = True
        except (OSError, StreamError, QMPErrorResponse, ValueError) as e:
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
            if not loaded:
                with contextlib.suppress(OSError):
                    conn.close()
        try:
            self.process_incoming_migration_bh()
        finally:  # migration_incoming_state_destroy() closes the channel after the bh, out of the pause
            with contextlib.suppress(OSError):
                conn.close()

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
        except LabkitError as e:  # a device's own validation error (devices.DeviceError)
            raise StreamError(
                f"error while loading state for instance 0x{instance:x} of device '{name}': {e}"
            ) from None

    def process_incoming_migration_bh(self) -> None:
        """Resume if the source was running and -S was not given; then report completed (QEMU's order).
        There is no NIC to announce: dst-precopy-bh-announced follows bh-enter at once. QEMU marks
        dst-precopy-bh-vm-started whether or not it started the guest."""
        self.checkpoint("dst-precopy-bh-enter")
        self.checkpoint("dst-precopy-bh-announced")
        self.vm.guest.block.dirty_clear()  # a clean dirty log, at no cost where nothing was marked
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
