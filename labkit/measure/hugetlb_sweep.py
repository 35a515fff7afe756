"""4 KiB against 2 MiB pages under cpr-transfer, at several RAM sizes, on both backends.

QEMU's CPR documentation warns that "the guest pause time increases for large guest RAM backed by small
pages". This sweep measures that claim here: the pause three ways (reported, STOP->RESUME, guest-seen) and,
where the Result carries it, the first-touch cost after RESUME (`post_resume`), for guest RAM in an ordinary
memfd and in a 2 MiB hugetlb memfd. Each run also records what the kernel really gave the destination's guest
RAM (KernelPageSize in /proc/PID/smaps) and whether both processes mapped the same inode, so a row cannot
claim huge pages it did not get.

A 2 MiB cell needs its pages in the pool: as root the sweep grows the pool for the cell and puts nr_hugepages
back after it; otherwise it uses what is free, or records the cell as skipped with the reason.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from labkit.host.hugepages import HugePageError, kernel_page_size, pages_for, pool_for, pool_reserved
from labkit.lab.engine import Lab, LabError
from labkit.qemu_syntax import GiB, MiB, format_size

PAGE_SIZES = {"4K": None, "2M": 2 * MiB}  # label -> Lab(hugetlb=...)
PAUSES = ("reported", "events", "guest")
FLAT = 1.3  # "flat": the largest RAM's median pause at most 1.3x the smallest's


@dataclass
class HugetlbSweepPlan:
    """What to run: every backend x page size x RAM size, `reps` times, cpr-transfer, one guest workload."""

    rams: list[int] = field(default_factory=lambda: [256 * MiB, 1 * GiB, 8 * GiB])
    pages: list[str] = field(default_factory=lambda: ["4K", "2M"])
    backends: list[str] = field(default_factory=lambda: ["emulated", "qemu"])
    reps: int = 3
    dirty_rate: str = "256M"
    timeout: float = 120.0


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _one_run(backend: str, ram: int, page: str, rep: int, plan: HugetlbSweepPlan) -> dict[str, Any]:
    """One cpr-transfer; the row holds the Result's pause figures, post_resume if any, and what smaps saw."""
    row: dict[str, Any] = {"backend": backend, "ram_bytes": ram, "page": page, "rep": rep, "load_1m": _load()}
    try:
        lab = Lab(
            backend=backend, mode="cpr-transfer", ram=ram, hugetlb=PAGE_SIZES[page],
            dirty_rate=plan.dirty_rate, seed=1 + rep, timeout=plan.timeout,
        )  # fmt: skip
    except LabError as e:
        return {**row, "status": "refused", "error": str(e)}
    with lab:
        r = lab.run()
        flat = r.flat()
        row.update(status=r.status, error=r.error, guest_verified=r.guest_verified, total_ms=r.total_ms)
        for p in PAUSES:
            row[f"pause_ms_{p}"] = r.pause_ms.get(p)
        row.update({k: v for k, v in flat.items() if k.startswith("post_resume_")})
        ram0 = [m for m in r.mappings if m.block == lab.config.backend_id]
        inodes = {m.inode for m in ram0}
        row["same_inode"] = len(inodes) == 1 and {m.side for m in ram0} == {"source", "destination"}
        dst = r.pids.get("destination")
        row["dst_kernel_page_size"] = (
            kernel_page_size(dst, next(iter(inodes))) if dst and len(inodes) == 1 else None
        )
    return row


def run_hugetlb_sweep(
    plan: HugetlbSweepPlan, progress: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """Every cell of the plan, one row per run. Cells run in the order backend, page size, RAM, so one
    huge-page reservation serves a whole cell and is released before the next."""
    say = progress or (lambda _text: None)
    rows: list[dict[str, Any]] = []
    for backend in plan.backends:
        for page in plan.pages:
            for ram in plan.rams:
                cell = f"{backend} {page} {format_size(ram)}"
                huge = PAGE_SIZES[page]
                if huge is None:
                    for rep in range(plan.reps):
                        rows.append(_one_run(backend, ram, page, rep, plan))
                        say(_progress_line(cell, rows[-1]))
                    continue
                need = pages_for(ram, huge)
                try:
                    if os.geteuid() != 0 and pool_for(huge).available < need:
                        raise HugePageError(
                            f"not root, and the pool has {pool_for(huge).available} of {need} pages free"
                        )
                    with pool_reserved(huge, need):
                        for rep in range(plan.reps):
                            rows.append(_one_run(backend, ram, page, rep, plan))
                            say(_progress_line(cell, rows[-1]))
                except HugePageError as e:
                    rows.append({"backend": backend, "ram_bytes": ram, "page": page, "rep": None,
                                 "status": "skipped", "error": str(e)})  # fmt: skip
                    say(f"{cell}: skipped: {e}")
    return rows


def _progress_line(cell: str, row: dict[str, Any]) -> str:
    pauses = " ".join(f"{p}={row.get(f'pause_ms_{p}')}" for p in PAUSES)
    faults = row.get("post_resume_pages_faulted")
    extra = f" post-resume faults={faults}" if faults is not None else ""
    return (
        f"{cell} rep {row['rep']}: {row['status']} {pauses} ms, dst page {row.get('dst_kernel_page_size')}, "
        f"verified={row.get('guest_verified')}{extra} (load {row['load_1m']})"
    )


def summarize_sweep(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per backend, page size and RAM: medians (and min/max) of every pause figure and post-resume cost."""
    keys = sorted({(r["backend"], r["page"], r["ram_bytes"]) for r in rows})
    figures = [f"pause_ms_{p}" for p in PAUSES] + sorted(
        {k for r in rows for k in r if k.startswith("post_resume_") and isinstance(r[k], (int, float))}
    )
    out = []
    for backend, page, ram in keys:
        runs = [r for r in rows if (r["backend"], r["page"], r["ram_bytes"]) == (backend, page, ram)]
        done = [r for r in runs if r.get("status") == "completed"]
        cell: dict[str, Any] = {
            "backend": backend, "page": page, "ram_bytes": ram, "runs": len(runs), "completed": len(done),
            "verified": sum(bool(r.get("guest_verified")) for r in done),
            "same_inode": sum(bool(r.get("same_inode")) for r in done),
            "dst_kernel_page_size": sorted({r.get("dst_kernel_page_size") for r in done} - {None}),
            "load_1m_median": _median([r.get("load_1m") for r in runs]),
            "skipped": next((r["error"] for r in runs if r.get("status") == "skipped"), None),
        }  # fmt: skip
        for f in figures:
            vals = [
                r[f] for r in done if isinstance(r.get(f), (int, float)) and not isinstance(r.get(f), bool)
            ]
            cell[f"{f}_median"] = _median(vals)
            cell[f"{f}_min"] = min(vals) if vals else None
            cell[f"{f}_max"] = max(vals) if vals else None
        out.append(cell)
    return out


def _median(values: Sequence[Any]) -> float | None:
    vals = [v for v in values if isinstance(v, (int, float))]
    return round(statistics.median(vals), 3) if vals else None


@dataclass
class Flatness:
    """One pause figure from the smallest to the largest RAM size, for one backend and page size."""

    backend: str
    page: str
    figure: str
    small_ram: int
    large_ram: int
    small_ms: float | None
    large_ms: float | None
    ratio: float | None
    flat: bool | None  # ratio <= FLAT; None when either median is missing

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def flatness(summary: Sequence[dict[str, Any]]) -> list[Flatness]:
    """Is the pause flat from the smallest RAM to the largest (ratio of medians <= 1.3)?"""
    out = []
    for backend, page in sorted({(c["backend"], c["page"]) for c in summary}):
        cells = sorted((c for c in summary if (c["backend"], c["page"]) == (backend, page)),
                       key=lambda c: c["ram_bytes"])  # fmt: skip
        if len(cells) < 2:
            continue
        lo, hi = cells[0], cells[-1]
        for p in PAUSES:
            a, b = lo.get(f"pause_ms_{p}_median"), hi.get(f"pause_ms_{p}_median")
            ratio = round(b / a, 3) if a and b is not None else None
            flat = None if ratio is None else ratio <= FLAT
            out.append(Flatness(backend, page, p, lo["ram_bytes"], hi["ram_bytes"], a, b, ratio, flat))
    return out


def format_summary(summary: Sequence[dict[str, Any]], flat: Sequence[Flatness]) -> str:
    """A table people can read: one line per cell, then the flatness verdicts."""
    lines = [
        f"{'backend':9s} {'page':4s} {'RAM':>5s} {'runs':>4s} {'ok':>3s} {'reported':>9s} {'events':>8s} "
        f"{'guest':>8s} {'faults':>8s} {'lost ms':>8s} {'dst page':>9s} {'load':>5s}"
    ]

    def ms(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}"

    for c in summary:
        faults = c.get("post_resume_pages_faulted_median")
        lines.append(
            f"{c['backend']:9s} {c['page']:4s} {format_size(c['ram_bytes']):>5s} {c['runs']:>4d} "
            f"{c['completed']:>3d} {ms(c['pause_ms_reported_median']):>9s} {ms(c['pause_ms_events_median']):>8s} "
            f"{ms(c['pause_ms_guest_median']):>8s} {'-' if faults is None else f'{faults:.0f}':>8s} "
            f"{ms(c.get('post_resume_lost_ms_median')):>8s} "
            f"{','.join(format_size(s) for s in c['dst_kernel_page_size']) or '-':>9s} "
            f"{ms(c['load_1m_median']):>5s}" + (f"  skipped: {c['skipped']}" if c["skipped"] else "")
        )
    lines.append("")
    for f in flat:
        verdict = "n/a" if f.flat is None else ("flat" if f.flat else "grows")
        lines.append(
            f"{f.backend:9s} {f.page:3s} {f.figure:9s} {format_size(f.small_ram)} {ms(f.small_ms)} ms -> "
            f"{format_size(f.large_ram)} {ms(f.large_ms)} ms: x{f.ratio} {verdict} (flat means <= {FLAT}x)"
        )
    return "\n".join(lines)


def sweep_report(plan: HugetlbSweepPlan, rows: list[dict[str, Any]], command: str, started: float,
                 load_before: tuple[float, float, float]) -> dict[str, Any]:  # fmt: skip
    """Everything a data file holds: the exact command, the machine, the plan, every run, the summary."""
    from labkit.host.hugepages import read_pools
    from labkit.measure.bench import machine_facts

    summary = summarize_sweep(rows)
    facts = machine_facts()
    facts["mem_total_bytes"] = _meminfo("MemTotal")
    facts["transparent_hugepage"] = _read("/sys/kernel/mm/transparent_hugepage/enabled")
    facts["hugepage_pools_after"] = [p.to_dict() for p in read_pools()]
    return {
        "command": command,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "machine": facts,
        "plan": asdict(plan),
        "runs": rows,
        "summary": summary,
        "flatness": [f.to_dict() for f in flatness(summary)],
    }


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _meminfo(key: str) -> int | None:
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    return None
