"""Exercise 2 (notebook exercises/02): the bytes each mode sends on the main channel, to an order of magnitude."""

from __future__ import annotations

import math
from typing import Any

from labkit.lab.engine import migrate
from labkit.qemu_syntax import human_size, parse_size
from labkit.teach.exercises.checking import (
    Check,
    _measured,
    _never_raises,
    _on,
    _per_mode,
    _size,
    _table,
)

BYTES_FACTOR = 10  # the question asks for an order of magnitude


def measure_bytes(
    ram: str = "256M", dirty_rate: str = "32M", seed: int = 1, backend: str = "emulated"
) -> dict[str, dict[str, Any]]:
    def run() -> dict[str, dict[str, Any]]:
        out = {}
        for mode in ("cpr-transfer", "normal"):
            # the guest has written all its RAM once, as a guest that has used its memory (the real guest's
            # unwritten pages are filled through its memfd): untouched pages would travel as zero-page markers
            r = migrate(mode=mode, ram=ram, dirty_rate=dirty_rate, seed=seed, backend=backend,
                        prefill=True)  # fmt: skip
            out[mode] = {"status": r.status, "main": r.bytes["main"], "cpr": r.bytes["cpr"]}
        return out

    return _measured(("bytes", ram, dirty_rate, seed, backend), run)


@_never_raises(
    "main-channel-bytes", "Write {'cpr-transfer': SIZE, 'normal': SIZE}: bytes as a number, or with K, M, G."
)
def check_main_channel_bytes(
    answer: Any, ram: str = "256M", dirty_rate: str = "32M", seed: int = 1, backend: str = "emulated"
) -> Check:
    """How many bytes cross the main channel in each mode? Right within a factor of ten (order of magnitude)
    of what the backend used measured."""
    predicted = {k: _size(v) for k, v in _per_mode(answer, ("cpr-transfer", "normal")).items()}
    m = measure_bytes(ram, dirty_rate, seed, backend)
    rows, ok = [], True
    for mode in ("cpr-transfer", "normal"):
        got, guess = m[mode]["main"] or 0, predicted[mode]
        if got <= 0 or guess <= 0:
            close = got == guess
        else:
            close = abs(math.log10(guess / got)) <= math.log10(BYTES_FACTOR)
        ok = ok and close and m[mode]["status"] == "completed"
        verdict = "✓ same order of magnitude" if close else f"✗ off by {_factor(guess, got)}"
        rows.append((mode, f"{guess:,} B ({human_size(guess)})", f"{got:,} B ({human_size(got)})", verdict))
    table = _table(("mode", "your prediction", "measured", ""), rows)
    cpr, ram_bytes, normal = m["cpr-transfer"]["cpr"], parse_size(ram), m["normal"]["main"] or 0
    why = (
        f"cpr-transfer's main channel carried {m['cpr-transfer']['main']:,} B: a header, a RAM section that "
        f"lists the blocks but carries no pages, and the device state, whatever the RAM size. The RAM itself "
        f"does not move: its fds cross the cpr channel ({cpr} B of CPR state, the fds in SCM_RIGHTS). normal "
        f"pre-copy sent {normal / ram_bytes:.2f}× the guest's {human_size(ram_bytes)}: every page at least "
        "once, plus every page dirtied meanwhile."
    )
    return Check(
        "main-channel-bytes", ok, True,
        f"A {ram} guest writing {dirty_rate}/s, seed {seed}, on {_on(backend)}:\n\n{table}\n\n{why}",
        answer=predicted, expected={k: v["main"] for k, v in m.items()}, measured=m,
    )  # fmt: skip


def _factor(guess: int, got: int) -> str:
    if guess <= 0 or got <= 0:
        return "a zero"
    f = max(guess / got, got / guess)
    return f"a factor of {f:,.0f} ({'too high' if guess > got else 'too low'})"
