#!/usr/bin/env python3
"""4 KiB against 2 MiB pages under cpr-transfer, at several RAM sizes, both backends; writes data/ files.

    flock /tmp/labkit-heavy.lock python3 scripts/hugetlb_sweep.py [--ram 256M --ram 1G --ram 8G]
        [--backend emulated --backend qemu] [--page 4K --page 2M] [--reps 3] [--dirty-rate 256M]
        [--out-dir data] [--stamp NAME]

Writes OUT/hugetlb-sweep-STAMP.json (the command, machine facts, load averages, every run, the per-cell
summary and the flatness verdicts) and OUT/hugetlb-sweep-STAMP.csv (the summary, headed by the command and the
machine as comment lines), and prints the table. The 2 MiB cells grow the huge page pool as root and put it
back afterwards (labkit.host.hugepages.pool_reserved). Guests up to 8 GiB: on a shared machine take the heavy
lock, as above.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import sys
import time

from labkit.measure.hugetlb_sweep import (
    HugetlbSweepPlan,
    flatness,
    format_summary,
    run_hugetlb_sweep,
    sweep_report,
)
from labkit.qemu_syntax import SizeError, parse_size


def _ram(text: str) -> int:
    try:
        return parse_size(text, "m")
    except SizeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="hugetlb_sweep.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--ram", action="append", type=_ram, help="repeatable (default 256M, 1G, 8G)")
    p.add_argument(
        "--backend", action="append", choices=["emulated", "qemu"], help="repeatable (default both)"
    )
    p.add_argument("--page", action="append", choices=["4K", "2M"], help="repeatable (default both)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dirty-rate", default="256M", help="the guest's write rate (bytes/s)")
    p.add_argument("--out-dir", default="data")
    p.add_argument("--stamp", default=time.strftime("%Y%m%d", time.gmtime()))
    p.add_argument("--note", default=None, help="stored in the JSON: which tree ran, under which lock")
    args = p.parse_args(argv)
    plan = HugetlbSweepPlan(reps=args.reps, dirty_rate=args.dirty_rate)
    if args.ram:
        plan.rams = sorted(args.ram)
    if args.backend:
        plan.backends = args.backend
    if args.page:
        plan.pages = args.page
    command = "python3 scripts/hugetlb_sweep.py " + " ".join(shlex.quote(a) for a in argv)
    started, load_before = time.time(), os.getloadavg()
    rows = run_hugetlb_sweep(plan, progress=lambda line: print(line, flush=True))
    report = sweep_report(plan, rows, command.strip(), started, load_before)
    if args.note:
        report["note"] = args.note
    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.join(args.out_dir, f"hugetlb-sweep-{args.stamp}")
    with open(f"{base}.json", "w") as f:
        json.dump(report, f, indent=1, default=str)
        f.write("\n")
    with open(f"{base}.csv", "w", newline="") as f:
        f.write(f"# command: {report['command']}\n")
        f.write(f"# machine: {json.dumps(report['machine'])}\n")
        f.write(
            f"# load average before {report['load_average_before']}, after {report['load_average_after']}\n"
        )
        columns = list(dict.fromkeys(k for c in report["summary"] for k in c))
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for c in report["summary"]:
            w.writerow({k: (" ".join(map(str, v)) if isinstance(v, list) else v) for k, v in c.items()})
    print()
    print(format_summary(report["summary"], flatness(report["summary"])))
    print(f"\nload average before {report['load_average_before']}, after {report['load_average_after']}")
    print(f"wrote {base}.json and {base}.csv in {report['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
