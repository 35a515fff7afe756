"""`labkit bench`: migration costs measured side by side in one run, against the machine's own ceilings.

One run measures (1) the machine's ceilings, each the fastest way this host does the work (labkit.measure.
ceilings: copy, memfd -> unix socket into a pre-faulted receiver, the memfd-passing round trip) and the pause
floor of the emulator's design (labkit.measure.pause_floor), before and again after the migrations; (2) the
emulated VM itself: spawn to QMP-ready, stop to vCPU quiesced, the dirty rate the guest reaches, memory beyond
guest RAM; (3) a matrix of migrations (backend x mode x RAM size x dirty rate) with N repetitions per cell,
the guest prefilled and writing at the same rate on both backends. It reports medians, minima and maxima, and
ratios against targets. Targets are reported, never asserted: this machine is shared. A measured rate above
its ceiling is different: it proves the ceiling wrong, and `labkit bench` exits non-zero on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from labkit import __version__
from labkit.host.hardware import VMConfig
from labkit.measure.bench_plan import IDLE_RATE, WRITING_RATE, BenchPlan

__all__ = ["IDLE_RATE", "RATIO_TARGETS", "TARGET_RAM", "WRITING_RATE", "BenchPlan", "run_bench"]
from labkit.measure.bench_timing import PhaseClock, Teardowns, format_phases, summarize_cells, timed_migrate
from labkit.qemu_syntax import GuestConfig, MiB, format_size

#: The RAM size the pause targets are judged at (or the nearest one measured).
TARGET_RAM = 1024 * MiB

# name: (comparison, target). Targets from the issue "the pause at the machine's floor"; ceilings_* are the
# ratios to a ceiling, which must never exceed 1 (else the ceiling is wrong).
RATIO_TARGETS = {
    "cpr_pause_emulated_over_floor": ("<=", 1.25),
    "cpr_pause_emulated_over_qemu": ("<=", 0.25),
    "cpr_pause_largest_over_smallest_emulated": ("<=", 1.3),
    "cpr_pause_largest_over_smallest_qemu": ("<=", 1.3),
    "precopy_emulated_over_socket_ceiling": (">=", 0.5),
    "precopy_idle_emulated_over_qemu": (">=", 1.0),
    "precopy_writing_emulated_over_qemu": (">=", 1.0),
    "ceiling_largest_ratio": ("<=", 1.0),
}


def _stats(values: Sequence[float | None]) -> dict[str, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


# -- machine facts and ceilings ------------------------------------------------------------------------------
def machine_facts() -> dict[str, Any]:
    from labkit.host.runners.qemu_guest import kvm_usable, qemu_version

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    qver = qemu_version()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "kvm": kvm_usable(),
        "qemu": ".".join(map(str, qver)) if qver else None,
        "python": platform.python_version(),
        "labkit": __version__,
    }


def measure_ceilings(
    before: dict[str, Any] | None = None,
    floor_runs: int = 30,
    size: int = 256 * MiB,
    clock: PhaseClock | None = None,
    plan: BenchPlan | None = None,
) -> dict[str, Any]:
    """Every ceiling and the pause floor, by the plan's methods; with `before` (the same measured earlier in
    this run), the better of the two for each: a ceiling is what the machine can do when the load lets it.
    A plan with ceilings_after="winner" measures each ceiling again by the method that won before only.
    `clock` gets the wall time of the ceilings and of the floor, each under its own name."""
    from labkit.measure import ceilings, pause_floor

    clock = clock or PhaseClock()
    methods = plan.ceiling_methods if plan else None
    if before is not None and plan is not None and plan.ceilings_after == "winner":
        methods = {k: (before[k]["method"],) for k in ("copy", "socket")}
    when = "after" if before else "before"
    with clock.phase(f"ceilings {when} (copy, socket, fd pass)"):
        now: dict[str, Any] = {k: c.as_dict() for k, c in ceilings.measure_all(size, methods=methods).items()}
    with clock.phase(f"pause floor {when} ({floor_runs} runs)"):
        now["pause_floor"] = pause_floor.measure(floor_runs)
    if before is None:
        return now
    out = {}
    for k, c in now.items():
        b = before[k]
        if k == "pause_floor":  # a distribution: both halves together
            out[k] = pause_floor.summarize(b["runs_ms"] + c["runs_ms"])
            continue
        better = c["value"] > b["value"] if c["unit"] == "bytes/s" else c["value"] < b["value"]
        best, other = (c, b) if better else (b, c)
        # every method's median stays listed, from the run where the ceiling's value came from
        out[k] = {**best, "methods": {**other["methods"], **best["methods"]}}
    return out


# -- the emulated VM itself ----------------------------------------------------------------------------------
def _status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def vm_bench(reps: int = 3, ram: int = 1024 * MiB) -> dict[str, Any]:
    """Spawn to QMP-ready, stop to vCPU quiesced, the dirty rate the guest reaches (on pages it has already
    touched, and on fresh pages, where the kernel's page faults set the pace), and memory beyond guest RAM
    (RssAnon + RssFile: guest RAM itself is shared memory, RssShmem)."""
    from labkit.host.runners import spawn

    spawn_s, quiesce_ms, steady, first_touch, extra_rss = [], [], [], [], []

    def rate(m, seconds: float) -> float:
        a = m.runner.guest_stats(m)
        time.sleep(seconds)
        b = m.runner.guest_stats(m)
        return (b["bytes-written"] - a["bytes-written"]) / ((b["vm-clock-ns"] - a["vm-clock-ns"]) / 1e9)

    for _ in range(reps):
        t0 = time.perf_counter()
        m = spawn(
            VMConfig(name="bench", ram=ram, guest=GuestConfig(dirty_rate=64 << 30, working_set=ram // 8))
        )
        try:
            spawn_s.append(time.perf_counter() - t0)
            time.sleep(1.0)  # the working set (RAM/8) is faulted in by now
            steady.append(rate(m, 1.0))
            for _ in range(5):
                m.cmd("stop")
                quiesce_ms.append(m.runner.guest_stats(m)["last-stop-quiesce-ns"] / 1e6)
                m.cmd("cont")
                time.sleep(0.05)
            extra_rss.append((_status_kib(m.pid, "RssAnon") + _status_kib(m.pid, "RssFile")) * 1024)
        finally:
            m.shutdown()
        with spawn(VMConfig(name="bench", ram=ram, guest=GuestConfig(dirty_rate=64 << 30))) as m:
            time.sleep(0.1)
            first_touch.append(rate(m, 0.5))
    return {
        "spawn_to_qmp_s": _stats(spawn_s),
        "stop_quiesce_ms": _stats(quiesce_ms),
        "dirty_rate_bytes_per_s": _stats(steady),
        "dirty_rate_first_touch_bytes_per_s": _stats(first_touch),
        "rss_beyond_guest_ram_bytes": _stats(extra_rss),
    }


# -- migrations ----------------------------------------------------------------------------------------------
def available_backends(wanted: list[str]) -> tuple[list[str], dict[str, str]]:
    from labkit.host.runners.qemu_guest import qemu_version

    out, skipped = [], {}
    for b in wanted:
        if b == "qemu":
            ver = qemu_version()
            if not ver or ver < (10, 0, 0):
                skipped[b] = "qemu-system-x86_64 >= 10.0 not installed (scripts/install-qemu)"
                continue
            try:
                from labkit.host.runners import get_runner

                get_runner("qemu")
            except Exception as e:  # noqa: BLE001 - any reason the backend cannot load is reported
                skipped[b] = f"qemu backend unavailable: {e}"
                continue
        out.append(b)
    return out, skipped


def run_matrix(plan: BenchPlan, progress=None, clock: PhaseClock | None = None) -> list[dict[str, Any]]:
    """One row per migration: the flattened Result plus the cell's coordinates and its wall time by part
    (seconds_by_part); `clock` gets each backend's wall time."""
    clock = clock or PhaseClock()
    rows = []
    teardowns = Teardowns()  # each cell's VMs exit while the next cell's source boots, never while it migrates
    backend = ""
    # rep by rep over every cell, so load that comes and goes on a shared machine hits every cell alike
    for rep in range(plan.reps):
        for backend, mode, ram, dirty in plan.cells():
            # both guests start with all their RAM written (prefill: the emulated guest writes it at boot, the
            # real guest's host fills what it has not reached), so pre-copy moves pages, not zero runs
            with clock.phase(f"migrations {backend}"):
                res, parts = timed_migrate(
                    teardowns,
                    backend=backend,
                    mode=mode,
                    ram=ram,
                    dirty_rate=dirty,
                    max_bandwidth=plan.max_bandwidth,
                    seed=rep + 1,
                    warmup=plan.warmup,
                    prefill=True,
                    progress=plan.progress,
                )
            row = res.flat()
            row["rep"] = rep
            row["seconds_by_part"] = parts  # its teardown is filled in when that ends
            row["pause_breakdown"] = [asdict(b) for b in res.pause_breakdown]
            rows.append(row)
            if progress is not None:
                progress.update(1)
    with clock.phase(f"migrations {backend}") if backend else contextlib.nullcontext():
        teardowns.wait()
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median, min and max of each figure per cell (backend, mode, RAM, dirty rate)."""
    keys = [
        "pause_ms_reported",
        "pause_ms_events",
        "pause_ms_guest",
        "total_ms",
        "bytes_main",
        "bytes_cpr",
        "first_pass_bytes_per_s",
        "precopy_bytes_per_s",
        "passes",
    ]
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["backend"], r["mode"], r["ram_bytes"], r["dirty_rate"]), []).append(r)
    out = []
    for (backend, mode, ram, dirty), rs in cells.items():
        row: dict[str, Any] = {
            "backend": backend,
            "mode": mode,
            "ram_bytes": ram,
            "dirty_rate": dirty,
            "runs": len(rs),
            "completed": sum(r["status"] == "completed" for r in rs),
            "verified": sum(bool(r["guest_verified"]) for r in rs),
        }
        for k in keys:
            st = _stats([r.get(k) for r in rs if r["status"] == "completed"])
            row[f"{k}_median"], row[f"{k}_min"], row[f"{k}_max"] = st["median"], st["min"], st["max"]
        out.append(row)
    return out


def summarize_breakdown(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per backend and mode, over every completed run (all RAM sizes and dirty rates): the median time
    between consecutive checkpoints on the guest's critical path, and each checkpoint's median time from
    STOP (labkit.lab.breakdown; QEMU's checkpoint names on both backends)."""
    from labkit.lab.breakdown import breakdown_steps

    groups: dict[tuple[str, str], list] = {}
    for r in rows:
        if r["status"] == "completed" and r.get("pause_breakdown"):
            groups.setdefault((r["backend"], r["mode"]), []).append(r["pause_breakdown"])
    return [{"backend": b, "mode": m, **breakdown_steps(runs)} for (b, m), runs in groups.items()]


def format_breakdown(breakdown: list[dict[str, Any]]) -> list[str]:
    """The breakdown as a table: one line per step, one column per backend and mode (median ms)."""
    if not breakdown:
        return []
    cols = [(b["backend"], b["mode"]) for b in breakdown]
    steps: list[tuple[str, str]] = []
    for b in breakdown:
        for s in b["steps"]:
            if (s["from"], s["to"]) not in steps:
                steps.append((s["from"], s["to"]))
    from labkit.lab.breakdown import PAUSE_CHECKPOINTS

    order = {name: i for i, (_, name, _) in enumerate(PAUSE_CHECKPOINTS)}
    steps.sort(key=lambda st: (order[st[1]], order[st[0]]))
    values = {
        (b["backend"], b["mode"], s["from"], s["to"]): s["median_ms"] for b in breakdown for s in b["steps"]
    }
    width = max(len(f"{a} -> {z}") for a, z in steps)
    head = "".join(f" {(b[:4] + ' ' + m)[:17]:>17s}" for b, m in cols)
    lines = [
        "pause breakdown (median ms between consecutive checkpoints in QEMU's order, QEMU's names; negative: the"
        " later one came first; '-': not on this path):",
        f"  {'step':{width}s}{head}",
    ]
    for a, z in steps:
        cells = "".join(
            f" {'-' if (v := values.get((b, m, a, z))) is None else f'{v:.3f}':>17s}" for b, m in cols
        )
        lines.append(f"  {a + ' -> ' + z:{width}s}{cells}")
    stop_resume = "".join(
        f" {'-' if (v := b['t_ms_median'].get('RESUME')) is None else f'{v:.3f}':>17s}" for b in breakdown
    )
    lines.append(f"  {'STOP -> RESUME (median)':{width}s}{stop_resume}")
    return lines


def _cells(summary: list[dict], backend: str, mode: str, dirty: int | None = None) -> list[dict]:
    return [
        s for s in summary
        if s["backend"] == backend and s["mode"] == mode and (dirty is None or s["dirty_rate"] == dirty)
    ]  # fmt: skip


def _nearest(cells: list[dict], ram: int) -> dict | None:
    """The cell whose RAM is nearest `ram` (ties: the larger), or None."""
    return min(cells, key=lambda c: (abs(c["ram_bytes"] - ram), -c["ram_bytes"]), default=None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b in (None, 0) else a / b


def ceiling_figures(summary: list[dict], vm: dict[str, Any] | None) -> list[tuple[str, float | None, str]]:
    """Every measured figure that has a ceiling: (what, value, which ceiling). Rates are cell medians; the
    emulated cpr pause is its fastest run, held against the floor's fastest run (a floor is beaten only if
    the real thing ran faster than the design's best)."""
    out: list[tuple[str, float | None, str]] = []
    for c in summary:
        where = f"{c['backend']} {c['mode']} at {format_size(c['ram_bytes'])}, guest writing {format_size(c['dirty_rate'])}/s"
        if c["mode"] == "normal":
            out.append((f"{where}: pre-copy", c.get("precopy_bytes_per_s_median"), "socket"))
            out.append((f"{where}: pre-copy pass 1", c.get("first_pass_bytes_per_s_median"), "socket"))
        if c["mode"] == "cpr-transfer" and c["backend"] == "emulated":
            ms = c.get("pause_ms_events_min")
            out.append(
                (f"{where}: fastest STOP->RESUME", None if ms is None else ms / 1e3, "pause_floor_min")
            )
    if vm:
        out.append(
            ("emulated guest's dirty rate", (vm.get("dirty_rate_bytes_per_s") or {}).get("median"), "copy")
        )
    return out


def _with_floor_min(ceilings: dict[str, Any]) -> dict[str, Any]:
    floor = ceilings.get("pause_floor")
    if not floor:
        return ceilings
    return {
        **ceilings,
        "pause_floor_min": {**floor, "value": floor["min"], "method": floor["method"] + " (fastest run)"},
    }


def compute_ratios(
    summary: list[dict], ceilings: dict[str, Any], vm: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """Each ratio of RATIO_TARGETS (None where a side was not measured), with its target and whether it is met.
    Pause ratios compare medians of STOP->RESUME (events) at TARGET_RAM or the RAM nearest it."""
    from labkit.measure.ceilings import ratio_to_ceiling

    key = "pause_ms_events_median"
    values: dict[str, float | None] = {}
    rates = sorted({s["dirty_rate"] for s in summary if s["mode"] == "cpr-transfer"})
    cpr_rate = rates[0] if rates else None
    e_cpr = _cells(summary, "emulated", "cpr-transfer", cpr_rate)
    q_cpr = _cells(summary, "qemu", "cpr-transfer", cpr_rate)
    e_at = _nearest(e_cpr, TARGET_RAM)
    q_at = _nearest([c for c in q_cpr if e_at and c["ram_bytes"] == e_at["ram_bytes"]], TARGET_RAM)
    floor = ceilings.get("pause_floor")
    e_pause = e_at[key] if e_at else None
    q_pause = q_at[key] if q_at else None
    values["cpr_pause_emulated_over_floor"] = _ratio(e_pause, None if not floor else floor["value"] * 1e3)
    values["cpr_pause_emulated_over_qemu"] = _ratio(e_pause, q_pause)
    for backend, cells in (("emulated", e_cpr), ("qemu", q_cpr)):
        lo = min(cells, key=lambda c: c["ram_bytes"], default=None)
        hi = max(cells, key=lambda c: c["ram_bytes"], default=None)
        values[f"cpr_pause_largest_over_smallest_{backend}"] = (
            None if lo is None or hi is None or lo is hi else _ratio(hi[key], lo[key])
        )
    tkey = "precopy_bytes_per_s_median"
    pre_rates = sorted({s["dirty_rate"] for s in summary if s["mode"] == "normal"})

    def precopy(backend: str, rate: int | None) -> float | None:
        cells = _cells(summary, backend, "normal", rate)
        c = max(cells, key=lambda c: c["ram_bytes"], default=None)
        return None if c is None else c.get(tkey)

    idle = pre_rates[0] if pre_rates else None
    writing = pre_rates[-1] if len(pre_rates) > 1 else None
    values["precopy_emulated_over_socket_ceiling"] = ratio_to_ceiling(
        precopy("emulated", idle), ceilings.get("socket")
    )
    values["precopy_idle_emulated_over_qemu"] = _ratio(precopy("emulated", idle), precopy("qemu", idle))
    values["precopy_writing_emulated_over_qemu"] = (
        None if writing is None else _ratio(precopy("emulated", writing), precopy("qemu", writing))
    )
    all_ceilings = _with_floor_min(ceilings)
    to_ceiling = [
        r for what, v, which in ceiling_figures(summary, vm)
        if (r := ratio_to_ceiling(v, all_ceilings.get(which))) is not None
    ]  # fmt: skip
    values["ceiling_largest_ratio"] = max(to_ceiling, default=None)
    out = {}
    for name, (op, target) in RATIO_TARGETS.items():
        v = values.get(name)
        met = None if v is None else (v <= target if op == "<=" else v >= target)
        out[name] = {"value": None if v is None else round(v, 4), "target": f"{op} {target}", "met": met}
    return out


def ceiling_breaches(summary: list[dict], ceilings: dict[str, Any], vm: dict[str, Any] | None) -> list[str]:
    """One line per figure that beat its ceiling (labkit.measure.ceilings.check)."""
    from labkit.measure.ceilings import check

    return [b.line() for b in check(ceiling_figures(summary, vm), _with_floor_min(ceilings))]


def run_bench(plan: BenchPlan, show_progress: bool = True) -> dict[str, Any]:
    from tqdm.auto import tqdm

    backends, skipped = available_backends(plan.backends)
    plan.backends = backends
    t0 = time.monotonic()
    clock = PhaseClock()
    load = {"start": os.getloadavg()}
    ceilings = measure_ceilings(floor_runs=plan.floor_runs, size=plan.ceiling_bytes, clock=clock, plan=plan)
    with clock.phase("emulated VM figures (spawn, quiesce, dirty rate, RSS)"):
        vm = vm_bench(plan.vm_reps)
    with tqdm(
        total=len(plan.cells()) * plan.reps, desc="migrations", disable=not show_progress, leave=False
    ) as bar:
        rows = run_matrix(plan, bar, clock)
    # again after the migrations: the better of the two counts
    ceilings = measure_ceilings(
        ceilings, floor_runs=plan.floor_runs, size=plan.ceiling_bytes, clock=clock, plan=plan
    )
    load["end"] = os.getloadavg()
    with clock.phase("report (summaries, breakdown, ratios)"):
        summary = summarize(rows)
        breakdown = summarize_breakdown(rows)
        ratios = compute_ratios(summary, ceilings, vm)
        breaches = ceiling_breaches(summary, ceilings, vm)
    return {
        "machine": {**machine_facts(), "loadavg": load},
        "plan": plan.describe(),
        "skipped_backends": skipped,
        "ceilings": ceilings,
        "vm": vm,
        "cells": summary,
        "pause_breakdown": breakdown,
        "runs": rows,
        "ratios": ratios,
        "ceiling_breaches": breaches,
        "seconds": round(time.monotonic() - t0, 1),
        "seconds_by_phase": clock.as_dict(),
        "seconds_by_cell": summarize_cells(rows),
    }


def write_csv(report: dict[str, Any], path: str, command: str) -> None:
    """The per-cell summary as CSV, headed by comment lines with the machine facts and the command."""
    import pandas as pd

    frame = pd.DataFrame(report["cells"])
    with open(path, "w") as f:
        f.write(f"# command: {command}\n")
        f.write(f"# machine: {json.dumps(report['machine'])}\n")
        f.write(f"# ceilings: {json.dumps(report['ceilings'])}\n")
        frame.to_csv(f, index=False)


def format_ceilings(c: dict[str, Any]) -> list[str]:
    """The ceilings, each with the method that won, and the pause floor's steps."""
    from labkit.qemu_syntax import human_size

    def show(x: dict[str, Any]) -> str:
        return f"{human_size(x['value'])}/s" if x["unit"] == "bytes/s" else f"{x['value'] * 1e3:.3f} ms"

    lines = ["ceilings (the best run of the fastest way this machine does the work):"]
    for key, what in (("copy", "copy"), ("socket", "memfd -> unix socket -> pre-faulted receiver"),
                      ("fd_pass", "memfd pass + map round trip")):  # fmt: skip
        x = c[key]
        others = ", ".join(
            f"{k} {show({**x, 'value': v})}" for k, v in x["methods"].items() if k != x["method"]
        )
        lines.append(
            f"  {what:45s} {show(x):>12s}  {x['method']}" + (f" (medians: {others})" if others else "")
        )
    f = c["pause_floor"]
    steps = ", ".join(f"{k} {v:.3f}" for k, v in f["steps_ms_median"].items())
    lines.append(
        f"  {'pause floor (two processes, STOP->RESUME)':45s} {f['value'] * 1e3:>9.3f} ms  median of {f['n']},"
        f" min {f['min'] * 1e3:.3f} ms; steps (median ms): {steps}"
    )
    return lines


def format_report(report: dict[str, Any]) -> str:
    from labkit.qemu_syntax import human_size

    lines = []
    m = report["machine"]
    lines.append(f"machine: {m['cpu']} x{m['cores']}, kernel {m['kernel']}, KVM {m['kvm']}, QEMU {m['qemu']}")
    load = m.get("loadavg", {})
    if load:
        lines.append(
            "load average (1/5/15 min): start " + "/".join(f"{x:.2f}" for x in load["start"])
            + ", end " + "/".join(f"{x:.2f}" for x in load["end"])
        )  # fmt: skip
    lines += report.get("plan", {}).get("text", [])
    lines += format_ceilings(report["ceilings"])
    v = report["vm"]

    def med(d, scale=1.0, fmt="{:.3f}"):
        return "n/a" if d["median"] is None else fmt.format(d["median"] * scale)

    lines.append(
        f"emulated VM: spawn to QMP {med(v['spawn_to_qmp_s'], 1000, '{:.0f}')} ms, stop quiesced in "
        f"{med(v['stop_quiesce_ms'])} ms, dirty rate {human_size(v['dirty_rate_bytes_per_s']['median'] or 0)}/s"
        f", RSS beyond guest RAM {human_size(v['rss_beyond_guest_ram_bytes']['median'] or 0)}"
    )
    for b, why in report["skipped_backends"].items():
        lines.append(f"skipped backend {b}: {why}")
    lines.append("")
    lines.append(
        f"{'backend':9s} {'mode':13s} {'RAM':>6s} {'dirty/s':>8s} {'ok':>5s} {'pause events ms (med/min/max)':>30s} "
        f"{'reported':>9s} {'guest':>8s} {'total ms':>9s} {'main bytes':>11s} {'precopy MB/s':>12s}"
    )

    def f(x, fmt="{:.2f}"):
        return "-" if x is None else fmt.format(x)

    for s in report["cells"]:
        pe = f"{f(s['pause_ms_events_median'])}/{f(s['pause_ms_events_min'])}/{f(s['pause_ms_events_max'])}"
        tp = s["precopy_bytes_per_s_median"]
        lines.append(
            f"{s['backend']:9s} {s['mode']:13s} {format_size(s['ram_bytes']):>6s} "
            f"{format_size(s['dirty_rate']):>8s} {s['completed']:>2d}/{s['runs']:<2d} {pe:>30s} "
            f"{f(s['pause_ms_reported_median']):>9s} {f(s['pause_ms_guest_median']):>8s} "
            f"{f(s['total_ms_median'], '{:.0f}'):>9s} {f(s['bytes_main_median'], '{:.0f}'):>11s} "
            f"{f(None if tp is None else tp / 1e6, '{:.0f}'):>12s}"
        )
    breakdown = format_breakdown(report.get("pause_breakdown", []))
    if breakdown:
        lines += ["", *breakdown]
    lines.append("")
    lines.append("ratios (targets are reported, not asserted; a ceiling ratio above 1 fails the run):")
    for name, r in report["ratios"].items():
        mark = {True: "met", False: "NOT met", None: "n/a"}[r["met"]]
        lines.append(f"  {name:45s} {f(r['value'], '{:.3f}'):>8s}  target {r['target']:>7s}  {mark}")
    for line in report.get("ceiling_breaches", []):
        lines.append(line)
    if report.get("seconds_by_phase"):
        lines += ["", *format_phases(report["seconds_by_phase"], report.get("seconds_by_cell", []))]
    lines.append(f"\n{len(report['runs'])} migrations in {report['seconds']} s")
    return "\n".join(lines)
