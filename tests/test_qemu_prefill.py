"""The real guest's host-side prefill: an idle guest's RAM holds data, so pre-copy moves pages on both
backends alike (labkit bench's like-for-like comparison), and the guest still verifies after migrating."""

from __future__ import annotations

import pytest

from labkit.host.runners.qemu import qemu_missing
from labkit.lab.engine import migrate

_MISSING = qemu_missing()
pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(_MISSING is not None, reason=f"{_MISSING}"),
    pytest.mark.timeout(180),
]
RAM = 256 << 20


@pytest.mark.parametrize("prefill", [False, True])
def test_an_idle_real_guest_sends_its_ram_only_when_prefilled(prefill):
    r = migrate(backend="qemu", mode="normal", ram=RAM, dirty_rate=4096, prefill=prefill, warmup=0.1)
    assert r.status == "completed" and r.guest_verified, (r.error, r.verify)
    if prefill:  # all but the prefill's margin above the guest's cursor (16 MiB) and the firmware's holes
        assert r.bytes["main"] > 0.8 * RAM
    else:  # zero pages travel as flags
        assert r.bytes["main"] < 0.1 * RAM
