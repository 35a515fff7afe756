"""Run states, with QEMU's names (qapi/run-state.json) and the transitions the lab uses (system/runstate.c).

`query-status` reports them; STOP and RESUME events mark the edges between running and not running.
"""

from __future__ import annotations

from collections.abc import Callable

RUNNING = "running"
PAUSED = "paused"
PRELAUNCH = "prelaunch"
INMIGRATE = "inmigrate"
FINISH_MIGRATE = "finish-migrate"
POSTMIGRATE = "postmigrate"
SHUTDOWN = "shutdown"
RESTORE_VM = "restore-vm"

# runstate_transitions_def, reduced to the states above
TRANSITIONS: dict[str, set[str]] = {
    PRELAUNCH: {RUNNING, FINISH_MIGRATE, INMIGRATE, PAUSED, SHUTDOWN},
    INMIGRATE: {RUNNING, PAUSED, SHUTDOWN, POSTMIGRATE, FINISH_MIGRATE, PRELAUNCH},
    RUNNING: {PAUSED, FINISH_MIGRATE, SHUTDOWN},
    PAUSED: {RUNNING, FINISH_MIGRATE, POSTMIGRATE, SHUTDOWN, PRELAUNCH},
    FINISH_MIGRATE: {RUNNING, PAUSED, POSTMIGRATE, SHUTDOWN},
    POSTMIGRATE: {RUNNING, FINISH_MIGRATE, PAUSED, SHUTDOWN},
    SHUTDOWN: {PAUSED, FINISH_MIGRATE, RUNNING},
    RESTORE_VM: {RUNNING, PAUSED},
}


class RunStateError(Exception):
    pass


class RunState:
    """The current run state and its legal moves; an illegal move is a bug, as QEMU aborts on one."""

    def __init__(self, initial: str):
        self.state = initial
        self.on_change: Callable[[str, str], None] | None = None  # (old, new), after each set

    def set(self, new: str) -> None:
        if new != self.state and new not in TRANSITIONS.get(self.state, set()):
            raise RunStateError(f"invalid runstate transition: '{self.state}' -> '{new}'")
        old, self.state = self.state, new
        if self.on_change is not None:
            self.on_change(old, new)

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    def __str__(self) -> str:
        return self.state
