"""QEMU's own trace points, read from a per-VM log file: the downtime checkpoints and the CPR steps.

QEMU 10.0.2 as Debian builds it has the "log" trace backend. Started with `-msg timestamp=on` and
`-trace enable=EVENT ... -trace file=LOG`, it writes one line per trace point:

    12345@1796171245.073156:vmstate_downtime_checkpoint src-vm-stopped

that is, the thread id, then gettimeofday() (CLOCK_REALTIME, microseconds; the code tracetool's log backend
generates in QEMU 10.0), then the event's name and its formatted arguments. Without `-msg timestamp=on` the
line has no time at all, so the option is needed; it also puts an ISO time in front of QEMU's own messages on
stderr. The times are wall-clock: the qemu backend moves them onto CLOCK_MONOTONIC with the same measured
offset it uses for QMP event timestamps (labkit.host.runners.qemu.wall_ns_to_monotonic_ns).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The trace points the qemu backend turns on. vmstate_downtime_checkpoint marks the pause (migration.c and
# savevm.c); vmstate_downtime_save/load time each device section while the guest is stopped; cpr_* follow
# the cpr channel; the two socket events mark the main channel's connect and accept.
TRACE_EVENTS = (
    "vmstate_downtime_checkpoint",
    "vmstate_downtime_save",
    "vmstate_downtime_load",
    "cpr_state_save",
    "cpr_state_load",
    "cpr_transfer_input",
    "cpr_transfer_output",
    "cpr_find_fd",
    "migration_socket_outgoing_connected",
    "migration_socket_incoming_accepted",
)
# the main channel's connect and accept: the pause breakdown counts them as checkpoints (labkit.lab.breakdown)
SOCKET_CHECKPOINTS = ("migration_socket_outgoing_connected", "migration_socket_incoming_accepted")
TRACE_LOG = "qemu-trace.log"  # in the VM's run dir

_LINE = re.compile(r"^(?P<tid>\d+)@(?P<sec>\d+)\.(?P<usec>\d{6}):(?P<name>\w+)(?: (?P<args>.*))?$")


@dataclass(frozen=True)
class TracePoint:
    """One line of QEMU's trace log: which thread, when (CLOCK_REALTIME ns), which event, its arguments."""

    tid: int
    wall_ns: int
    name: str
    args: str

    @property
    def checkpoint(self) -> str | None:
        """The checkpoint's name for vmstate_downtime_checkpoint (e.g. "src-vm-stopped"), else None."""
        return self.args.strip() if self.name == "vmstate_downtime_checkpoint" else None


def trace_argv(log_path: str, events: tuple[str, ...] = TRACE_EVENTS) -> list[str]:
    """QEMU options that write `events` to `log_path` with a time on each line. `file=` goes in its own last
    -trace option: each -trace option sets the output file anew, so one given earlier would be dropped."""
    argv = ["-msg", "timestamp=on"]
    for event in events:
        argv += ["-trace", f"enable={event}"]
    return argv + ["-trace", f"file={log_path}"]


_MSG_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z ", re.MULTILINE)


def strip_msg_timestamps(text: str) -> str:
    """QEMU's stderr messages without the time `-msg timestamp=on` puts in front of each
    ("2026-12-02T00:26:17.941936Z qemu-system-x86_64: ..."), so they read as QEMU prints them by default."""
    return _MSG_TIMESTAMP.sub("", text)


def parse_trace_line(line: str) -> TracePoint | None:
    """A TracePoint from one log line, or None for a line that is not a timed trace point (a partial last
    line being written, or a message QEMU logged without a time)."""
    m = _LINE.match(line.rstrip("\n"))
    if m is None:
        return None
    wall_ns = int(m["sec"]) * 1_000_000_000 + int(m["usec"]) * 1000
    return TracePoint(int(m["tid"]), wall_ns, m["name"], m["args"] or "")


def parse_trace_log(text: str) -> list[TracePoint]:
    """Every timed trace point in a log, in the order QEMU wrote them (QEMU serialises writes to the log)."""
    return [p for p in map(parse_trace_line, text.splitlines()) if p is not None]


def read_trace_log(path: str) -> list[TracePoint]:
    """The trace points written so far; none when the file does not exist (yet)."""
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        return []
    if not text.endswith("\n"):  # QEMU is writing the last line right now: leave it for the next read
        text = text.rsplit("\n", 1)[0] if "\n" in text else ""
    return parse_trace_log(text)
