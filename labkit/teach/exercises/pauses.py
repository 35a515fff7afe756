"""Exercise 1 (notebook exercises/01): which mode pauses the guest least, measured on real migrations."""

from __future__ import annotations

from typing import Any

from labkit.lab.engine import MODES, migrate
from labkit.qemu_syntax import format_ms, human_size
from labkit.teach.exercises.checking import (
    Check,
    _measured,
    _mode,
    _never_raises,
    _on,
    _pause_band,
    _table,
)


def measure_pauses(
    ram: str = "256M", dirty_rate: str = "64M", max_bandwidth: str = "256M", seed: int = 1,
    backend: str = "emulated",
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """One migration per mode of the same guest; the guest-visible pause (STOP to RESUME) of each, with
    its band (the lowest and highest of the run's three pause measures)."""

    def run() -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for mode in MODES:
            r = migrate(mode=mode, ram=ram, dirty_rate=dirty_rate, max_bandwidth=max_bandwidth, seed=seed,
                        backend=backend)  # fmt: skip
            pause = r.pause_ms.get("events")
            if pause is None:
                pause = r.pause_ms.get("reported")
            out[mode] = {"status": r.status, "pause_ms": pause, "band_ms": _pause_band(r),
                         "total_ms": r.total_ms, "main": r.bytes["main"]}  # fmt: skip
        return out

    return _measured(("pauses", ram, dirty_rate, max_bandwidth, seed, backend), run)


@_never_raises("which-mode-pauses-least", "Write one of 'normal', 'cpr-reboot', 'cpr-transfer'.")
def check_least_pause(
    answer: Any, ram: str = "256M", dirty_rate: str = "64M", max_bandwidth: str = "256M", seed: int = 1,
    backend: str = "emulated",
) -> Check:  # fmt: skip
    """Which mode pauses a busy guest least? Measured: one migration per mode, same guest, same seed; any
    mode whose pause band overlaps the least one's is right too (the run cannot tell them apart)."""
    mode = _mode(answer)
    m = measure_pauses(ram, dirty_rate, max_bandwidth, seed, backend)
    done = {k: v for k, v in m.items() if v["status"] == "completed" and v["pause_ms"] is not None}
    least = min(done, key=lambda k: done[k]["pause_ms"]) if done else None
    tied = [k for k in done if least and done[k]["band_ms"][0] <= done[least]["band_ms"][1]]
    rows = [
        (k, v["status"], format_ms(v["pause_ms"], 1),
         f"{v['band_ms'][0]:.1f}–{v['band_ms'][1]:.1f} ms" if v["band_ms"] else "n/a",
         format_ms(v["total_ms"], 1), human_size(v["main"] or 0))
        for k, v in m.items()
    ]  # fmt: skip
    table = _table(("mode", "status", "pause (STOP→RESUME)", "band", "total", "main channel"), rows)
    ok = mode in tied
    if least is None:
        lead = "No mode completed on this run: `clear_cache()` and check again."
    elif len(tied) > 1:
        lead = (f"On this run **{least}** paused least, but {', '.join(tied)} overlap within the run's own "
                "spread (band: the lowest to highest of QEMU's downtime, the events' STOP→RESUME and the "
                "guest's own gap), so each of them counts as right.")  # fmt: skip
    else:
        lead = f"On this run **{least}** paused least, clear of the others' bands."
    reasons = {
        "cpr-transfer": "cpr-transfer pauses only to send device state: guest RAM stays in the memfds, which "
        "the new process mapped before the guest stopped.",
        "normal": "normal pre-copy pauses to send the pages the guest dirtied during the last pass, sized to "
        "fit the downtime limit.",
        "cpr-reboot": "cpr-reboot pauses for everything: save RAM to a file, quit, start a new process, "
        "restore.",
    }
    ranked = sorted(done, key=lambda k: done[k]["pause_ms"])
    why = " ".join(reasons[k] for k in ranked) + (
        " (total is query-migrate's total-time on the old process: for cpr-reboot it ends when the file is "
        "written, before the restart that the pause includes.)"
    )
    return Check(
        "which-mode-pauses-least", ok, True,
        f"{lead} A {ram} guest writing {dirty_rate}/s over a {max_bandwidth}/s link, seed {seed}, on "
        f"{_on(backend)}, fastest pause first:\n\n{table}\n\n{why}",
        answer=mode, expected=tied, measured=m,
    )  # fmt: skip
