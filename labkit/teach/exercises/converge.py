"""Exercise 3 (notebook exercises/03): does a pre-copy converge? The model decides, a run confirms."""

from __future__ import annotations

from typing import Any

from labkit.lab.scenario import Backend
from labkit.qemu_syntax import human_size, parse_size
from labkit.teach.exercises.checking import (
    Check,
    _measured,
    _never_raises,
    _on,
    _yes_no,
)


def converge_model(ram: str, dirty_rate: str, max_bandwidth: str, downtime_limit: int) -> dict[str, Any]:
    """The pre-copy model: with r = dirty rate / bandwidth < 1, pass i sends about M·r^i, a shrinking
    series, so what is left soon fits in the downtime limit; with r >= 1 it never shrinks, and pre-copy only
    ends if the whole RAM fits in what the link sends within the limit. `seconds` is how long a converging
    run should take (the series' sum over the bandwidth), which sets how long the check waits."""
    size, dirty, bandwidth = parse_size(ram, "m"), parse_size(dirty_rate), parse_size(max_bandwidth)
    r, budget = dirty / bandwidth, bandwidth * downtime_limit / 1000
    fits = size <= budget
    converges = r < 1 or fits
    seconds = size / bandwidth / (1 - r) if r < 1 else size / bandwidth
    return {"r": r, "budget": budget, "fits": fits, "converges": converges, "seconds": seconds}


@_never_raises("does-it-converge", "Write True (it converges) or False (it never does).")
def check_converges(
    answer: Any, ram: str = "64M", dirty_rate: str = "256M", max_bandwidth: str = "128M",
    downtime_limit: int = 300, passes: int = 6, seed: int = 1, backend: Backend = "emulated",
) -> Check:  # fmt: skip
    """Does a normal migration of this guest converge? Measured: pre-copy watched until it completes, for
    at least four times as long as the model says a converging run needs, or for `passes` passes when the
    model says it never will; then cancelled."""
    from labkit.measure.sweeps import watch_precopy

    predicted = _yes_no(answer)
    model = converge_model(ram, dirty_rate, max_bandwidth, downtime_limit)
    wait = max(20.0, 4 * model["seconds"] + 5)
    w = _measured(
        ("converge", ram, dirty_rate, max_bandwidth, downtime_limit, passes, seed, backend),
        lambda: watch_precopy(
            ram=ram, dirty_rate=dirty_rate, max_bandwidth=max_bandwidth, downtime_limit=downtime_limit,
            passes=10_000 if model["converges"] else passes, timeout=wait, seed=seed, backend=backend,
        ),
    )  # fmt: skip
    last = w.samples.iloc[-1]
    syncs = int(last["dirty_sync_count"] or 0)
    r, budget = w.ratio, human_size(model["budget"])
    law = f"r = dirty rate / bandwidth = {human_size(w.dirty_rate)}/s ÷ {human_size(w.max_bandwidth)}/s = {r:.2f}"
    if w.converged:
        seen = f"It **converged**: completed after {syncs} dirty-bitmap syncs."
        why = (
            f"{law} < 1: pass i sends about M·r^i, a shrinking series; once what is left fits in the downtime "
            f"limit ({downtime_limit} ms at {human_size(w.max_bandwidth)}/s = {budget}), the guest stops and "
            "the rest is copied."
            if r < 1
            else f"{law} ≥ 1, so the dirty set never shrinks, but the whole {ram} fits in what the link sends "
            f"within the {downtime_limit} ms limit ({budget}): the first pass that ends finds the rest small "
            "enough to stop and copy."
        )
        expected = True
    elif model["converges"] and syncs < passes:
        seen = (
            f"It had **not finished** after {float(last['t_s']):.0f} s ({syncs} syncs, still `{last['status']}`), "
            f"though the model expects about {model['seconds']:.1f} s. That says this machine is busy, not that "
            "pre-copy diverges: `clear_cache()` and check again."
        )  # fmt: skip
        why, expected = law + ".", None
    else:
        seen = (
            f"It did **not converge**: still `{last['status']}` after {syncs} passes, expected-downtime "
            f"{last['expected_downtime_ms']} ms against a limit of {downtime_limit} ms; after `migrate_cancel` "
            f"the source says `{w.after_cancel.get('migration status')}`, runstate "
            f"`{w.after_cancel.get('source runstate')}`, guest memory verified: "
            f"{w.after_cancel.get('guest memory verified')}."
        )
        why = (
            f"{law} ≥ 1: each pass takes as long as the last and the guest dirties at least as much again "
            f"meanwhile, and the whole {ram} is more than the link sends within the limit ({budget}): what is "
            "left never fits, so pre-copy goes on until cancelled."
            if r >= 1
            else f"{law} < 1, yet what was left never fit in the limit ({budget}) here: the guest's pattern "
            "re-dirtied pages faster than the rate suggests."
        )
        expected = False
    return Check(
        "does-it-converge", expected is not None and predicted == expected, True,
        f"A {ram} guest writing {dirty_rate}/s at max-bandwidth {max_bandwidth}/s, downtime limit "
        f"{downtime_limit} ms, on {_on(backend)}: {seen}\n\n{why}",
        answer=predicted, expected=expected, measured={"samples": w.samples, "after_cancel": w.after_cancel},
    )  # fmt: skip
