"""Stepper: the callbacks the buttons call, driven without a browser, on real emulated VMs."""

from __future__ import annotations

import psutil
import pytest

from labkit.lab.engine import PHASES, Lab
from labkit.lab.scenario import Scenario
from labkit.teach.widgets import Stepper, figure_png, lab_arguments

pytestmark = pytest.mark.timeout(90)

SMALL = {"mode": "cpr-transfer", "ram": "32M", "warmup": 0.05}
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def _warm_fonts():
    """matplotlib opens its font files once per process and keeps them: not a leak of this test."""
    from labkit.lab.report import MappingRow
    from labkit.measure.plots import plot_address_space

    rows = [
        MappingRow(side, "ram0", 1 << 40, (1 << 40) + 4096, 4096, 1, "") for side in ("source", "destination")
    ]
    figure_png(plot_address_space(rows))
    yield


def _pids(lab: Lab) -> list[int]:
    return [m.pid for m in (lab.src, lab.dst) if m is not None]


def _gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_panel_has_stable_names_and_starts_with_no_process():
    with Stepper(**SMALL) as s:
        assert [b.description for b in (s.next_button, s.run_button, s.reset_button)] == [
            "Next",
            "Run to end",
            "Reset",
        ]
        for b, css in (
            (s.next_button, "labkit-next"),
            (s.run_button, "labkit-run"),
            (s.reset_button, "labkit-reset"),
        ):
            assert css in b._dom_classes
        assert "labkit-phase" in s.phase_label._dom_classes
        assert s.phase_label.value.startswith("Phase:") and "not started" in s.phase_label.value
        assert all(p in s.phase_list.value for p in PHASES["cpr-transfer"])
        assert "labkit-current" not in s.phase_list.value
        assert s.lab.src is None and s.lab.dst is None  # nothing spawns before the first step
        assert bytes(s.image.value).startswith(PNG)
        assert "application/vnd.jupyter.widget-view+json" in s._repr_mimebundle_()  # displayable
        assert not s.next_button.disabled and not s.run_button.disabled


def test_next_walks_cpr_transfer_and_shows_fds_in_flight():
    with Stepper(**SMALL) as s:
        phases = s.lab.phases
        seen = []
        while not s.done:
            before = s.png
            snap = s.on_next()
            assert snap is not None, s.error_text()
            seen.append(snap)
            assert s.phase_label.value.startswith(f"Phase: {snap.index}/{len(phases)} {snap.phase}")
            assert f"&#9654; {snap.phase}" in s.phase_list.value
            assert bytes(s.image.value).startswith(PNG) and s.png != before  # redrawn at every step
        assert [x.phase for x in seen] == phases
        by = {x.phase: x for x in seen}
        sent = by["cpr state sent (fds in flight)"]
        assert sent.fds["destination"] == []  # in the socket, not yet received
        assert sent.bytes["cpr"] > 0 and sent.bytes["main"] == 0
        mapped = by["destination mapped guest RAM, listening on main"]
        ram = {r.side: r for r in mapped.mappings if r.block == "ram0"}
        assert ram["source"].inode == ram["destination"].inode
        assert ram["source"].start != ram["destination"].start
        # the last phase: migrated, and the panel says so
        assert s.result is not None and s.result.status == "completed" and s.result.guest_verified
        assert "(migration completed)" in s.phase_label.value
        assert "completed" in s.status_html.value and "STOP-&gt;RESUME" in s.status_html.value
        assert "run state: running" in s.side_html["destination"].value
        assert "run state: postmigrate" in s.side_html["source"].value
        assert s.next_button.disabled and s.run_button.disabled and not s.reset_button.disabled
        assert s.on_next() is None  # nothing left: a no-op, not an error
        text = s.report()
        assert text.startswith("Phase: 7/7") and "cpr channel: " in text and "main channel: " in text
        assert len(s.mappings_frame()) == len(s.result.mappings)


def test_buttons_call_the_callbacks():
    with Stepper(**SMALL) as s:
        s.next_button.click()
        assert s.lab.index == 1 and s.phase == "source running"
        s.run_button.click()
        assert s.result is not None and s.result.status == "completed"
        old = s.lab
        s.reset_button.click()
        assert s.lab is not old and s.lab.index == 0


def test_run_to_end_returns_the_result():
    with Stepper(**SMALL) as s:
        s.on_next()
        result = s.on_run()
        assert result is s.result and result.status == "completed"
        assert [x.index for x in s.snapshots] == list(range(1, len(s.lab.phases) + 1))
        assert result.bytes["cpr"] > 0 and result.pause_ms["events"] is not None
        assert s.on_run() is result  # again: the same result, nothing re-run


def test_reset_closes_the_old_lab_and_builds_the_same_one():
    with Stepper(**SMALL) as s:
        first = s.lab
        s.on_next()
        s.on_next()
        pids = _pids(first)
        assert len(pids) == 2
        s.on_reset()
        assert all(_gone(p) for p in pids)
        assert s.lab is not first and s.snapshots == [] and s.result is None
        assert lab_arguments(s.lab) == lab_arguments(first)
        assert "not started" in s.phase_label.value
        s.on_next()
        assert s.lab.src.alive()
        pids = _pids(s.lab)
    assert all(_gone(p) for p in pids)
    assert s.closed and s.lab is None and s.next_button.disabled and s.reset_button.disabled
    assert s.phase_label.value.startswith("Phase: closed")
    s.close()  # twice is fine
    assert s.on_next() is None and s.on_run() is None


def test_stepper_from_a_lab_and_from_a_factory():
    lab = Lab(mode="normal", ram="16M", warmup=0.05, downtime_limit=500, seed=7)
    with Stepper(lab) as s:
        assert s.lab is lab
        s.on_reset()
        assert s.lab is not lab and s.lab.mode == "normal" and s.lab.config.guest.seed == 7
        assert s.lab.scenario == lab.scenario and lab_arguments(s.lab) == lab_arguments(lab)
    made = []

    def factory() -> Lab:
        made.append(Lab(mode="cpr-reboot", ram="16M", warmup=0.05))
        return made[-1]

    with Stepper(factory=factory) as s:
        assert made == [s.lab]
        s.on_run()
        assert s.result.status == "completed", s.error_text()
        assert s.snapshots[-1].phase == PHASES["cpr-reboot"][-1]
        s.on_reset()
        assert len(made) == 2 and s.lab is made[1]
    with pytest.raises(TypeError):
        Stepper(lab, ram="16M")
    with pytest.raises(TypeError):
        Stepper(factory=factory, ram="16M")


def test_lab_arguments_round_trip_without_spawning():
    lab = Lab(mode="normal", ram="48M", dirty_rate="8M", pattern="random", max_bandwidth="1G", defer=True,
              prefill=True, timeout=30)  # fmt: skip
    again = Lab(**lab_arguments(lab))
    try:
        assert again.scenario == lab.scenario
        assert again.config.ram == lab.config.ram and again.config.guest == lab.config.guest
        assert (again.mode, again.scenario.max_bandwidth, again.defer) == ("normal", 1 << 30, True)
        assert again.config.guest.prefill and again.timeout == 30
    finally:
        lab.close()
        again.close()


def test_reset_keeps_every_setting_including_prefill():
    """The Stepper's Reset builds its next Lab from the same Scenario: prefill and the rest survive."""
    scenario = Scenario(mode="normal", ram="16M", warmup=0.05, prefill=True, seed=3, downtime_limit=700)
    with Stepper(scenario) as s:
        first = s.lab
        s.on_reset()
        assert s.lab is not first and s.lab.scenario == scenario.with_(defer=False)  # the lab resolved defer=None
        assert s.lab.config.guest.prefill and s.lab.config.guest.seed == 3


def test_a_refused_migration_is_shown_not_raised():
    with Stepper(mode="cpr-transfer", ram="16M", memory_backend="ram", share=False, warmup=0.05) as s:
        result = s.on_run()
        assert result is not None and result.status == "failed"
        assert "is not compatible with CPR" in s.error_text()
        assert "is not compatible with CPR" in s.status_html.value
        assert "migration failed" in s.phase_label.value
        assert result.guest_verified  # the source kept its guest intact
        assert "on the source" in s.report()


def test_a_failing_factory_keeps_the_panel_alive():
    calls = []

    def factory() -> Lab:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("no lab today")
        return Lab(**SMALL)

    with Stepper(factory=factory) as s:
        assert s.lab is None and "no lab today" in s.status_html.value
        assert s.next_button.disabled and s.run_button.disabled and not s.reset_button.disabled
        assert s.on_next() is None and s.on_run() is None
        s.on_reset()
        assert s.lab is not None and s.error is None and not s.next_button.disabled


def test_figure_png_is_a_png():
    from labkit.measure.plots import plot_address_space

    assert figure_png(plot_address_space([])).startswith(PNG)
