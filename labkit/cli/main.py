"""`labkit`: doctor | migrate | demo | bench | cpr-inspect | stream-inspect | vm | lab | hugepages.

Every failure a user can cause ends in one line on stderr and exit status 1, never a traceback
(LABKIT_DEBUG=1 shows the traceback of an unexpected one).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import TYPE_CHECKING

from labkit.qemu_syntax import SizeError, format_ms, parse_size

if TYPE_CHECKING:
    from labkit.lab.scenario import Scenario


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (the usage is one `--help` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except SizeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _ram(text: str) -> int:
    try:
        return parse_size(text, "m")
    except SizeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def cmd_doctor(args: argparse.Namespace) -> int:
    from labkit.cli.doctor import doctor, format_doctor

    report = doctor()
    print(json.dumps(report, indent=2) if args.json else format_doctor(report))
    return 0


def _migration_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="emulated", choices=["emulated", "qemu"])
    p.add_argument(
        "--mode", default="cpr-transfer", choices=["normal", "cpr-reboot", "cpr-transfer", "cpr-exec"]
    )
    p.add_argument("--ram", default="256M", type=_ram, help="guest RAM (QEMU size: 256M, 1G; default unit M)")
    p.add_argument("--memory-backend", default="memfd", choices=["memfd", "ram", "file", "epc", "none"])
    p.add_argument(
        "--share",
        default=None,
        choices=["on", "off"],
        help="share= of the memory backend (default: the backend's own, on for memfd, off for ram/file)",
    )
    p.add_argument("--aux-ram-share", default="on", choices=["on", "off"])
    p.add_argument(
        "--hugetlb", default=None, metavar="SIZE", help="huge page size for guest RAM (2M): a hugetlb memfd"
    )
    p.add_argument("--dirty-rate", default="0", type=_size, help="bytes/s the guest writes (e.g. 256M)")
    p.add_argument("--pattern", default="sequential", choices=["sequential", "random", "hotset"])
    p.add_argument("--working-set", default=None, type=_size)
    p.add_argument("--downtime-limit", default=300, type=int, help="ms (QEMU's default 300)")
    p.add_argument("--max-bandwidth", default="10G", type=_size, help="bytes/s (QEMU's default is 128M)")
    p.add_argument(
        "--defer",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start the destination with -incoming defer (default: only a real QEMU cpr-transfer destination, "
        "so the lab connects to its monitor before RESUME)",
    )
    p.add_argument("--seed", default=1, type=int)
    p.add_argument("--timeout", default=60.0, type=float, help="seconds to wait for any one phase")
    p.add_argument("--prealloc", default="off", choices=["on", "off"], help="prealloc= of the memory backend")
    p.add_argument(
        "--progress-after",
        default=250.0,
        type=float,
        metavar="MS",
        help="sample the guest's progress this long after RESUME (post_resume's window; 0: no sampling)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _scenario(args: argparse.Namespace, **changes: object) -> Scenario:
    """The Scenario the migration options describe (a LabError names the option it refuses)."""
    from labkit.lab.scenario import Scenario

    return Scenario(
        backend=args.backend, mode=args.mode, ram=args.ram, memory_backend=args.memory_backend,
        share=None if args.share is None else args.share == "on", aux_ram_share=args.aux_ram_share == "on",
        dirty_rate=args.dirty_rate, pattern=args.pattern, working_set=args.working_set,
        downtime_limit=args.downtime_limit, max_bandwidth=args.max_bandwidth, defer=args.defer,
        seed=args.seed, timeout=args.timeout, prealloc=args.prealloc == "on",
        progress=args.progress_after > 0, progress_after_ms=args.progress_after, hugetlb=args.hugetlb,
    ).with_(**changes)  # fmt: skip


def cmd_migrate(args: argparse.Namespace) -> int:
    from labkit.lab.engine import LabError, migrate

    try:
        result = migrate(_scenario(args))
    except LabError as e:
        print(f"labkit: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(result.to_json())
    else:
        print(result.summary(include_error=False))
    if result.status != "completed":
        if not args.json:
            print(
                f"labkit: migration {result.status}: {result.error}{_flag_hint(args, result.error)}",
                file=sys.stderr,
            )
        return 1
    return 0


def _flag_hint(args: argparse.Namespace, error: str | None) -> str:
    """After QEMU's refusal, the labkit flag that fixes it (QEMU names its own properties, not ours)."""
    if not error or "share=on is required" not in error:
        return ""
    fixes = []
    if args.memory_backend in ("ram", "epc", "none"):
        fixes.append("--memory-backend memfd")
    elif args.share == "off":
        fixes.append("--share on")
    if args.aux_ram_share == "off":
        fixes.append("--aux-ram-share on")
    return f" (labkit: use {' '.join(fixes)})" if fixes else ""


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: migrate the same guest with each mode, side by side, and draw what happened."""
    import os

    from labkit.lab.engine import migrate
    from labkit.lab.report import concat
    from labkit.measure import plots

    rows = []
    for mode in ("cpr-transfer", "normal", "cpr-reboot"):
        print(
            f"-- {mode}: migrating a {args.ram >> 20} MiB guest that writes {args.dirty_rate >> 20} MiB/s ...",
            flush=True,
        )
        # the demo draws no progress series: no sampler competing for the cores, no 250 ms watched after RESUME
        rows.append(migrate(_scenario(args, mode=mode, progress=False)))
    print()
    print(
        f"{'mode':13s} {'status':10s} {'pause: reported':>16s} {'STOP->RESUME':>13s} {'guest-seen':>11s} "
        f"{'total':>9s} {'main bytes':>12s} {'cpr bytes':>10s}  verified"
    )
    ms = format_ms
    for r in rows:
        p = r.pause_ms
        print(
            f"{r.mode:13s} {r.status:10s} {ms(p['reported']):>16s} {ms(p['events']):>13s} {ms(p['guest']):>11s} "
            f"{ms(r.total_ms):>9s} {r.bytes['main'] or 0:>12d} {r.bytes['cpr'] or 0:>10d}  {r.guest_verified}"
        )
        if r.error:
            print(f"  {r.mode}: {r.error}")
    os.makedirs(args.out, exist_ok=True)
    figures = {}
    for r in rows:
        figures[f"timeline-{r.mode}.png"] = plots.plot_timeline(r)
        figures[f"sequence-{r.mode}.png"] = plots.plot_sequence(r)
        figures[f"address-space-{r.mode}.png"] = plots.plot_address_space(r.mappings, f"guest RAM: {plots.conditions(r)}")
    normal = next(r for r in rows if r.mode == "normal")
    figures["passes-normal.png"] = plots.plot_passes(normal)
    frame = concat(rows)
    frame.to_csv(os.path.join(args.out, "results.csv"), index=False)
    headline = _demo_headline(args, figures)
    for name, fig in figures.items():
        fig.savefig(os.path.join(args.out, name), dpi=110)
    print(f"\nwrote {len(figures)} figures and results.csv into {os.path.abspath(args.out)}/")
    print(
        "cpr-transfer hands the guest's memfds to the new process: its main channel carries device state only;"
    )
    print("normal pre-copy copies every page, pass after pass; cpr-reboot saves to a file and starts anew.")
    print(headline)
    return 0 if all(r.status == "completed" for r in rows) else 1


def _demo_headline(args: argparse.Namespace, figures: dict) -> str:
    """The headline at three RAM sizes (a quarter, half and all of --ram) with a busy guest at QEMU's default
    bandwidth: one size cannot show that a pause does or does not grow with RAM."""
    from labkit.measure.sweeps import HEADLINE, headline_sweep, plot_headline
    from labkit.teach.predictions import PAUSE_NOISE_MS, grows

    rams = [max(args.ram // 4, 16 << 20), max(args.ram // 2, 16 << 20), args.ram]
    print(f"\n-- the headline: normal and cpr-transfer at {', '.join(f'{r >> 20} MiB' for r in rams)}, a guest")
    print(f"   rewriting a hot set of RAM/4 at {HEADLINE['dirty_rate']}/s over QEMU's default 128 MiB/s link ...")
    frame = headline_sweep(rams, progress=False, backend=args.backend, progress_after_ms=0.0)
    figures["headline-pause-vs-ram.png"] = plot_headline(frame)
    lines = []
    for mode in ("normal", "cpr-transfer"):
        med = frame[frame["mode"] == mode].groupby("ram_bytes")["pause_ms_events"].median()
        shown = ", ".join(f"{ram >> 20} MiB: {ms:.1f} ms" for ram, ms in med.items())
        verdict = "grows" if grows(med.index, med.values, min_rise=PAUSE_NOISE_MS) else "does not grow"
        lines.append(f"{mode:13s} pause {shown} -> {verdict}")
    return "\n".join(lines)


def cmd_bench(args: argparse.Namespace) -> int:
    import os
    import shlex

    from labkit.measure.bench import BenchPlan, format_report, run_bench, write_csv

    backends = args.backend or ["emulated", "qemu"]
    plan = BenchPlan.quick(backends) if args.quick else BenchPlan(backends=backends)
    if args.ram:
        plan.rams = args.ram
        plan.precopy_rams = []  # pre-copy at the RAM sizes asked for, unless --precopy-ram says otherwise
    if args.dirty_rate:
        plan.dirty_rates = args.dirty_rate
    if args.mode:
        plan.modes = args.mode
    if args.reps:
        plan.reps = args.reps
    if args.precopy_ram:
        plan.precopy_rams = args.precopy_ram
    if any((args.ram, args.dirty_rate, args.mode, args.reps, args.precopy_ram)):
        plan.name += " with options"  # the report's plan says what ran; the name says it is not the stock one
    report = run_bench(plan, show_progress=not args.json)
    command = "labkit " + " ".join(shlex.quote(a) for a in args.argv)
    report["command"] = command  # with the plan, what a stored run was made by
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        write_csv(report, args.csv, command)
    if args.json:
        print(json.dumps(report, default=str))
    else:
        print(format_report(report))
        if args.csv:
            print(f"wrote {args.csv}")
    for line in report["ceiling_breaches"]:  # a rate above its ceiling proves the ceiling wrong: fail loudly
        print(f"labkit bench: {line}", file=sys.stderr)
    return 1 if report["ceiling_breaches"] else 0


def cmd_cpr_inspect(args: argparse.Namespace) -> int:
    from labkit.vm.migration.cpr_inspect import main as cpr_main

    return cpr_main([args.path] + (["--timeout", str(args.timeout)] if args.timeout else []))


def cmd_stream_inspect(args: argparse.Namespace) -> int:
    from labkit.measure.stream_inspect import main as stream_main

    return stream_main([args.path] + (["--json"] if args.json else []))


def cmd_vm(args: argparse.Namespace) -> int:
    from labkit.vm.__main__ import main as vm_main

    return vm_main(args.vm_args)


def cmd_hugepages(args: argparse.Namespace) -> int:
    from labkit.cli.hugepages import main as hugepages_main

    return hugepages_main(args.reserve, args.page_size, args.json)


def cmd_lab(args: argparse.Namespace) -> int:
    from labkit.cli.jupyter import run_jupyter_lab

    return run_jupyter_lab(args.notebooks, port=args.port, browser=args.browser, extra=args.jupyter_args)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="labkit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"labkit {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("doctor", help="what this machine offers the lab")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_doctor)
    m = sub.add_parser("migrate", help="spawn a source and a destination, migrate, print a summary")
    _migration_args(m)
    m.set_defaults(func=cmd_migrate)
    demo = sub.add_parser("demo", help="the three modes side by side on one guest")
    _migration_args(demo)
    demo.add_argument("--out", default="labkit-demo", help="folder for the PNG figures and results.csv")
    demo.set_defaults(func=cmd_demo, ram=256 << 20, dirty_rate=64 << 20)
    b = sub.add_parser("bench", help="migration costs side by side, against the machine's ceilings")
    b.add_argument(
        "--quick", action="store_true",
        help="every figure and ratio of the full run from a smaller plan (printed first) in about two minutes",
    )  # fmt: skip
    b.add_argument(
        "--backend", action="append", choices=["emulated", "qemu"], help="repeatable; default both"
    )
    b.add_argument("--mode", action="append", choices=["normal", "cpr-reboot", "cpr-transfer"])
    b.add_argument("--ram", action="append", type=_ram, help="repeatable RAM sizes")
    b.add_argument(
        "--dirty-rate", action="append", type=_size,
        help="repeatable dirty rates, the same on both backends (default 4K = idle, and 256M); cpr modes use the first",
    )  # fmt: skip
    b.add_argument(
        "--precopy-ram", action="append", type=_ram, help="RAM sizes for pre-copy (normal) only; default: --ram"
    )
    b.add_argument("--reps", type=_positive_int, default=None, help="repetitions per cell (at least 1)")
    b.add_argument("--csv", default=None, help="write the per-cell summary here (e.g. data/bench.csv)")
    b.add_argument(
        "--json", action="store_true", help="print one JSON object with every figure and the ratios"
    )
    b.set_defaults(func=cmd_bench)
    c = sub.add_parser("cpr-inspect", help="listen on a unix socket, receive CPR state, print its fields")
    c.add_argument("path")
    c.add_argument("--timeout", type=float, default=None)
    c.set_defaults(func=cmd_cpr_inspect)
    si = sub.add_parser("stream-inspect", help="decode a main migration stream file from either backend")
    si.add_argument("path")
    si.add_argument("--json", action="store_true")
    si.set_defaults(func=cmd_stream_inspect)
    v = sub.add_parser("vm", help="run one emulated VM (same as labkit-vm; labkit vm --help for its options)")
    v.add_argument("vm_args", nargs=argparse.REMAINDER)
    v.set_defaults(func=cmd_vm)
    lab = sub.add_parser("lab", help="start JupyterLab on the notebooks and print its URL")
    lab.add_argument("--notebooks", default=None, help="folder to open (default: the kit's notebooks/)")
    lab.add_argument("--port", type=int, default=8888)
    lab.add_argument("--browser", action="store_true", help="also open a web browser")
    lab.add_argument("jupyter_args", nargs=argparse.REMAINDER, help="passed on to jupyter lab")
    lab.set_defaults(func=cmd_lab)
    hp = sub.add_parser("hugepages", help="the host's huge page pools; --reserve SIZE sets one (root)")
    hp.add_argument("--reserve", default=None, metavar="SIZE", help="set the pool to hold SIZE (256M, 8G; 0 frees)")
    hp.add_argument("--page-size", default="2M", help="which pool (default 2M; --hugetlb takes the same)")
    hp.add_argument("--json", action="store_true")
    hp.set_defaults(func=cmd_hugepages)
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("labkit")
    except PackageNotFoundError:
        from labkit import __version__

        return __version__


# Options whose value may start with '-' (a negative size or number is refused by the option's own check,
# with its own message, rather than read by argparse as a missing value).
_VALUE_OPTIONS = {"--ram", "--dirty-rate", "--working-set", "--max-bandwidth", "--downtime-limit", "--reps",
                  "--seed", "--timeout"}  # fmt: skip
_NEGATIVE = re.compile(r"^-[0-9.]")


def _join_negative_values(argv: list[str]) -> list[str]:
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in _VALUE_OPTIONS and _NEGATIVE.match(arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    first = text.splitlines()[0]
    return first if isinstance(e, (ValueError, ConnectionError, OSError)) else f"{type(e).__name__}: {first}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 0
    if argv[0] in ("--version", "-V"):
        print(f"labkit {_version()}")
        return 0
    if argv[0] == "vm":  # everything after `vm` is labkit-vm's, QEMU-style options included
        return cmd_vm(argparse.Namespace(vm_args=argv[1:]))
    args = parser.parse_args(_join_negative_values(argv))
    args.argv = argv
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("labkit: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line, exit 1 (LABKIT_DEBUG=1 for the traceback)
        if os.environ.get("LABKIT_DEBUG"):
            raise
        print(f"labkit: {args.command}: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
