"""The notebooks' QMP stories: refusals, -incoming defer ordering, a destination killed mid-way, cpr-reboot."""

from __future__ import annotations

import pytest

from labkit.teach.stories import (
    cpr_reboot_walkthrough,
    defer_walkthrough,
    destination_dies,
    file_channel,
    port_zero_walkthrough,
    ram0_inodes,
    try_migrate,
    unix_channel,
)

pytestmark = pytest.mark.timeout(90)


def test_file_main_channel_refused_and_source_runs_on(tmp_path):
    a = try_migrate(
        {"channels": [file_channel(str(tmp_path / "f")), unix_channel(str(tmp_path / "c"), "cpr")]}
    )
    assert a.error == "Migration requires streamable transport (eg unix)"
    assert (a.status, a.runstate, a.guest_verified) == ("none", "running", True)


def test_inet_port_0_is_not_refused_the_source_fails_to_connect():
    rows = port_zero_walkthrough(ram="32M")
    src = rows[rows["to"] == "source"].set_index("sent / looked at")["came back"]
    assert src["query-migrate"] == {
        "status": "failed",
        "error-desc": "Failed to connect to '127.0.0.1:0': Connection refused",
    }
    assert src["migrate channels=[main tcp 127.0.0.1:0, cpr]"].startswith("{} (accepted")
    assert src["query-status"] == "running" and src["x-labkit-verify (guest memory)"] is True
    dst = rows[rows["to"] == "destination"].set_index("sent / looked at")["came back"]["query-migrate"]
    assert dst["status"] == "setup" and dst["socket-address"][0]["port"] != "0"


def test_defer_walkthrough_order():
    steps = defer_walkthrough(ram="32M")
    seen = dict(zip(steps["sent / looked at"], steps["came back"], strict=False))
    assert seen["does its QMP socket exist?"] is False
    assert seen["connect to QMP (1 s)"].startswith("cannot connect")
    assert seen["connect to QMP"] == "connected"
    assert list(steps["came back"])[-3:] == ["completed", "running", True]


@pytest.mark.parametrize(
    "mode,phase,text", [("normal", 3, "Unable to write"), ("cpr-transfer", 4, "Failed to connect")]
)
def test_destination_dies_source_fails_and_runs_on(mode, phase, text):
    phases, r = destination_dies(mode, after_phase=phase, ram="32M", dirty_rate="8M")
    assert r.status == "failed" and text in r.query_migrate["error-desc"]
    assert r.states["source"] == "running" and r.guest_verified
    assert phases["phase"].iloc[-2] == "SIGKILL the destination"


@pytest.mark.parametrize("backend,same", [("memfd", False), ("file", True)])
def test_cpr_reboot_walkthrough(backend, same):
    phases, r = cpr_reboot_walkthrough(ram="32M", dirty_rate="8M", memory_backend=backend)
    assert list(phases["old process"])[:2] == ["running", "postmigrate"]
    assert list(phases["new process"])[-1] == "running"
    assert phases["state file bytes"].iloc[1] > 0
    assert r.status == "completed" and r.guest_verified
    assert ram0_inodes(r)["same inode"] is same
