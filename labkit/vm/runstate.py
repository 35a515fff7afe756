"""Run states, with QEMU's names (qapi/run-state.json) and QEMU 10's transition table (system/runstate.c).

`query-status` reports them; STOP and RESUME events mark the edges between running and not running. The table
is QEMU's whole runstate_transitions_def, not only the moves the emulator makes, so that a move QEMU would
abort on fails here too instead of passing unnoticed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Literal, get_args

from labkit.errors import LabkitError

# qapi/run-state.json's RunState, in QEMU's order
RunStateName = Literal[
    "debug",
    "inmigrate",
    "internal-error",
    "io-error",
    "paused",
    "postmigrate",
    "prelaunch",
    "finish-migrate",
    "restore-vm",
    "running",
    "save-vm",
    "shutdown",
    "suspended",
    "watchdog",
    "guest-panicked",
    "colo",
]
RUN_STATES: Final[tuple[RunStateName, ...]] = get_args(RunStateName)

# The states the emulator enters, as constants (QEMU's RUN_STATE_* names)
RUNNING: Final = "running"
PAUSED: Final = "paused"
PRELAUNCH: Final = "prelaunch"
INMIGRATE: Final = "inmigrate"
FINISH_MIGRATE: Final = "finish-migrate"
POSTMIGRATE: Final = "postmigrate"
SHUTDOWN: Final = "shutdown"
RESTORE_VM: Final = "restore-vm"

# runstate_transitions_def (QEMU 10.0): from -> the states it may move to; staying put is always allowed
TRANSITIONS: Final[dict[RunStateName, frozenset[RunStateName]]] = {
    "prelaunch": frozenset({"inmigrate", "suspended", "running", "finish-migrate"}),
    "debug": frozenset({"running", "finish-migrate", "prelaunch", "suspended"}),
    "inmigrate": frozenset(
        {
            "internal-error",
            "io-error",
            "paused",
            "running",
            "shutdown",
            "suspended",
            "watchdog",
            "guest-panicked",
            "finish-migrate",
            "prelaunch",
            "postmigrate",
            "colo",
        }
    ),
    "internal-error": frozenset({"paused", "finish-migrate", "prelaunch"}),
    "io-error": frozenset({"running", "finish-migrate", "prelaunch"}),
    "paused": frozenset({"running", "finish-migrate", "postmigrate", "prelaunch", "colo", "suspended"}),
    "postmigrate": frozenset({"running", "finish-migrate", "prelaunch"}),
    "finish-migrate": frozenset(
        {
            "running",
            "paused",
            "postmigrate",
            "prelaunch",
            "colo",
            "internal-error",
            "io-error",
            "shutdown",
            "suspended",
            "watchdog",
            "guest-panicked",
        }
    ),
    "restore-vm": frozenset({"running", "prelaunch", "suspended"}),
    "colo": frozenset({"running", "prelaunch", "shutdown"}),
    "running": frozenset(
        {
            "debug",
            "internal-error",
            "io-error",
            "paused",
            "finish-migrate",
            "restore-vm",
            "save-vm",
            "shutdown",
            "watchdog",
            "guest-panicked",
            "colo",
            "suspended",
        }
    ),
    "save-vm": frozenset({"running", "suspended"}),
    "shutdown": frozenset({"paused", "finish-migrate", "prelaunch", "colo"}),
    "suspended": frozenset(
        {"running", "finish-migrate", "prelaunch", "colo", "paused", "save-vm", "restore-vm", "shutdown"}
    ),
    "watchdog": frozenset({"running", "finish-migrate", "prelaunch", "colo"}),
    "guest-panicked": frozenset({"running", "finish-migrate", "prelaunch"}),
}


def parse_runstate(name: str) -> RunStateName | None:
    """qapi_enum_parse() for RunState: the state named ``name``, or None if QEMU has no such state."""
    for state in RUN_STATES:
        if state == name:
            return state
    return None


def transition_allowed(old: RunStateName, new: RunStateName) -> bool:
    """runstate_set()'s check: staying put is a no-op, any other move must be in QEMU's table."""
    return new == old or new in TRANSITIONS[old]


class RunStateError(LabkitError):
    """A move QEMU's table does not allow: QEMU aborts on it, so it is a bug in the emulator."""

    def __init__(self, old: RunStateName, new: RunStateName):
        super().__init__(f"invalid runstate transition: '{old}' -> '{new}'")
        self.old = old
        self.new = new


class RunState:
    """The current run state and its legal moves; an illegal move is a bug, as QEMU aborts on one."""

    def __init__(self, initial: RunStateName):
        self.state: RunStateName = initial
        self.on_change: Callable[[RunStateName, RunStateName], None] | None = None  # (old, new), after each set

    def set(self, new: RunStateName) -> None:
        if not transition_allowed(self.state, new):
            raise RunStateError(self.state, new)
        old, self.state = self.state, new
        if self.on_change is not None:
            self.on_change(old, new)

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    def __str__(self) -> str:
        return self.state
