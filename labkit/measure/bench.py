"""`labkit bench`: migration costs measured side by side in one run, against the machine's own ceilings.

One run measures (1) the machine's ceilings: memory copy bandwidth, unix-socket throughput from a memfd with
sendfile, and the round trip of passing memfds over SCM_RIGHTS and mapping them; (2) the emulated VM itself:
spawn to QMP-ready, stop to vCPU quiesced, the dirty rate the guest reaches, memory beyond guest RAM; (3) a
matrix of migrations (mode x RAM size x dirty rate x backend) with N repetitions per cell. It reports medians,
minima and maxima, and ratios against targets. Targets are reported, never asserted: this machine is shared.
"""

from __future__ import annotations

import json
import mmap
import os
import platform
import socket
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from labkit import __version__
from labkit.host.hardware import VMConfig
from labkit.qemu_syntax import GuestConfig, MiB, format_size

RATIO_TARGETS = {
    "cpr_pause_emulated_over_qemu": ("<=", 1.0),
    "cpr_pause_largest_over_smallest_emulated": ("<=", 1.3),
    "cpr_pause_largest_over_smallest_qemu": ("<=", 1.3),
    "precopy_throughput_emulated_over_qemu": (">=", 1.0),
    "precopy_throughput_over_socket_ceiling": (">=", 0.5),
    "cpr_pause_over_fd_pass_floor": ("<=", 5.0),
}


@dataclass
class BenchPlan:
    modes: list[str] = field(default_factory=lambda: ["cpr-transfer", "normal"])
    rams: list[int] = field(default_factory=lambda: [256 * MiB, 1024 * MiB, 4096 * MiB])
    dirty_rates: list[int] = field(default_factory=lambda: [0, 256 * MiB])
    backends: list[str] = field(default_factory=lambda: ["emulated", "qemu"])
    reps: int = 5
    max_bandwidth: int = 10 << 30
    vm_reps: int = 5

    @classmethod
    def quick(cls, backends: list[str]) -> BenchPlan:
        return cls(rams=[256 * MiB, 1024 * MiB], dirty_rates=[0], backends=backends, reps=3, vm_reps=3)


def _stats(values: list[float]) -> dict[str, float | None]:
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


def ceiling_memcpy(size: int = 256 * MiB, reps: int = 5) -> float:
    """Bytes per second numpy copies between two buffers already faulted in."""
    a = np.ones(size, dtype=np.uint8)
    b = np.empty_like(a)
    np.copyto(b, a)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - t0)
    return size / statistics.median(times)


def ceiling_socket_sendfile(size: int = 256 * MiB, reps: int = 3) -> float:
    """Bytes per second from a memfd into a unix stream socket with sendfile, read by another process."""
    fd = os.memfd_create("bench-ceiling", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size) as mm:
            np.frombuffer(mm, dtype=np.uint8)[:] = 1
        results = []
        for _ in range(reps):
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            for s in (a, b):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            pid = os.fork()
            if pid == 0:  # the reader: receive everything, then say so
                try:
                    a.close()
                    buf = bytearray(4 << 20)
                    view = memoryview(buf)
                    left = size
                    while left:
                        n = b.recv_into(view[: min(left, len(buf))])
                        if not n:
                            break
                        left -= n
                    b.sendall(b"k")
                finally:
                    os._exit(0)
            b.close()
            t0 = time.perf_counter()
            off = 0
            while off < size:
                off += os.sendfile(a.fileno(), fd, off, size - off)
            a.recv(1)
            results.append(size / (time.perf_counter() - t0))
            a.close()
            os.waitpid(pid, 0)
        return statistics.median(results)
    finally:
        os.close(fd)


def ceiling_fd_pass(nfds: int = 7, size: int = 256 * MiB, reps: int = 20) -> float:
    """Seconds for a round trip: send nfds memfds over SCM_RIGHTS, the other process maps them all and answers."""
    fds = []
    for i in range(nfds):
        fd = os.memfd_create(f"bench-{i}", os.MFD_CLOEXEC)
        os.ftruncate(fd, size if i == 0 else 256 << 10)
        fds.append(fd)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        try:
            a.close()
            for _ in range(reps):
                _, got, _, _ = socket.recv_fds(b, 1, nfds)
                maps = [mmap.mmap(f, os.fstat(f).st_size) for f in got]
                for m in maps:
                    m.close()
                for f in got:
                    os.close(f)
                b.sendall(b"k")
        finally:
            os._exit(0)
    b.close()
    times = []
    try:
        for _ in range(reps):
            t0 = time.perf_counter()
            socket.send_fds(a, [b" "], fds)
            a.recv(1)
            times.append(time.perf_counter() - t0)
    finally:
        a.close()
        os.waitpid(pid, 0)
        for fd in fds:
            os.close(fd)
    return statistics.median(times)


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
        a = m.cmd("x-labkit-guest-stats")
        time.sleep(seconds)
        b = m.cmd("x-labkit-guest-stats")
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
                quiesce_ms.append(m.cmd("x-labkit-guest-stats")["last-stop-quiesce-ns"] / 1e6)
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
                from labkit.host.runners import get_backend

                get_backend("qemu")
            except Exception as e:  # noqa: BLE001 - any reason the backend cannot load is reported
                skipped[b] = f"qemu backend unavailable: {e}"
                continue
        out.append(b)
    return out, skipped


def run_matrix(plan: BenchPlan, progress=None) -> list[dict[str, Any]]:
    """One row per migration: the flattened Result plus the cell's coordinates."""
    from labkit.lab.engine import migrate

    rows = []
    cells = [
        (b, m, r, d) for b in plan.backends for m in plan.modes for r in plan.rams for d in plan.dirty_rates
    ]
    for backend, mode, ram, dirty in cells:
        for rep in range(plan.reps):
            # the emulated guest starts with all its RAM written (prefill), as the real guest soon has, so
            # pre-copy moves pages rather than skipping zero runs
            res = migrate(
                backend=backend,
                mode=mode,
                ram=ram,
                dirty_rate=dirty,
                max_bandwidth=plan.max_bandwidth,
                seed=rep + 1,
                warmup=0.3,
                prefill=backend == "emulated",
            )
            row = res.flat()
            row["rep"] = rep
            row["pause_breakdown"] = [asdict(b) for b in res.pause_breakdown]
            rows.append(row)
            if progress is not None:
                progress.update(1)
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
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


def summarise_breakdown(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
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


def _cell(summary, backend, mode, ram=None, dirty=0, pick=min):
    cands = [s for s in summary if s["backend"] == backend and s["mode"] == mode and s["dirty_rate"] == dirty]
    if not cands:
        return None
    if ram is None:
        return cands
    rams = [s["ram_bytes"] for s in cands]
    target = pick(rams) if ram in ("min", "max") else ram
    return next((s for s in cands if s["ram_bytes"] == target), None)


def compute_ratios(summary: list[dict], ceilings: dict[str, float]) -> dict[str, dict[str, Any]]:
    def ratio(a, b):
        return None if a is None or b in (None, 0) else a / b

    def get(backend, mode, which, key):
        c = _cell(summary, backend, mode, which, pick=min if which == "min" else max)
        return None if c is None else c.get(key)

    key = "pause_ms_events_median"
    values: dict[str, float | None] = {}
    # same RAM size on both backends: the smallest one measured on both
    common = sorted(
        {s["ram_bytes"] for s in summary if s["mode"] == "cpr-transfer" and s["backend"] == "emulated"}
        & {s["ram_bytes"] for s in summary if s["mode"] == "cpr-transfer" and s["backend"] == "qemu"}
    )
    if common:
        e = _cell(summary, "emulated", "cpr-transfer", common[0])
        q = _cell(summary, "qemu", "cpr-transfer", common[0])
        values["cpr_pause_emulated_over_qemu"] = ratio(e and e[key], q and q[key])
    else:
        values["cpr_pause_emulated_over_qemu"] = None
    for backend in ("emulated", "qemu"):
        values[f"cpr_pause_largest_over_smallest_{backend}"] = ratio(
            get(backend, "cpr-transfer", "max", key), get(backend, "cpr-transfer", "min", key)
        )
    tkey = "precopy_bytes_per_s_median"
    e_tp = get("emulated", "normal", "max", tkey)
    q_tp = get("qemu", "normal", "max", tkey)
    values["precopy_throughput_emulated_over_qemu"] = ratio(e_tp, q_tp)
    values["precopy_throughput_over_socket_ceiling"] = ratio(
        e_tp, ceilings.get("socket_sendfile_bytes_per_s")
    )
    floor_ms = ceilings.get("fd_pass_round_trip_s")
    values["cpr_pause_over_fd_pass_floor"] = ratio(
        get("emulated", "cpr-transfer", "min", key), None if floor_ms is None else floor_ms * 1000
    )
    out = {}
    for name, (op, target) in RATIO_TARGETS.items():
        v = values.get(name)
        met = None if v is None else (v <= target if op == "<=" else v >= target)
        out[name] = {"value": None if v is None else round(v, 4), "target": f"{op} {target}", "met": met}
    return out


def run_bench(plan: BenchPlan, show_progress: bool = True) -> dict[str, Any]:
    from tqdm.auto import tqdm

    backends, skipped = available_backends(plan.backends)
    plan.backends = backends
    total = len(backends) * len(plan.modes) * len(plan.rams) * len(plan.dirty_rates) * plan.reps
    t0 = time.monotonic()
    ceilings = {
        "memcpy_bytes_per_s": ceiling_memcpy(),
        "socket_sendfile_bytes_per_s": ceiling_socket_sendfile(),
        "fd_pass_round_trip_s": ceiling_fd_pass(),
    }
    vm = vm_bench(plan.vm_reps)
    with tqdm(total=total, desc="migrations", disable=not show_progress, leave=False) as bar:
        rows = run_matrix(plan, bar)
    summary = summarise(rows)
    return {
        "machine": machine_facts(),
        "plan": {
            "modes": plan.modes,
            "rams": plan.rams,
            "dirty_rates": plan.dirty_rates,
            "backends": backends,
            "reps": plan.reps,
            "max_bandwidth": plan.max_bandwidth,
        },
        "skipped_backends": skipped,
        "ceilings": ceilings,
        "vm": vm,
        "cells": summary,
        "pause_breakdown": summarise_breakdown(rows),
        "runs": rows,
        "ratios": compute_ratios(summary, ceilings),
        "seconds": round(time.monotonic() - t0, 1),
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


def format_report(report: dict[str, Any]) -> str:
    from labkit.qemu_syntax import human_size

    lines = []
    m = report["machine"]
    lines.append(f"machine: {m['cpu']} x{m['cores']}, kernel {m['kernel']}, KVM {m['kvm']}, QEMU {m['qemu']}")
    c = report["ceilings"]
    lines.append(
        f"ceilings: memcpy {human_size(c['memcpy_bytes_per_s'])}/s, unix socket sendfile "
        f"{human_size(c['socket_sendfile_bytes_per_s'])}/s, memfd pass+map round trip "
        f"{c['fd_pass_round_trip_s'] * 1000:.3f} ms"
    )
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
    lines.append("ratios (targets are reported, not asserted):")
    for name, r in report["ratios"].items():
        mark = {True: "met", False: "NOT met", None: "n/a"}[r["met"]]
        lines.append(f"  {name:45s} {f(r['value'], '{:.3f}'):>8s}  target {r['target']:>7s}  {mark}")
    lines.append(f"\n{len(report['runs'])} migrations in {report['seconds']} s")
    return "\n".join(lines)
