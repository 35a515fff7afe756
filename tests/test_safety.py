"""The safety lessons of notebook 05, on real processes: `cont` on the old process after a handoff corrupts
the guest and the guest's own check catches it; a source killed after handing over its fds leaves the RAM
alive and the VM lost; a cancel while the source waits for the hang-up leaves the source as it was."""

from __future__ import annotations

import pytest

from labkit.teach.stories import cancel_during_hangup_wait, cont_after_handoff, source_dies_after_handoff


def _seen(frame, sent: str) -> list:
    return list(frame[frame["sent / looked at"] == sent]["came back"])


@pytest.mark.timeout(120)
def test_cont_on_the_old_process_after_handoff_is_caught_by_the_guests_own_check():
    steps = cont_after_handoff(ram="32M", dirty_rate="32M", run_for=0.5)
    assert _seen(steps, "x-labkit-verify (before)") == [True]
    assert _seen(steps, "query-status")[-1] == "running"  # QEMU lets the old process run again
    assert _seen(steps, "the same ram0 memfd (inode)?") == [True]
    assert _seen(steps, "x-labkit-verify (after)")[0].startswith("FAILED")


@pytest.mark.timeout(120)
def test_a_source_killed_after_handoff_leaves_the_ram_but_not_the_vm():
    steps = source_dies_after_handoff(ram="32M", wait=0.3)
    assert _seen(steps, "still holds guest RAM (same ram0 inode)?") == [True]
    assert _seen(steps, "x-labkit-verify (the RAM itself)")[0].startswith("ok")
    assert set(_seen(steps, "query-status")) == {"inmigrate"}  # no device state: it can never run the guest


@pytest.mark.timeout(120)
def test_cancel_while_waiting_for_the_hang_up_leaves_the_source_running():
    steps = cancel_during_hangup_wait(ram="32M")
    assert _seen(steps, "query-migrate")[-1] == "cancelled"
    assert "running" in _seen(steps, "query-status")
    assert all(v.startswith("ok") for v in _seen(steps, "x-labkit-verify"))
    assert _seen(steps, "holds the source's ram0 memfd (same inode)?") == [True]
