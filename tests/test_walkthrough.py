"""Stepping cpr-transfer on QEMU's own holds (pause-before-switchover on the source, -S on the destination):
the same story on the emulator and on real QEMU 10, STOP, then device state, then RESUME, each seen apart."""

from __future__ import annotations

import pytest

from labkit.host.runners.qemu import qemu_missing
from labkit.lab.breakdown import compare_steps
from labkit.lab.engine import migrate
from labkit.teach.walkthrough import (
    BackendComparison,
    check_comparison,
    compare_backends,
    step_through_switchover,
)

_MISSING = qemu_missing()


def _check(walk) -> None:
    assert walk.error is None, walk.error
    held = walk.holds_frame().set_index("step")
    rows = list(held.index)
    assert len(rows) == 5
    stopped, loaded, resumed = (held.loc[rows[i]] for i in (2, 3, 4))
    # held by pause-before-switchover: the guest is stopped, nothing loaded yet, no RESUME anywhere
    assert (stopped.source_runstate, stopped.source_status) == ("finish-migrate", "pre-switchover")
    assert stopped.destination_runstate == "inmigrate"
    assert stopped.events_so_far == ["STOP"]
    # held by -S: the device state has arrived, the guest is still paused
    assert (loaded.source_runstate, loaded.source_status) == ("postmigrate", "completed")
    assert (loaded.destination_runstate, loaded.destination_status) == ("paused", "completed")
    assert loaded.events_so_far == ["STOP"]
    # cont: RESUME, and the guest's memory is what it wrote
    assert resumed.destination_runstate == "running"
    assert resumed.events_so_far == ["STOP", "RESUME"]
    assert walk.guest_verified is True
    sent = [t["execute"] for t in walk.transcript if "execute" in t]
    assert sent.index("migrate-continue") < sent.index("cont")
    assert "-S" in walk.argv["destination"] and "-S" not in walk.argv["source"]
    assert "-> source" in walk.transcript_text() and "event RESUME" in walk.transcript_text()


@pytest.mark.timeout(90)
def test_step_through_switchover_on_the_emulator():
    _check(step_through_switchover(backend="emulated", ram="64M"))


@pytest.mark.qemu
@pytest.mark.skipif(_MISSING is not None, reason=f"{_MISSING}")
@pytest.mark.timeout(120)
def test_step_through_switchover_on_real_qemu():
    walk = step_through_switchover(backend="qemu", ram="256M")
    _check(walk)
    assert walk.argv["source"][0].endswith("qemu-system-x86_64")


def _check_comparison(cmp, backends) -> None:
    """Both runs completed with the guest's memory verified; each backend's steps add up to its own pause, and
    `longer` and `widest_step` say what the numbers say."""
    assert list(cmp.results) == list(backends)
    for b, r in cmp.results.items():
        assert r.status == "completed" and r.guest_verified is True, (b, r.error)
        assert cmp.steps[b].sum() == pytest.approx(r.pause_ms["events"], abs=0.01), b
    pauses = {b: r.pause_ms["events"] for b, r in cmp.results.items()}
    assert pauses[cmp.longer] == max(pauses.values())
    diff = (cmp.steps[backends[1]] - cmp.steps[backends[0]]).abs()
    widest = cmp.steps.loc[diff.idxmax(), "step"]
    assert widest.endswith(" -> " + cmp.widest_step)
    assert list(cmp.steps["step"])[0].startswith("STOP -> ") and list(cmp.steps["step"])[-1].endswith(
        "RESUME"
    )


@pytest.mark.timeout(90)
def test_comparison_logic_on_two_emulated_runs():
    """The comparison's own logic where QEMU is absent: two real emulated runs (cpr-transfer and normal, whose
    pauses differ) compared step by step as the two backends are."""
    runs = {
        m: migrate(mode=m, ram="64M", dirty_rate="16M", max_bandwidth="1G")
        for m in ("cpr-transfer", "normal")
    }
    cmp = BackendComparison(runs, compare_steps({m: r.pause_breakdown for m, r in runs.items()}))
    _check_comparison(cmp, ("cpr-transfer", "normal"))
    right = check_comparison(cmp, cmp.longer, cmp.widest_step)
    wrong = check_comparison(cmp, "no-such-backend", "no-such-checkpoint")
    empty = check_comparison(cmp, ..., ...)
    assert [v.verdict for v in right] == ["right", "right"]
    assert [v.verdict for v in wrong] == ["not quite", "not quite"]
    assert [v.verdict for v in empty] == ["not answered yet", "not answered yet"]
    assert "took longer in that step" in right[1].why and right[0].why.startswith(cmp.longer)


@pytest.mark.qemu
@pytest.mark.skipif(_MISSING is not None, reason=f"{_MISSING}")
@pytest.mark.timeout(120)
def test_compare_backends_on_the_emulator_and_real_qemu():
    cmp = compare_backends(ram="64M", dirty_rate="16M")
    _check_comparison(cmp, ("emulated", "qemu"))
    assert cmp.results["qemu"].backend == "qemu" and cmp.results["emulated"].backend == "emulated"
    assert [v.verdict for v in check_comparison(cmp, cmp.longer, cmp.widest_step)] == ["right", "right"]
