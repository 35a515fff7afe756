"""QEMU's trace points as the lab reads them: the log-line parser on lines real QEMU 10.0.2 wrote, the qemu
backend's trace options, and the pause breakdown built from a timeline.

The sample logs under tests/data/qemu-trace/ were written by Debian's qemu-system-x86_64 10.0.2 (README there).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from labkit.host.hardware import VMConfig
from labkit.host.runners.qemu import qemu_argv, qemu_missing
from labkit.host.runners.qemu_trace import (
    TRACE_EVENTS,
    parse_trace_line,
    parse_trace_log,
    read_trace_log,
    strip_msg_timestamps,
    trace_argv,
)
from labkit.lab.breakdown import PAUSE_CHECKPOINTS, breakdown_steps, pause_breakdown
from labkit.lab.report import Result, TimelineRow

pytestmark = pytest.mark.timeout(30)

DATA = Path(__file__).parent / "data" / "qemu-trace"
# QEMU 10.0.2's downtime checkpoints in the order it passes them (migration.c, savevm.c), per side
SRC_CHECKPOINTS = [
    "src-downtime-start",
    "src-vm-stopped",
    "src-iterable-saved",
    "src-non-iterable-saved",
    "src-downtime-end",
]
DST_CHECKPOINTS = [
    "dst-precopy-loadvm-completed",
    "dst-precopy-bh-enter",
    "dst-precopy-bh-announced",
    "dst-precopy-bh-vm-started",
]


def wall_ns(ts: dict) -> int:
    return ts["seconds"] * 10**9 + ts["microseconds"] * 1000


def test_parse_one_line_of_each_kind():
    p = parse_trace_line("14266@1796171383.057888:vmstate_downtime_checkpoint src-vm-stopped\n")
    assert (p.tid, p.wall_ns, p.name, p.args) == (
        14266,
        1796171383_057888_000,
        "vmstate_downtime_checkpoint",
        "src-vm-stopped",
    )
    assert p.checkpoint == "src-vm-stopped"
    p = parse_trace_line("11063@1796171278.812856:cpr_find_fd ram0, id 0 returns 14")
    assert (p.name, p.args, p.checkpoint) == ("cpr_find_fd", "ram0, id 0 returns 14", None)
    p = parse_trace_line("14253@1796171382.950324:migration_socket_incoming_accepted ")
    assert (p.name, p.args) == ("migration_socket_incoming_accepted", "")
    # what QEMU writes without -msg timestamp=on, a torn last line, and a stderr message: no time, no point
    assert parse_trace_line("runstate_set current_run_state 6 (prelaunch) new_state 9 (running)") is None
    assert parse_trace_line("14253@1796171382.95") is None
    stderr = (
        "2026-12-02T00:26:17.941936Z qemu-system-x86_64: terminating on signal 15 from pid 7226 (timeout)"
    )
    assert parse_trace_line(stderr) is None
    assert strip_msg_timestamps(f"{stderr}\n{stderr}\n") == (
        "qemu-system-x86_64: terminating on signal 15 from pid 7226 (timeout)\n" * 2
    )


@pytest.mark.parametrize("mode", ["cpr-transfer", "normal"])
def test_real_logs_hold_qemus_checkpoints_in_order_around_the_pause(mode):
    events = json.loads((DATA / "qmp-events.json").read_text())[mode]
    stop, resume = wall_ns(events["STOP"]), wall_ns(events["RESUME"])
    src = parse_trace_log((DATA / f"{mode}-src.log").read_text())
    dst = parse_trace_log((DATA / f"{mode}-dst.log").read_text())
    lines = sum(1 for _ in (DATA / f"{mode}-src.log").open()) + sum(
        1 for _ in (DATA / f"{mode}-dst.log").open()
    )
    assert len(src) + len(dst) == lines  # every line QEMU wrote parses
    assert {p.name for p in src + dst} <= set(TRACE_EVENTS)
    assert [p.checkpoint for p in src if p.checkpoint] == SRC_CHECKPOINTS
    assert [p.checkpoint for p in dst if p.checkpoint] == DST_CHECKPOINTS
    for points in (src, dst):
        assert [p.wall_ns for p in points] == sorted(p.wall_ns for p in points)
    at = {p.checkpoint: p.wall_ns for p in src + dst if p.checkpoint}
    # QEMU stops the vCPUs between src-downtime-start and src-vm-stopped (the STOP event comes from inside
    # vm_stop), and emits RESUME inside vm_start, between bh-announced and bh-vm-started
    assert at["src-downtime-start"] <= stop <= at["src-vm-stopped"]
    assert at["dst-precopy-bh-announced"] <= resume <= at["dst-precopy-bh-vm-started"]
    for name in SRC_CHECKPOINTS[1:4] + DST_CHECKPOINTS[:3]:
        assert stop <= at[name] <= resume, name
    # every device section is timed on both sides while the guest is stopped
    saved = [p for p in src if p.name == "vmstate_downtime_save"]
    loaded = [p for p in dst if p.name == "vmstate_downtime_load"]
    assert saved and loaded and all(stop <= p.wall_ns <= resume for p in saved + loaded)
    assert any("idstr=globalstate" in p.args for p in loaded)
    if mode == "cpr-transfer":
        names = [p.name for p in src]
        assert names.index("cpr_state_save") < names.index("cpr_transfer_output")
        assert names.index("cpr_transfer_output") < names.index("migration_socket_outgoing_connected")
        found = [p.args for p in dst if p.name == "cpr_find_fd"]
        assert found and all(" returns -1" not in a for a in found)  # every block found its fd


def test_read_trace_log_leaves_a_line_being_written(tmp_path):
    log = tmp_path / "qemu-trace.log"
    assert read_trace_log(str(log)) == []  # not written yet
    log.write_text("1@1.000001:vmstate_downtime_checkpoint src-downtime-start\n2@1.000002:vmstate_down")
    assert [p.checkpoint for p in read_trace_log(str(log))] == ["src-downtime-start"]


def test_trace_options_name_the_file_last():
    argv = trace_argv("/run/x/qemu-trace.log")
    assert argv[:2] == ["-msg", "timestamp=on"]
    assert argv[-2:] == ["-trace", "file=/run/x/qemu-trace.log"]  # a later -trace would reset the file
    assert [a.removeprefix("enable=") for a in argv[3:-2:2]] == list(TRACE_EVENTS)
    plain = qemu_argv(VMConfig(), "/q/qmp.sock", accel="kvm", binary="q", guest="/g", bios=None)
    assert "-trace" not in plain and "-msg" not in plain
    traced = qemu_argv(VMConfig(), "/q/qmp.sock", accel="kvm", binary="q", guest="/g", trace_log="/q/t.log")
    assert traced == plain + trace_argv("/q/t.log")


def timeline_from_logs(mode: str) -> list[TimelineRow]:
    """A Result timeline from the sample logs, as the Lab builds it (ms; wall clock is enough here)."""
    events = json.loads((DATA / "qmp-events.json").read_text())[mode]
    t0 = wall_ns(events["STOP"]) - 10**9
    rows = [
        TimelineRow((wall_ns(events["STOP"]) - t0) / 1e6, "source", "STOP", ""),
        TimelineRow((wall_ns(events["RESUME"]) - t0) / 1e6, "destination", "RESUME", ""),
    ]
    for side, name in (("source", "src"), ("destination", "dst")):
        for p in parse_trace_log((DATA / f"{mode}-{name}.log").read_text()):
            kind = "checkpoint" if p.checkpoint or p.name.startswith("migration_socket") else "trace"
            rows.append(TimelineRow((p.wall_ns - t0) / 1e6, side, kind, p.checkpoint or p.name))
    return sorted(rows, key=lambda r: r.t_ms)


def test_pause_breakdown_from_a_real_timeline():
    rows = pause_breakdown(timeline_from_logs("cpr-transfer"))
    names = [r.checkpoint for r in rows]
    assert set(names) == {name for _, name, _ in PAUSE_CHECKPOINTS} | {"src-downtime-end"}
    stop = next(r for r in rows if r.checkpoint == "STOP")
    assert stop.t_ms == 0 and stop.side == "source"
    assert [r.t_ms for r in rows] == sorted(r.t_ms for r in rows)
    assert rows[0].delta_ms is None
    for a, b in zip(rows, rows[1:], strict=False):
        assert b.delta_ms == pytest.approx(b.t_ms - a.t_ms, abs=0.002)
    resume = next(r for r in rows if r.checkpoint == "RESUME")
    assert resume.t_ms == pytest.approx(22.606, abs=0.001)  # the events pause of that run
    frame = Result("qemu", "cpr-transfer", 64 << 20, "completed", pause_breakdown=rows).breakdown_frame()
    assert list(frame.columns) == ["checkpoint", "side", "t_ms", "delta_ms"] and len(frame) == len(rows)
    assert pause_breakdown([TimelineRow(1.0, "lab", "phase", "source running")]) == []


def test_breakdown_steps_follow_the_critical_path():
    runs = [pause_breakdown(timeline_from_logs(mode)) for mode in ("cpr-transfer", "normal")]
    out = breakdown_steps(runs)
    assert out["runs"] == 2 and out["t_ms_median"]["STOP"] == 0
    chain = [(s["from"], s["to"]) for s in out["steps"]]
    path = [name for _, name, _ in PAUSE_CHECKPOINTS]
    assert chain == list(zip(path, path[1:], strict=False))
    by = {(s["from"], s["to"]): s for s in out["steps"]}
    one = [{r.checkpoint: r.t_ms for r in run} for run in runs]
    step = by[("src-non-iterable-saved", "dst-precopy-loadvm-completed")]
    a, b = (r["dst-precopy-loadvm-completed"] - r["src-non-iterable-saved"] for r in one)
    assert step["n"] == 2 and step["median_ms"] == pytest.approx((a + b) / 2, abs=0.002)
    # dicts (a run read back from JSON) count the same as rows
    assert breakdown_steps([[r.__dict__ for r in run] for run in runs]) == out


# -- both backends, end to end ----------------------------------------------------------------------------
QEMU_ORDER = {
    "source": ["migration_socket_outgoing_connected", *SRC_CHECKPOINTS],
    "destination": ["migration_socket_incoming_accepted", *DST_CHECKPOINTS],
}


def check_checkpoints(r: Result, mode: str) -> None:
    """The Result's timeline holds QEMU's checkpoints, per side in QEMU's order, around the guest's pause:
    the STOP event between src-downtime-start and src-vm-stopped, RESUME between dst-precopy-bh-announced and
    dst-precopy-bh-vm-started, and everything in between inside STOP -> RESUME. The pause breakdown holds
    them all, measured from STOP."""
    assert r.status == "completed" and r.guest_verified is True, (r.error, r.verify)
    rows = [t for t in r.timeline if t.kind == "checkpoint" and not t.detail.startswith("labkit-")]
    for side, names in QEMU_ORDER.items():
        if mode == "cpr-reboot":  # the main channel is a file: nothing connects or accepts
            names = names[1:]
        assert [t.detail for t in rows if t.side == side] == names, side
    at = {t.detail: t.t_ms for t in rows}
    stop = next(t.t_ms for t in r.timeline if t.side == "source" and t.kind == "STOP")
    resume = next(t.t_ms for t in r.timeline if t.side == "destination" and t.kind == "RESUME")
    assert at["src-downtime-start"] <= stop <= at["src-vm-stopped"]
    assert at["dst-precopy-bh-announced"] <= resume <= at["dst-precopy-bh-vm-started"]
    for name in SRC_CHECKPOINTS[1:4] + DST_CHECKPOINTS[:3]:
        assert stop <= at[name] <= resume, name
    by = {b.checkpoint: b for b in r.pause_breakdown}
    assert by["STOP"].t_ms == 0 and by["RESUME"].t_ms == pytest.approx(r.pause_ms["events"], abs=0.002)
    assert set(by) == {*at, "STOP", "RESUME"}
    for name, t in at.items():
        assert by[name].t_ms == pytest.approx(t - stop, abs=0.002)
    assert r.to_dict()["pause_breakdown"][0].keys() == {"checkpoint", "side", "t_ms", "delta_ms"}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["cpr-transfer", "normal", "cpr-reboot"])
def test_emulator_passes_qemus_checkpoints_in_qemus_order(mode):
    from labkit.lab.engine import migrate

    r = migrate(mode=mode, ram="64M", dirty_rate="16M")
    check_checkpoints(r, mode)
    assert not any(t.kind == "trace" for t in r.timeline)  # labkit-vm writes no trace log of its own


_QEMU_MISSING = qemu_missing()


@pytest.mark.qemu
@pytest.mark.skipif(_QEMU_MISSING is not None, reason=f"{_QEMU_MISSING}")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["cpr-transfer", "normal"])
def test_qemu_timeline_shows_qemus_own_checkpoints(mode):
    from labkit.lab.engine import migrate

    r = migrate(backend="qemu", mode=mode, ram="64M")
    check_checkpoints(r, mode)
    traces = [t.detail for t in r.timeline if t.kind == "trace"]
    assert any(d.startswith("vmstate_downtime_load ") for d in traces)
    assert any(d.startswith("vmstate_downtime_save ") for d in traces)
    if mode == "cpr-transfer":
        for name in ("cpr_state_save", "cpr_transfer_output", "cpr_transfer_input", "cpr_state_load"):
            assert any(d.startswith(name + " ") for d in traces), name


def test_bench_reports_the_breakdown_per_backend_and_mode():
    from labkit.measure.bench import format_breakdown, summarize_breakdown

    def row(backend, mode, status="completed"):
        rows = pause_breakdown(timeline_from_logs(mode))
        return {
            "backend": backend,
            "mode": mode,
            "status": status,
            "pause_breakdown": [r.__dict__ for r in rows],
        }

    runs = [
        row("qemu", "cpr-transfer"),
        row("qemu", "cpr-transfer"),
        row("qemu", "normal"),
        row("qemu", "normal", "failed"),
    ]
    out = summarize_breakdown(runs)
    assert [(b["backend"], b["mode"], b["runs"]) for b in out] == [
        ("qemu", "cpr-transfer", 2),
        ("qemu", "normal", 1),
    ]
    assert out[0]["t_ms_median"]["RESUME"] == pytest.approx(22.606, abs=0.001)
    text = "\n".join(format_breakdown(out))
    assert "src-non-iterable-saved -> dst-precopy-loadvm-completed" in text
    assert "22.606" in text and "qemu cpr-transfer" in text
    assert format_breakdown([]) == []
