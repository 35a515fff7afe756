"""Scenario in, Result out: the Scenario is a frozen value, a Lab runs it, and a Result (carrying it and the
machine's facts) reads back from its own JSON unchanged."""

from __future__ import annotations

import dataclasses
import json

import pytest

from labkit.host.runners.qemu import qemu_missing
from labkit.lab.engine import MODE_PHASES, PHASES, Lab, migrate
from labkit.lab.progress import MigrationDetails, MigrationInfo
from labkit.lab.report import Result
from labkit.lab.scenario import ALL_MODES, LabError, Scenario

pytestmark = pytest.mark.timeout(120)
_QEMU_MISSING = qemu_missing()
_ON_QEMU = [pytest.mark.qemu, pytest.mark.skipif(_QEMU_MISSING is not None, reason=f"{_QEMU_MISSING}")]


def test_scenario_is_frozen_and_holds_sizes_in_bytes():
    s = Scenario(mode="normal", ram="64M", dirty_rate="16M", max_bandwidth="1G", working_set="8M")
    assert (s.ram, s.dirty_rate, s.max_bandwidth, s.working_set) == (64 << 20, 16 << 20, 1 << 30, 8 << 20)
    assert Scenario(ram=64).ram == 64  # an int is already bytes
    assert Scenario(ram="64").ram == 64 << 20  # a bare -m number is MiB, as QEMU reads it
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.ram = 1  # type: ignore[misc]
    assert s.with_(mode="cpr-transfer").mode == "cpr-transfer" and s.mode == "normal"
    assert Scenario.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_scenario_refuses_with_one_line():
    with pytest.raises(LabError, match="mode must be one of"):
        Scenario(mode="cpr-bogus")  # type: ignore[arg-type]
    with pytest.raises(LabError, match=r"dirty rate \(--dirty-rate\): invalid size"):
        Scenario(dirty_rate="fast")
    with pytest.raises(LabError, match="unknown setting colour"):
        Scenario.from_dict({"mode": "normal", "colour": "blue"})
    with pytest.raises(LabError, match="16.0 MiB to"):
        Scenario(ram="1K").check()  # what the host can honour is checked by check(), which the Lab calls


def test_each_mode_is_one_list_of_phases():
    assert set(MODE_PHASES) == set(ALL_MODES)
    for mode, plan in MODE_PHASES.items():
        assert [p.label for p in plan] == PHASES[mode]
        assert len({p.name for p in plan}) == len(plan), mode  # names are unique within a mode
        assert all(callable(p.action) for p in plan)


def test_lab_takes_a_scenario_and_the_result_round_trips_through_json():
    scenario = Scenario(mode="normal", ram="32M", dirty_rate="8M", warmup=0.1, seed=5)
    ran = scenario.with_(defer=False)  # the scenario as run: the lab's own choices (defer=None) resolved
    with Lab(scenario) as lab:
        assert lab.scenario == ran and lab.runner.name == "emulated"
        r = lab.run()
    assert r.status == "completed" and r.guest_verified, r.error
    assert r.scenario == ran and r.host is not None and r.host.cpus >= 1
    back = Result.from_json(r.to_json())
    assert back == r
    assert back.scenario == ran and back.host == r.host
    assert back.timeline == r.timeline and back.mappings == r.mappings
    row = r.flat()  # the settings ride along in a frame's row, by their Scenario names
    assert (row["max_bandwidth"], row["downtime_limit"], row["seed"]) == (10 << 30, 300, 5)
    again = migrate(back.scenario)  # a Result read back can be run again as it was
    assert again.scenario == ran and again.status == "completed"


def test_progress_parses_query_migrate_once():
    info = MigrationInfo.from_qmp(
        {"status": "completed", "total-time": 90, "setup-time": 5, "downtime": 3,
         "ram": {"transferred": 4096, "dirty-sync-count": 3, "precopy-bytes": 2048, "mbps": 1.5}}
    )  # fmt: skip
    assert info.finished and info.stats.dirty_sync_count == 3 and info.stats.precopy_bytes == 2048
    assert info.live_ms == 82 and info.raw["ram"]["transferred"] == 4096
    empty = MigrationInfo.from_qmp({})
    assert empty.status == "none" and empty.ram is None and empty.stats.transferred == 0
    details = MigrationDetails.from_qmp({"source": {"bytes-main": 10, "bytes-cpr": 7, "pages-per-pass": [1, 2]}})
    assert details is not None and (details.bytes_main, details.bytes_cpr, details.pages_per_pass) == (10, 7, [1, 2])
    assert MigrationDetails.from_qmp({}) is None


def test_runners_answer_by_capability_not_by_name():
    from labkit.host.runners import RunnerError, get_runner
    from labkit.host.runners.emulated import EmulatedRunner
    from labkit.host.runners.qemu import QemuRunner

    emulated, qemu = get_runner("emulated"), get_runner("qemu")
    assert isinstance(emulated, EmulatedRunner) and isinstance(qemu, QemuRunner)
    assert get_runner(emulated) is emulated
    assert emulated.can_hold and emulated.keeps_event_history and emulated.has_migration_details
    assert not (qemu.can_hold or qemu.keeps_event_history or qemu.has_migration_details)
    assert emulated.refusal("cpr-exec") is None and "cpr-exec" in (qemu.refusal("cpr-exec") or "")
    assert qemu.refusal("cpr-transfer") is None
    with pytest.raises(RunnerError, match="cannot hold"):
        qemu.hold(None, "switchover")  # type: ignore[arg-type]  # refused before the VM is looked at
    with pytest.raises(RunnerError, match="unknown backend 'kvm'"):
        get_runner("kvm")


def test_a_lab_on_a_runner_that_cannot_hold_steps_without_holding():
    """Scenario.holds="never" (or a runner without holds) steps through the phases without holding."""
    with Lab(Scenario(mode="normal", ram="16M", warmup=0.05, holds="never")) as lab:
        assert not lab.can_hold
        snaps = [lab.step() for _ in lab.phases]
        assert not lab.stepping and snaps[-1].states["destination"] == "running"
        assert lab.run().guest_verified


@pytest.mark.parametrize(
    ("backend", "mode", "defer"),
    [
        ("emulated", "cpr-transfer", False),
        pytest.param("qemu", "cpr-transfer", True, marks=_ON_QEMU),
        pytest.param("qemu", "normal", False, marks=_ON_QEMU),
    ],
)
def test_the_lab_defers_only_a_destination_that_would_lose_resume(backend, mode, defer):
    """defer=None is the lab's choice: -incoming defer for real QEMU's cpr-transfer destination (no event
    history, monitor only after CPR load), not elsewhere; the resolved value is what the Result records, and
    an explicit choice is kept."""
    with Lab(Scenario(backend=backend, mode=mode, ram="16M")) as lab:
        assert lab.scenario.defer is defer and lab.defer is defer
    with Lab(Scenario(backend=backend, mode=mode, ram="16M", defer=False)) as lab:
        assert lab.scenario.defer is False
    assert Scenario().defer is None


def test_the_summary_names_huge_pages_when_the_run_used_them():
    r = Result("emulated", "cpr-transfer", 64 << 20, "completed", scenario=Scenario(hugetlb="2M"))
    assert r.summary().splitlines()[0].endswith("64.0 MiB guest RAM in 2.0 MiB pages): completed")
    assert "pages" not in Result("emulated", "normal", 64 << 20, "completed").summary().splitlines()[0]
