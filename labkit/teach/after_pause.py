"""Notebook 08 "after the pause": the runs it takes and the figures it reads off them, kept here so the
notebook stays thin and this stays tested (tests/test_after_pause.py).

The story: cpr-transfer's pause is flat in RAM, but the new process maps guest RAM with empty page tables, so
the guest pays one page fault per page it touches after RESUME. With a guest that rewrites all its RAM, that
is RAM / page size faults: linear in RAM, 512 times fewer with 2 MiB pages. prealloc=on pays them when the
destination starts instead (before STOP, for cpr-transfer), at the price of a slower start and all of RAM
resident at once; where the new program starts inside the pause (cpr-exec), the same prealloc lands inside
the pause: QEMU's caveat "the guest pause time increases for large guest RAM backed by small pages".
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from typing import Any

from labkit.lab.engine import Lab
from labkit.lab.report import Result
from labkit.lab.scenario import Scenario
from labkit.qemu_syntax import parse_size

PAGE_4K = 4096
PAGE_2M = 2 << 20
GUEST_RATE = "1G"  # asks more than the emulated vCPU can write: it runs flat out, so a fault costs it time
WINDOW_MS = 500.0  # long enough for the guest to rewrite a 64 MiB RAM once after RESUME, on a busy machine


def run(mode: str = "cpr-transfer", ram: str = "64M", *, window_ms: float = WINDOW_MS, **kw: Any) -> Result:
    """One migration of a guest that has touched all its RAM (prefill) and writes flat out."""
    kw.setdefault("dirty_rate", GUEST_RATE)
    kw.setdefault("max_bandwidth", "1G")
    with Lab(mode=mode, ram=ram, prefill=True, progress_after_ms=window_ms, **kw) as lab:
        return lab.run()


def row(result: Result) -> dict[str, Any]:
    """The figures notebook 08 tabulates for one run."""
    p = result.post_resume
    ram_pages = result.ram_bytes // PAGE_4K
    return {
        "mode": result.mode,
        "ram_mib": result.ram_bytes >> 20,
        "ram_pages_4k": ram_pages,
        "pause_ms": result.pause_ms.get("events"),
        "pages_faulted": p.get("pages_faulted"),
        "faults_per_ram_page": None
        if p.get("pages_faulted") is None
        else round(p["pages_faulted"] / ram_pages, 2),
        "lost_ms": p.get("lost_ms"),
        "recover_ms": p.get("recover_ms"),
        "precopy_lost_ms": p.get("precopy_lost_ms"),
        "steady_mib_s": None if not p.get("steady_bytes_per_s") else round(p["steady_bytes_per_s"] / 2**20),
        "guest_verified": result.guest_verified,
    }


def sweep(rams: Iterable[str] = ("16M", "32M", "64M"), taken: Iterable[Result] = (), **kw: Any) -> Any:
    """cpr-transfer at each RAM size, plus runs already `taken` (not run again): one row each (pandas)."""
    import pandas as pd

    rows = [row(r) for r in taken] + [row(run("cpr-transfer", ram, **kw)) for ram in rams]
    return pd.DataFrame(rows).sort_values("ram_mib", ignore_index=True)


def fault_ratio(frame: Any) -> float | None:
    """Faults after RESUME at the largest RAM over those at the smallest: what the learner predicts."""
    f = frame.dropna(subset=["pages_faulted"]).sort_values("ram_mib")
    if len(f) < 2 or not f.pages_faulted.iloc[0]:
        return None
    return round(float(f.pages_faulted.iloc[-1] / f.pages_faulted.iloc[0]), 2)


def expected_faults(ram: str | int, page_size: int) -> int:
    """One fault per page of a guest that touches all its RAM once."""
    return parse_size(ram) // page_size


def hugetlb_unavailable(ram: str | int = "64M") -> str | None:
    """Why the huge-page part cannot run here (None when it can): the lab must offer Lab(hugetlb=...) and the
    host's pool must hold enough free 2 MiB pages for the guest's RAM (cpr-transfer shares one memfd)."""
    if "hugetlb" not in {f.name for f in dataclasses.fields(Scenario)}:  # Lab(**settings) makes a Scenario
        return "this labkit has no hugetlb option yet (Lab(hugetlb='2M') comes with `--hugetlb`)"
    free = huge_pages_free()
    need = parse_size(ram) // PAGE_2M
    if free is None:
        return "this kernel shows no huge page pool (/proc/meminfo has no HugePages_Free)"
    if free < need:
        return (
            f"the 2 MiB pool has {free} free pages, {need} are needed: as root, "
            f"`labkit hugepages --reserve {ram}` (or echo {need} > /proc/sys/vm/nr_hugepages)"
        )
    return None


def huge_pages_free() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("HugePages_Free:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def prealloc_pair(ram: str = "64M", without: Result | None = None, **kw: Any) -> Any:
    """cpr-transfer with prealloc off (or the run `without` it already taken), then on: post-resume faults
    against the time from `migrate` to STOP."""
    import pandas as pd

    rows = []
    for prealloc in (False, True):
        r = (
            without
            if without is not None and not prealloc
            else run("cpr-transfer", ram, prealloc=prealloc, **kw)
        )
        d = row(r)
        d["prealloc"] = prealloc
        d["migrate_to_stop_ms"] = migrate_to_stop_ms(r)
        rows.append(d)
    cols = ["prealloc", "pages_faulted", "lost_ms", "migrate_to_stop_ms", "pause_ms", "guest_verified"]
    return pd.DataFrame(rows)[cols]


def migrate_to_stop_ms(result: Result) -> float | None:
    """From the `migrate` command to the source's STOP: for cpr-transfer, the destination's start-up (and
    with prealloc=on its fault-in) while the guest still runs on the source."""
    t = {(r.side, r.kind, r.detail): r.t_ms for r in reversed(result.timeline)}
    start, stop = t.get(("source", "qmp", "migrate")), t.get(("source", "STOP", ""))
    return None if start is None or stop is None else round(stop - start, 1)


def cpu_count_note() -> str:
    """A line for the notebook: the figures are noisy on a shared machine (load average)."""
    load = os.getloadavg()[0]
    return f"load average now {load:.1f} on {os.cpu_count()} CPUs: rates and ms vary with it, fault counts do not"
