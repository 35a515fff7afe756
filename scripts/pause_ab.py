#!/usr/bin/env python3
"""The emulated pause broken down by checkpoint, for two (or more) labkit trees run turn about.

On a shared machine the load changes from minute to minute, so two bench runs minutes apart compare the
load as much as the code. This runs one emulated cpr-transfer migration with tree A, then one with tree B,
and so on (each tree's code runs in both VM processes through PYTHONPATH), and prints per tree the median
STOP -> RESUME and the median time between consecutive checkpoints (labkit.lab.breakdown).

    python scripts/pause_ab.py A_TREE B_TREE [--pairs 10] [--ram 256M]... [--mode cpr-transfer] [--json FILE]

A tree is a directory holding a labkit package, e.g. `git archive REV | tar -x -C DIR`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ONE_RUN = """
import json, sys
from dataclasses import asdict
from labkit.lab.engine import migrate
r = migrate(mode=sys.argv[1], ram=sys.argv[2], prefill=True, seed=int(sys.argv[3]))
assert r.status == "completed" and r.guest_verified, (r.error, r.verify)
print(json.dumps({"events": r.pause_ms["events"], "guest": r.pause_ms["guest"],
                  "breakdown": [asdict(b) for b in r.pause_breakdown]}))
"""


def one_run(tree: str, mode: str, ram: str, seed: int) -> dict:
    root = Path(tree).resolve()
    env = {**os.environ, "PYTHONPATH": str(root)}
    # run in the tree itself: `python -c` and the VMs' `python -m` put the working directory ahead of
    # PYTHONPATH, so started anywhere else (the repository's root) every tree would import that one's labkit
    out = subprocess.run(
        [sys.executable, "-c", ONE_RUN, mode, ram, str(seed)],
        env=env,
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trees", nargs="+", help="one or more trees, taking turns")
    p.add_argument("--pairs", type=int, default=10)
    p.add_argument("--ram", action="append", help="repeatable: the RAM sizes take turns too (default 256M)")
    p.add_argument("--mode", default="cpr-transfer")
    p.add_argument("--json", help="write every run and the medians here")
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from labkit.lab.breakdown import breakdown_steps

    rams = args.ram or ["256M"]
    # one RAM size: keyed by tree, as before; several: by "tree RAM", all taking turns in one session
    cells = [(t, r, t if len(rams) == 1 else f"{t} {r}") for r in rams for t in args.trees]
    runs: dict[str, list[dict]] = {key: [] for _, _, key in cells}
    load_start = os.getloadavg()  # the machine is shared: the load says how far to trust the figures
    for i in range(args.pairs):
        for tree, ram, key in cells:
            runs[key].append(one_run(tree, args.mode, ram, i + 1))
    report = {"command": " ".join(sys.argv), "mode": args.mode, "ram": ",".join(rams), "trees": {}}
    report["loadavg"] = {"start": load_start, "end": os.getloadavg()}
    for tree, rs in runs.items():
        steps = breakdown_steps([r["breakdown"] for r in rs])
        guest = [r["guest"] for r in rs if r["guest"] is not None]
        report["trees"][tree] = {
            "events_ms_median": statistics.median(r["events"] for r in rs),
            "guest_ms_median": statistics.median(guest) if guest else None,
            "steps": steps["steps"],
            "t_ms_median": steps["t_ms_median"],
            "runs": rs,
        }
        print(
            f"{tree}: STOP -> RESUME median {report['trees'][tree]['events_ms_median']:.3f} ms, guest-seen "
            f"median {report['trees'][tree]['guest_ms_median']} ms, {len(rs)} runs"
        )
        for s in steps["steps"]:
            print(f"  {s['from']:38s} -> {s['to']:32s} {s['median_ms']:8.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
