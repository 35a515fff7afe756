#!/usr/bin/env python3
"""Run the fault tests and write docs/faults.md from what they observed.

    python scripts/fault_table.py                 # runs tests/test_faults.py, then renders docs/faults.md
    python scripts/fault_table.py --from out.json # renders from a recording made earlier
                                                  # (LABKIT_FAULTS_JSON=out.json pytest tests/test_faults.py)

The rows come from faults.FAULTS (what is broken, where, what QEMU's rules expect); the outcome columns
come only from the recording: each passing scenario appends what it saw. A fault point whose test did not pass
is shown as such, never filled in from the expectations.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the fault table is test support: tests/faults.py

from faults import FAULTS  # noqa: E402

HEADER = """# Faults mid-migration

What happens when a migration is broken at each phase, for each mode. **Generated** by
`python scripts/fault_table.py`, which runs `tests/test_faults.py` and renders what each test *observed* on real
processes (the destination killed, stopped or starved, the main channel cut, the source killed, a state file
truncated). Do not edit by hand.

QEMU's two rules, which every row follows:

* the destination dies **before** the source switched over: the source reports `failed` with a reason in
  `query-migrate`'s `error-desc`, and its guest runs on (QEMU restarts it if migration had stopped it);
* the destination dies **after** the source sent everything: there is no return path, the source says
  `completed` and sits in `postmigrate`; `cont` resumes it. Its memory is intact (with cpr-transfer: the very
  same memfds the destination had mapped and not yet run on).

A destination that cannot load its stream prints one line and exits with status 1, as QEMU does. In every row
the guest memory of the surviving VM is verified page by page (`x-labkit-verify`), the surviving process holds
exactly the fds it held before the migration, and the test process is checked for leaked processes and fds.
"""


def run_tests(out: str) -> int:
    env = {**os.environ, "LABKIT_FAULTS_JSON": out}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests/test_faults.py")]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def load(path: str) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                obj = json.loads(line)
                rows[obj["id"]] = obj
    return rows


def cell(text: str | None) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")


def render(observed: dict[str, dict]) -> str:
    out = [HEADER]
    passed = sum(f.id in observed for f in FAULTS)
    out.append(f"{passed} of {len(FAULTS)} fault points observed passing.\n")
    for mode in ("cpr-transfer", "normal", "cpr-reboot"):
        out.append(f"\n## {mode}\n")
        out.append("| # | phase | fault | expected (QEMU) | source | guest | other side | fds |")
        out.append("|---|---|---|---|---|---|---|---|")
        for i, f in enumerate([f for f in FAULTS if f.mode == mode], 1):
            o = observed.get(f.id)
            if o is None:
                row = [f.phase, f.fault, f.expected, "**test did not pass**", "", "", ""]
            else:
                source = o.get("source") or ""
                if o.get("migrate"):
                    source = f"`migrate` {o['migrate']}; " + source
                other = o.get("destination") or o.get("restoring process") or ""
                row = [
                    f.phase,
                    f.fault,
                    f.expected,
                    source,
                    o.get("guest", "lost with the killed source"),
                    other,
                ]
                row.append(o.get("fds", ""))
            out.append(f"| {i} | " + " | ".join(cell(c) for c in row) + " |")
    out.append("")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="src", help="a recording (JSON lines) instead of running the tests")
    ap.add_argument("--out", default=str(ROOT / "docs/faults.md"))
    args = ap.parse_args()
    rc = 0
    if args.src:
        observed = load(args.src)
    else:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "faults.json")
            open(path, "w").close()
            rc = run_tests(path)
            observed = load(path)
    Path(args.out).write_text(render(observed))
    print(f"wrote {args.out}: {len(observed)} of {len(FAULTS)} fault points observed")
    return rc


if __name__ == "__main__":
    sys.exit(main())
