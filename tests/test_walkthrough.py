"""Stepping cpr-transfer on QEMU's own holds (pause-before-switchover on the source, -S on the destination):
the same story on the emulator and on real QEMU 10, STOP, then device state, then RESUME, each seen apart."""

from __future__ import annotations

import pytest

from labkit.backends.qemu import qemu_missing
from labkit.walkthrough import step_through_switchover

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
