"""What every figure shares: colours, a run's conditions in words for titles, and the clock its time axes
count from (the first event), so the timeline, the sequence diagram and the zooms read alike."""

from __future__ import annotations

from labkit.lab.report import Result
from labkit.qemu_syntax import human_size

# phase bands: every default colour but red, which means "guest paused" in every figure here
PHASE_COLOURS = ("C0", "C1", "C2", "C4", "C5", "C6", "C7", "C8", "C9")
MODE_COLOURS = {"normal": "tab:orange", "cpr-reboot": "tab:green", "cpr-transfer": "tab:blue"}


def _human(n: float) -> str:
    return human_size(n, ".3g")  # "1 GiB" in a title, where human_size's default says "1.0 GiB"


def conditions(result: Result) -> str:
    """The run's conditions in human units, for titles: "cpr-transfer, 1 GiB, guest writing 256 MiB/s"."""
    guest = f"guest writing {_human(result.dirty_rate)}/s" if result.dirty_rate else "idle guest"
    return f"{result.mode}, {_human(result.ram_bytes)}, {guest}, {result.backend} backend"


def _t0(result: Result) -> float:
    """The first event's time: every time axis counts from it (the timeline's own clock is arbitrary)."""
    return min((r.t_ms for r in result.timeline), default=0.0)


def _pause_window(result: Result) -> tuple[float, float] | None:
    """The guest's pause on the timeline's clock: the source's STOP to the destination's RESUME."""
    stop = next((r.t_ms for r in result.timeline if r.side == "source" and r.kind == "STOP"), None)
    resume = next((r.t_ms for r in result.timeline if r.side == "destination" and r.kind == "RESUME"), None)
    return (stop, resume) if stop is not None and resume is not None and resume >= stop else None


# how each kind of timeline row is drawn: (marker, colour, size, legend text)
