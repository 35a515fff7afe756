#!/usr/bin/env python3
"""The emulator's pre-copy throughput beside the socket ceiling, measured in the same session.

Runs `labkit bench`'s pre-copy cell (normal mode, a prefilled guest so pass 1 moves real pages, not zero
pages, warm-up 0.3 s, the idle dirty rate, max-bandwidth 10G) `--reps` times, and the socket ceiling
(labkit/measure/ceilings.py: memfd -> unix socket -> pre-faulted receiver, best of sendfile, sendmsg and
splice) before and after them, so load that comes and goes is seen by both. Writes one small JSON with the
exact command, `uptime`'s load averages, every run and the medians; every run's guest memory is verified
by the lab.

With `--tree NAME=PATH` (repeatable) the VMs of each run come from that labkit tree (PYTHONPATH; the lab side
is this one), the trees taking turns run by run, so load that comes and goes hits each alike; the socket
ceiling is then measured before, between the halves and after.

    flock /tmp/labkit-heavy.lock python3 scripts/precopy_throughput.py --ram 1G --reps 5 --out data/x.json
    python3 scripts/precopy_throughput.py --tree before=/tmp/base --tree after=$PWD --reps 5
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from labkit.lab.engine import migrate  # noqa: E402
from labkit.measure.bench import IDLE_RATE  # noqa: E402
from labkit.measure.ceilings import socket_ceiling  # noqa: E402
from labkit.qemu_syntax import parse_size  # noqa: E402


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ram", default="1G")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--label", default="", help="what this run measures (e.g. before, after)")
    ap.add_argument("--out", type=Path, default=None, help="JSON file to write (default: print only)")
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=PATH",
                    help="run the VMs from this labkit tree, turn about with the other --tree's")  # fmt: skip
    args = ap.parse_args()
    ram = parse_size(args.ram, "M")
    trees = dict(t.split("=", 1) for t in args.tree) or {"this tree": os.environ.get("PYTHONPATH", "")}
    load_before = uptime()
    ceilings = [socket_ceiling().as_dict()]
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for rep in range(args.reps):
        if len(trees) > 1 and rep == args.reps // 2:
            ceilings.append(socket_ceiling().as_dict())
        for name, path in trees.items():
            os.environ["PYTHONPATH"] = path
            res = migrate(
                mode="normal", ram=ram, prefill=True, warmup=0.3, dirty_rate=IDLE_RATE,
                max_bandwidth=10 << 30, seed=rep + 1,
            )  # fmt: skip
            row = res.flat()
            runs[name].append({k: row.get(k) for k in (
                "precopy_bytes_per_s", "first_pass_bytes_per_s", "passes", "bytes_main", "total_ms",
                "pause_ms_reported", "guest_verified",
            )})  # fmt: skip
            print(f"run {rep + 1} {name}: pre-copy {row['precopy_bytes_per_s'] / 1e9:.2f} GB/s, pass 1 "
                  f"{row['first_pass_bytes_per_s'] / 1e9:.2f} GB/s, verified {row['guest_verified']}", flush=True)  # fmt: skip
    ceilings.append(socket_ceiling().as_dict())
    ceiling = statistics.median(c["value"] for c in ceilings)
    medians = {
        name: {
            "precopy_bytes_per_s_median": statistics.median(r["precopy_bytes_per_s"] for r in rs),
            "first_pass_bytes_per_s_median": statistics.median(r["first_pass_bytes_per_s"] for r in rs),
        }
        for name, rs in runs.items()
    }
    for m in medians.values():
        m["precopy_over_ceiling"] = round(m["precopy_bytes_per_s_median"] / ceiling, 3)
        m["first_pass_over_ceiling"] = round(m["first_pass_bytes_per_s_median"] / ceiling, 3)
    out = {
        "label": args.label,
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=False).stdout.strip(),  # fmt: skip
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": os.cpu_count(),
        "uptime_before": load_before,
        "uptime_after": uptime(),
        "scenario": {"mode": "normal", "ram": ram, "prefill": True, "warmup": 0.3, "dirty_rate": IDLE_RATE,
                     "max_bandwidth": 10 << 30},  # fmt: skip
        "trees": trees,
        "runs": runs,
        "medians": medians,
        "socket_ceilings": [{k: c[k] for k in ("value", "method", "methods")} for c in ceilings],
        "socket_ceiling_bytes_per_s": ceiling,
    }
    for name, m in medians.items():
        print(f"{name}: median pre-copy {m['precopy_bytes_per_s_median'] / 1e9:.2f} GB/s, pass 1 "
              f"{m['first_pass_bytes_per_s_median'] / 1e9:.2f} GB/s, socket ceiling {ceiling / 1e9:.2f} GB/s: "
              f"ratio {m['precopy_over_ceiling']} (pass 1 {m['first_pass_over_ceiling']})")  # fmt: skip
    if args.out is not None:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
