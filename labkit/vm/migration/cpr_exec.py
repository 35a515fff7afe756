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

from labkit.vm.migration.cpr import (
    QEMU_CPR_FILE_MAGIC,
    QEMU_CPR_FILE_VERSION,
    CprError,
    CprFd,
    _BytesSource,
    _cpr_parse,
    _encode_name,
)

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
        name = _encode_name(entry.name)
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


class _FdNumberSource(_BytesSource):
    """The state memfd's bytes, read as QEMU's get_fd reads them in cpr-exec mode: the fd is a be32 number."""

    def take_fd(self, what: str) -> int:  # type: ignore[override]
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
    entries = _cpr_parse(_FdNumberSource(data), max_name=4096)
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
