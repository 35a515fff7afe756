"""Run states: QEMU's names and transition table (system/runstate.c), and what `stop` does to each state.

The table is checked move by move against QEMU 10's runstate_transitions_def, and the one place where the
emulator's `stop` could leave QEMU's table (a VM that is not running) is checked on labkit-vm and, where it is
installed, on qemu-system-x86_64 itself: both must keep `prelaunch`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import pytest

from labkit.errors import LabkitError
from labkit.host.runners.qemu import qemu_missing
from labkit.vm import runstate as rs

pytestmark = pytest.mark.timeout(60)


def test_the_names_are_qapi_run_state_json():
    assert rs.RUN_STATES == (
        "debug", "inmigrate", "internal-error", "io-error", "paused", "postmigrate", "prelaunch",
        "finish-migrate", "restore-vm", "running", "save-vm", "shutdown", "suspended", "watchdog",
        "guest-panicked", "colo",
    )  # fmt: skip
    assert set(rs.TRANSITIONS) == set(rs.RUN_STATES)
    assert all(to <= set(rs.RUN_STATES) for to in rs.TRANSITIONS.values())
    assert sum(len(to) for to in rs.TRANSITIONS.values()) == 85  # QEMU 10.0's table, its one duplicate once
    assert rs.parse_runstate("finish-migrate") == rs.FINISH_MIGRATE
    assert rs.parse_runstate("Running") is None and rs.parse_runstate("") is None


@pytest.mark.parametrize(
    "old, new",
    [
        ("prelaunch", "running"),  # -S, then cont
        ("prelaunch", "inmigrate"),
        ("inmigrate", "running"),  # the destination resumes after loading
        ("inmigrate", "paused"),  # ... or stays paused (-S on the source, or `stop` while incoming)
        ("running", "finish-migrate"),  # migration stops the source
        ("paused", "finish-migrate"),
        ("finish-migrate", "postmigrate"),  # completed
        ("finish-migrate", "running"),  # failed or cancelled: the source runs on
        ("postmigrate", "running"),  # `cont` on a migrated source
        ("running", "paused"),
        ("paused", "running"),
    ],
)
def test_moves_the_emulator_makes_are_in_qemus_table(old, new):
    state = rs.RunState(old)
    seen = []
    state.on_change = lambda o, n: seen.append((o, n))
    state.set(new)
    assert state.state == new and seen == [(old, new)]
    assert state.running == (new == "running")


@pytest.mark.parametrize(
    "old, new",
    [
        ("prelaunch", "paused"),  # `stop` before the first `cont`: QEMU keeps prelaunch instead
        ("postmigrate", "paused"),  # `stop` after migration: QEMU keeps postmigrate
        ("running", "inmigrate"),  # a running VM cannot become a migration target
        ("postmigrate", "inmigrate"),
        ("shutdown", "running"),  # only allowed while replaying a record
        ("paused", "shutdown"),
        ("inmigrate", "restore-vm"),
    ],
)
def test_moves_qemu_aborts_on_are_refused(old, new):
    state = rs.RunState(old)
    seen = []
    state.on_change = lambda o, n: seen.append((o, n))
    with pytest.raises(rs.RunStateError) as e:
        state.set(new)
    assert str(e.value) == f"invalid runstate transition: '{old}' -> '{new}'"  # runstate_set()'s text
    assert (e.value.old, e.value.new) == (old, new)
    assert isinstance(e.value, LabkitError)
    assert state.state == old and seen == []


def test_staying_put_is_always_allowed():
    for name in rs.RUN_STATES:
        assert rs.transition_allowed(name, name)
        assert name not in rs.TRANSITIONS[name]  # QEMU's table never lists it: runstate_set() returns early


# ------------------------------------------------------------------------------------------ on a live VM


def _start(argv: list[str], sock: str) -> tuple[subprocess.Popen[bytes], object]:
    from qemu.qmp.legacy import QEMUMonitorProtocol

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), *sys.path]))
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    )
    deadline = time.monotonic() + 30
    while True:
        qmp = QEMUMonitorProtocol(sock)
        try:
            qmp.connect()
            return proc, qmp
        except Exception:
            qmp.close()
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                assert proc.stderr is not None
                err = proc.stderr.read().decode()
                proc.stderr.close()
                pytest.fail(f"{argv[0]} did not open its monitor: {err}")
            time.sleep(0.05)


def _status(qmp) -> str:
    return qmp.cmd("query-status")["status"]


PROGRAMS = {
    "labkit-vm": [sys.executable, "-m", "labkit.vm", "-m", "64M"],
    "qemu": ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-m", "64M", "-display", "none"],
}


@pytest.mark.parametrize("program", ["labkit-vm", pytest.param("qemu", marks=pytest.mark.qemu)])
def test_stop_keeps_a_vm_that_is_not_running_in_its_state(program, tmp_path):
    """do_vm_stop() only stops a live VM: `stop` under -S leaves prelaunch (no STOP event), `cont` runs it,
    and a second `stop` on a paused VM changes nothing. Observed on QEMU 10.0.2; labkit-vm must agree."""
    if program == "qemu" and (why := qemu_missing()):
        pytest.skip(why)
    sock = str(tmp_path / "qmp.sock")
    argv = [*PROGRAMS[program], "-S", "-nodefaults", "-qmp", f"unix:{sock},server=on,wait=off"]
    proc, qmp = _start(argv, sock)
    try:
        assert _status(qmp) == "prelaunch"
        qmp.cmd("stop")
        assert _status(qmp) == "prelaunch"
        qmp.cmd("cont")
        assert _status(qmp) == "running"
        qmp.cmd("stop")
        assert _status(qmp) == "paused"
        qmp.cmd("stop")
        assert _status(qmp) == "paused"
        events = [e["event"] for e in qmp.get_events(wait=False)]
        assert events.count("STOP") == 1 and events.count("RESUME") == 1
        qmp.cmd("quit")
    finally:
        with contextlib.suppress(EOFError, OSError):  # after `quit` real QEMU has already hung up
            qmp.close()
        try:
            proc.wait(20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stderr:
                proc.stderr.close()
