"""cpr-exec (QEMU 10.2, migration/cpr-exec.c): the old program exec's the new one in place, same PID.

There is no cpr channel. What cpr-transfer sends over its socket (magic, version, the list of RAM fds) is
written into a memfd named ``QEMU_CPR_EXEC_STATE``. A duplicate of that memfd, with close-on-exec cleared,
survives the exec, and its *number* travels in the environment variable of the same name. Because the fds
survive the exec under the same numbers, the fd field of each list entry is the fd number as a big-endian
32-bit integer (``put_fd``/``get_fd`` in cpr-exec mode), not a dummy byte carrying SCM_RIGHTS::

    offset  size  field
    0       4     51 43 50 52   QEMU_CPR_FILE_MAGIC ("QCPR")
    4       4     00 00 00 01   QEMU_CPR_FILE_VERSION
    8       1     01            another element follows
    9       4     namelen       strlen(name) + 1
    13      n     name + NUL    e.g. "ram0\\0"
    ..      4     id            0 for a RAM block
    ..      4     fd            the fd's number, valid in the new program too
    ..      1     00            end of the list

Source, in QEMU 10.2's order: ``qmp_migrate`` -> ``cpr_state_save`` (memfd, env var) -> the migration stops
the guest and saves device state to a file (no RAM: every block is ignored in this mode) -> ``completed`` ->
the PRECOPY_DONE notifier schedules ``cpr_exec_cb``: clear close-on-exec on every saved fd and
``execvp(cpr-exec-command)``. If execvp returns (a missing program, no permission, no memory), QEMU prints
``execvp %s failed: %s``, sets close-on-exec again, moves the migration from ``completed`` to ``failed``,
drops the state memfd and restarts the guest if it was running: the guest carries on in the old program, its
RAM untouched. Once execvp has succeeded there is no way back: if the new program dies before it loads, the
VM is gone, and with it any RAM that only its memfds held.

Destination (the new program, same PID): ``cpr_state_load`` sees the environment variable first (a cpr
channel given on the command line is ignored with a warning), reads the state, sets close-on-exec again on
the fds, and RAM blocks adopt them by name (``cpr_find_fd``) before any device exists.

Checked against qemu/qemu with the code search: migration/cpr-exec.c (``CPR_EXEC_STATE_NAME``,
``cpr_exec_persist_state``, ``cpr_exec_output``/``cpr_exec_input``, ``cpr_exec_cb``, ``cpr_exec_notifier``),
migration/cpr.c (``cpr_state_save``/``cpr_state_load``), migration/vmstate-types.c (``put_fd``/``get_fd``),
migration/migration.c (``migrate_prepare``) and docs/devel/migration/CPR.rst.

CprExecMigration, at the end, is the phase as a mixin of migration.MigrationState: both programs' sides.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from labkit.vm import T_ENTERED_NS
from labkit.vm.migration.cpr import (
    QEMU_CPR_FILE_MAGIC,
    QEMU_CPR_FILE_VERSION,
    BytesSource,
    CprError,
    CprFd,
    cpr_fd_name,
    cpr_state_parse,
)
from labkit.vm.migration.state import MigrationStateBase

CPR_EXEC_STATE_NAME = "QEMU_CPR_EXEC_STATE"  # the memfd's name and the environment variable's
# Lab-only: the old program's final query-migrate, events and checkpoints, so that the new program (same PID,
# fresh memory) can still report the source side of the migration it finished. Never part of QEMU's state.
LABKIT_PRE_EXEC = "LABKIT_CPR_EXEC_PRE"
# Said by QEMU 10.2's migrate_prepare() when mode is cpr-exec and cpr-exec-command is empty or unset.
NO_COMMAND_TEXT = "Parameter 'cpr-exec-command' required for cpr-exec"
IGNORED_CHANNEL_TEXT = "ignoring cpr channel for migration mode cpr-exec"


# ------------------------------------------------------------------------------------------ source side


def cpr_exec_state_save(fds: Iterable[CprFd]) -> tuple[int, int]:
    """cpr_state_save() in cpr-exec mode: write CPR state into a new memfd, then persist it for the exec.

    Returns (the fd kept open across exec, bytes written). The memfd itself is created close-on-exec, as
    qemu_memfd_create does; cpr_exec_persist_state() keeps a dup whose close-on-exec flag is cleared and
    names it in QEMU_CPR_EXEC_STATE.
    """
    out = bytearray(struct.pack(">II", QEMU_CPR_FILE_MAGIC, QEMU_CPR_FILE_VERSION))
    for entry in fds:
        name = cpr_fd_name(entry.name)
        out += b"\x01" + struct.pack(">I", len(name)) + name + struct.pack(">ii", entry.id, entry.fd)
    out += b"\x00"
    mfd = os.memfd_create(CPR_EXEC_STATE_NAME, os.MFD_CLOEXEC)
    try:
        os.write(mfd, bytes(out))
        kept = os.dup(mfd)  # os.dup makes it close-on-exec; the next line clears that, as qemu_clear_cloexec
        os.set_inheritable(kept, True)
    finally:
        os.close(mfd)
    os.environ[CPR_EXEC_STATE_NAME] = str(kept)
    return kept, len(out)


def cpr_exec_unpersist_state() -> None:
    """The PRECOPY_FAILED notifier: forget the saved state (close the memfd, unset the variable)."""
    val = os.environ.pop(CPR_EXEC_STATE_NAME, None)
    os.environ.pop(LABKIT_PRE_EXEC, None)
    if val is not None and val.isdigit():
        try:
            os.close(int(val))
        except OSError:
            pass


def cpr_exec_preserve_fds(fds: Iterable[int], keep: bool) -> None:
    """Clear (keep=True) or set again close-on-exec on the fds that must survive the exec (cpr_walk_fd).

    QEMU clears it only at the last moment: the fds must not leak into programs forked meanwhile."""
    for fd in fds:
        try:
            os.set_inheritable(fd, keep)
        except OSError:
            pass


def cpr_exec(argv: list[str], fds: list[int], pre_exec: dict[str, Any]) -> str:
    """cpr_exec_cb(): keep the RAM fds across exec and become ``argv``. Returns only when execvp fails,
    with QEMU's text for it; the caller then fails the migration and restarts the guest."""
    cpr_exec_preserve_fds(fds, True)
    os.environ[LABKIT_PRE_EXEC] = json.dumps(pre_exec, separators=(",", ":"), default=str)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    try:
        os.execvp(argv[0], argv)
    except OSError as err:
        text = f"execvp {argv[0]} failed: {err.strerror}"
    cpr_exec_preserve_fds(fds, False)
    os.environ.pop(LABKIT_PRE_EXEC, None)
    return text


# ----------------------------------------------------------------------------------------- destination side


def cpr_exec_has_state() -> bool:
    """cpr_exec_has_state(): this program was exec'd by a cpr-exec migration."""
    return CPR_EXEC_STATE_NAME in os.environ


class _FdNumberSource(BytesSource):
    """The state memfd's bytes, read as QEMU's get_fd reads them in cpr-exec mode: the fd is a be32 number."""

    def take_fd(self, what: str) -> int:
        fd: int
        (fd,) = struct.unpack(">i", self.read(4, f"the fd number of {what}"))
        return fd


@dataclass
class CprExecState:
    """What the new program found: the state memfd (closed when incoming starts), the fds by name, and the
    old program's lab-only record."""

    mfd: int
    fds: dict[str, int]
    pre_exec: dict[str, Any]
    t_loaded_ns: int = 0  # CLOCK_MONOTONIC when the state was read (the clock is the same across exec)
    t_mapped_ns: int = 0  # ... and when every RAM block had adopted its fd

    def close(self) -> None:
        """cpr_state_close(): the state memfd is no longer needed once the incoming migration starts."""
        if self.mfd >= 0:
            os.close(self.mfd)
            self.mfd = -1


def cpr_exec_state_load() -> CprExecState:
    """cpr_exec_input() + cpr_state_load(): read the state the old program left, unset the variable, and
    set close-on-exec again on every fd (so none leaks into a later fork until the next cpr-exec)."""
    val = os.environ.pop(CPR_EXEC_STATE_NAME)
    pre = os.environ.pop(LABKIT_PRE_EXEC, None)
    try:
        mfd = int(val)
        os.lseek(mfd, 0, os.SEEK_SET)
        data = b""
        while chunk := os.read(mfd, 65536):
            data += chunk
    except (ValueError, OSError) as err:
        raise CprError(f"{CPR_EXEC_STATE_NAME}={val!r}: cannot read the CPR state memfd ({err})") from None
    entries = cpr_state_parse(_FdNumberSource(data), max_name=4096)
    os.set_inheritable(mfd, False)
    by_name: dict[str, int] = {}
    for e in entries:
        if e.name in by_name or e.id != 0:
            raise CprError(f"unexpected cpr fd {e.name!r} id {e.id} (duplicate or non-zero id)")
        by_name[e.name] = e.fd
    cpr_exec_preserve_fds(by_name.values(), False)
    try:
        record = json.loads(pre) if pre else {}
    except ValueError:
        record = {}
    return CprExecState(mfd, by_name, record, t_loaded_ns=time.monotonic_ns())


class CprExecMigration(MigrationStateBase):
    """cpr-exec on both sides of the exec (QEMU 10.2): the old program saves CPR state to a memfd, completes
    the migration, then exec's the new one; the new program adopts the state at start-up."""

    # -- source (the old program) -------------------------------------------------------------------------
    def cpr_exec_state_save(self) -> None:
        """cpr_state_save() for cpr-exec: the RAM fds' names and numbers into the QEMU_CPR_EXEC_STATE memfd."""
        fds = [CprFd(name, 0, fd) for name, fd in reversed(self.vm.ram.cpr_fds())]
        _, self.cpr_exec_state_bytes = cpr_exec_state_save(fds)  # the module function, not this method
        self.qmp_migrate_finish()

    def cpr_exec_migration_thread(self) -> None:
        """The migration, then the notifiers: PRECOPY_DONE exec's the new program, PRECOPY_FAILED drops the state."""
        self.migration_thread()
        if self.status != "completed":
            cpr_exec_unpersist_state()
            return
        self.hold("cpr-exec")
        if self._closing:  # `quit` while held: the old program ends, nothing is exec'd
            cpr_exec_unpersist_state()
            return
        # A bottom half, as QEMU schedules it: on the loop, after the `migrate` reply and the events queued
        # before it have gone out (exec'ing from this thread could cut them off).
        assert self.vm.loop is not None  # the VM runs its loop before any migration starts
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
        error = cpr_exec(list(self.params["cpr-exec-command"]), fds, pre_exec)
        print(f"labkit-vm: {error}", file=sys.stderr, flush=True)  # error_report_err()
        self.error_desc = error
        self._set_status("failed")  # "we can go from state COMPLETED to FAILED"
        cpr_exec_unpersist_state()
        if self.vm_was_running:
            self.vm.vm_start()

    # -- destination (the new program) --------------------------------------------------------------------
    def incoming_cpr_exec(self, state: CprExecState) -> None:
        """The new program found CPR state left by cpr-exec: RAM is adopted; keep the memfd until incoming."""
        self.cpr_in = state  # closed by cpr_state_close() when the incoming migration starts, as the socket is
        self.incoming_mode = "cpr-exec"
        self.pre_exec = state.pre_exec
        self.checkpoints += [
            ("dst-exec-entered", T_ENTERED_NS),
            ("dst-cpr-state-loaded", state.t_loaded_ns),
            ("dst-ram-mapped", state.t_mapped_ns),
        ]
