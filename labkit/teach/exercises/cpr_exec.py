"""Exercise 7 (notebook exercises/07): cpr-exec keeps the PID; what fills its pause."""

from __future__ import annotations

from typing import Any

from labkit.host.runners import get_runner
from labkit.lab.engine import migrate
from labkit.qemu_syntax import format_ms
from labkit.teach.exercises.checking import (
    Check,
    _BadAnswer,
    _measured,
    _never_raises,
    _pause_band,
    _same_or_different,
    _table,
)


def _startup_or_rest(answer: Any) -> str:
    text = str(answer).strip().lower().replace("_", "-")
    if text in ("start-up", "startup", "start up", "new program", "the new program's start-up"):
        return "start-up"
    if text in ("rest", "the rest", "everything else", "state", "saving and loading"):
        return "the rest"
    raise _BadAnswer(f"`{answer!r}`: write 'start-up' or 'the rest'")


def measure_cpr_exec(ram: str = "64M", seed: int = 1, dirty_rate: str = "16M") -> dict[str, Any]:
    """One cpr-exec migration: PIDs, and the pause cut into the new program's start-up and everything else;
    `spread_ms` is how far the run's own pause measures (events, guest) disagree."""
    from labkit.measure.pause_breakdown import new_process_window

    def run() -> dict[str, Any]:
        r = migrate(mode="cpr-exec", ram=ram, dirty_rate=dirty_rate, seed=seed)
        pause = r.pause_ms.get("events")
        window = new_process_window(r)
        inside = None
        if pause is not None and window is not None:
            inside = max(0.0, min(window[1], pause) - max(window[0], 0.0))
        band = _pause_band(r)
        return {
            "status": r.status,
            "pids": dict(r.pids),
            "pause_ms": pause,
            "spread_ms": None if band is None else round(band[1] - band[0], 3),
            "start_up_ms": None if inside is None else round(inside, 3),
            "rest_ms": None if inside is None or pause is None else round(pause - inside, 3),
            "verified": r.guest_verified,
        }

    return _measured(("cpr-exec", ram, seed, dirty_rate), run)


@_never_raises("cpr-exec-pause", "Write {'pid': 'same' or 'different', 'bigger': 'start-up' or 'the rest'}.")
def check_cpr_exec_pause(
    answer: Any, ram: str = "64M", seed: int = 1, dirty_rate: str = "16M", backend: str = "emulated"
) -> Check:
    """cpr-exec: does the guest keep its PID, and is its pause mostly the new program's start-up? When the
    two parts differ by less than the run's own spread, either answer is right."""
    if not isinstance(answer, dict) or set(answer) != {"pid", "bigger"}:
        raise _BadAnswer("write a dict with the keys 'pid' and 'bigger'")
    pid_same = _same_or_different(answer["pid"])
    bigger = _startup_or_rest(answer["bigger"])
    refusal = get_runner(backend).refusal("cpr-exec")
    if refusal is not None:
        return Check("cpr-exec-pause", False, True, f"Not on {get_runner(backend).description} here: {refusal}")
    m = measure_cpr_exec(ram, seed, dirty_rate)
    if m["status"] != "completed" or m["start_up_ms"] is None:
        return Check("cpr-exec-pause", False, True, f"The migration did not complete here: {m}", measured=m)
    same = m["pids"]["source"] == m["pids"]["destination"]
    gap = m["start_up_ms"] - m["rest_ms"]
    if abs(gap) <= (m["spread_ms"] or 0):
        allowed, measured_bigger = {"start-up", "the rest"}, "too close to call"
    else:
        measured_bigger = "start-up" if gap > 0 else "the rest"
        allowed = {measured_bigger}
    ok = pid_same == same and bigger in allowed
    table = _table(
        ("", "you said", "measured"),
        [
            ("PID", "same" if pid_same else "different", f"{m['pids']['source']} → {m['pids']['destination']}"),
            ("bigger part of the pause", bigger, measured_bigger),
            ("the new program's start-up", "", format_ms(m["start_up_ms"], 1)),
            ("everything else (stop, save, load, resume)", "", format_ms(m["rest_ms"], 1)),
            ("the run's own spread (events vs guest)", "", format_ms(m["spread_ms"], 1)),
        ],
    )
    why = (
        "cpr-exec replaces the program inside the same process (execvp): the PID stays, the fds that hold "
        "guest RAM stay open, and the kernel tears down the old program's mappings. The new program only "
        "starts *after* the guest stopped, so its whole start-up (here a Python interpreter and labkit's "
        "imports; in QEMU, the new binary's initialisation) is inside the pause"
        + (", and here it was the bigger part: saving and loading device state took milliseconds."
           if measured_bigger == "start-up" else
           f"; here the rest ({format_ms(m['rest_ms'], 1)}) weighed as much or more, so look at what the guest's "
           "dirty rate and the state saved add.")
        + " cpr-transfer starts the new process before the guest stops."
    )  # fmt: skip
    return Check(
        "cpr-exec-pause", ok, True, f"A {ram} guest writing {dirty_rate}/s, seed {seed}:\n\n{table}\n\n{why}",
        answer={"pid": "same" if pid_same else "different", "bigger": bigger},
        expected={"pid": "same" if same else "different", "bigger": sorted(allowed)}, measured=m,
    )  # fmt: skip
