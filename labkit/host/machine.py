"""Machine: one VM process, its private run directory, its QMP client and its shutdown (like qemu.machine).

A VM never outlives the Python process that spawned it: the child asks the kernel for SIGKILL when its parent
dies (PR_SET_PDEATHSIG), and an atexit hook ends whatever is still running.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from labkit.host.hardware import VMConfig
from labkit.host.procfs import Mapping, read_maps
from labkit.host.qmp_sync import QMP

if TYPE_CHECKING:
    from labkit.host.runners.base import Runner

PR_SET_PDEATHSIG = 1
# The ISO time QEMU's `-msg timestamp=on` puts before each stderr message. The same pattern as
# labkit.host.runners.qemu_trace.strip_msg_timestamps, kept here so that machine.py, which the backends build on,
# imports nothing from them.
_MSG_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z ")
_live: weakref.WeakSet[Machine] = weakref.WeakSet()
_live_lock = threading.Lock()


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the spawning thread's process dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@atexit.register
def _kill_all() -> None:
    with _live_lock:
        machines = list(_live)
    for m in machines:
        with contextlib.suppress(Exception):
            m.kill()


class VMStartError(ConnectionError):
    """The VM process exited before its monitor opened; the message carries the VM's own error line."""


class Machine:
    """A launched VM. Use as a context manager, or call shutdown().

    The runner (labkit.host.runners) says which program runs it and how; Machine itself knows none of them,
    so the runners build on Machine and not the other way round."""

    def __init__(self, config: VMConfig, runner: Runner, run_dir: str | None = None):
        self.config = config
        self.runner = runner
        self.backend = runner.name
        self._own_dir = run_dir is None
        self.run_dir = Path(run_dir or tempfile.mkdtemp(prefix=f"labkit-{config.name}-"))
        os.chmod(self.run_dir, 0o700)
        self.qmp_path = str(self.run_dir / "qmp.sock")
        self.log_path = self.run_dir / "vm.log"
        self.argv = runner.argv(config, self.qmp_path)
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp = QMP(config.name)
        self._log: BinaryIO | None = None

    # -- life cycle --------------------------------------------------------------------------------------
    def launch(self, connect: bool = True, timeout: float = 30.0) -> Machine:
        """Start the process; connect QMP unless told not to (a cpr-transfer destination opens its monitor
        only after the source has sent CPR state)."""
        # 0600 like every other file of the VM: the log carries the guest's console
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        self._log = os.fdopen(os.open(self.log_path, flags, 0o600), "ab")  # closed in _reap
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
            close_fds=True,
        )
        with _live_lock:
            _live.add(self)
        if connect:
            try:
                self.connect(timeout)
            except ConnectionError as e:
                reason = self.exit_reason()
                self.kill()
                if reason:
                    raise VMStartError(f"the {self.config.name} VM exited: {reason}") from e
                raise
            except BaseException:
                self.kill()
                raise
        return self

    def adopt(self, other: Machine) -> Machine:
        """Become the program `other`'s process exec'd into (cpr-exec): the same PID and log, a new monitor."""
        self.proc = other.proc
        self.log_path = other.log_path
        with _live_lock:
            _live.add(self)
        return self

    def exit_reason(self) -> str | None:
        """The VM's own last word (QEMU's or labkit-vm's one-line error) when it has exited, else None;
        without the time `-msg timestamp=on` puts in front of QEMU's messages (the qemu backend turns it on
        for its trace log), so it reads as QEMU prints it by default."""
        if self.proc is None or self.wait(2) is None:
            return None
        lines = [_MSG_TIMESTAMP.sub("", ln.strip()) for ln in self.log().splitlines() if ln.strip()]
        return lines[-1] if lines else f"exit status {self.proc.returncode}"

    def connect(self, timeout: float = 30.0) -> None:
        if not self.qmp.connected:
            self.qmp.connect(self.qmp_path, timeout, alive=self.alive)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cmd(self, command: str, args: dict[str, Any] | None = None, timeout: float = 30.0, **kwargs: Any) -> Any:
        return self.qmp.cmd(command, args, timeout, **kwargs)

    @property
    def events(self) -> list[dict[str, Any]]:
        return self.qmp.events

    def maps(self) -> list[Mapping]:
        return read_maps(self.pid)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait(self, timeout: float | None = None) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def shutdown(self, timeout: float = 10.0) -> int | None:
        """Ask the VM to quit over QMP, then SIGTERM, then SIGKILL; always reaps and cleans up."""
        if self.proc is not None and self.proc.poll() is None and self.qmp.connected:
            with contextlib.suppress(Exception):
                self.qmp.cmd("quit", timeout=min(timeout, 5))
            self.wait(timeout)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            if self.wait(timeout) is None:
                self.proc.kill()
        return self._reap()

    def kill(self) -> int | None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        return self._reap()

    def _reap(self) -> int | None:
        self.qmp.close()
        rc = None
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                rc = self.proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None
        with _live_lock:
            _live.discard(self)
        if self._own_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return rc

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

