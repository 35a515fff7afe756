"""Sweeps and watches for the notebooks: many migrations as one frame, a pre-copy that does not converge.

A notebook cell should read as one idea ("pause against RAM size"), so the loops, the progress bar and the
bookkeeping live here. Every function starts and ends its own processes: nothing outlives the call.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labkit.lab.engine import Lab, migrate
from labkit.lab.progress import MigrationInfo
from labkit.lab.scenario import Backend, Pattern, Scenario
from labkit.qemu_syntax import parse_size


def _grid(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


def sweep(
    grid: Mapping[str, Sequence[Any]],
    repeat: int = 1,
    progress: bool = True,
    seed: int = 1,
    **fixed: Any,
):
    """Run one migration per point of the grid (every combination of its values) and repetition, and return
    one DataFrame row per run: the fields of `labkit migrate --json` plus the swept settings and `rep`.

    `fixed` holds the settings every run shares (a Scenario's: ram=, mode=, max_bandwidth=, ...), the grid
    the ones that vary; sizes come back in bytes whichever way they were spelled. Repetition k uses seed
    seed+k, so a sweep is reproducible run for run; the measured times still vary with the machine's load.
    """
    import pandas as pd

    base = Scenario(**fixed)  # refused here, once, before any run: one line naming the setting
    points = [(p, rep) for p in _grid(grid) for rep in range(repeat)]
    bar = _progress(len(points), progress)
    rows = []
    try:
        for point, rep in points:
            scenario = base.with_(**point, seed=seed + rep)
            bar.set_postfix_str(", ".join(f"{k}={v}" for k, v in point.items()), refresh=False)
            row = migrate(scenario).flat()  # the run's settings ride along, in bytes, from its Scenario
            row["rep"] = rep
            rows.append(row)
            bar.update(1)
    finally:
        bar.close()
    return pd.DataFrame(rows)


# The headline's guest: its hot set is a fixed share of its RAM (a bigger VM runs a bigger workload), it
# rewrites that set faster than QEMU's default max-bandwidth carries it, and the downtime limit is high enough
# for every size to converge. Pre-copy must then send the whole hot set while the guest is stopped: the pause
# grows with RAM. cpr-transfer sends none of it.
HEADLINE: dict[str, Any] = {"dirty_rate": "256M", "max_bandwidth": "128M", "downtime_limit": 1000}
HEADLINE_HOT_SHARE = 4  # the hot set is RAM / 4
HEADLINE_RAMS = ("64M", "128M", "256M")


def headline_sweep(
    rams: Sequence[str | int] = HEADLINE_RAMS,
    modes: Sequence[str] = ("normal", "cpr-transfer"),
    hot_share: int = HEADLINE_HOT_SHARE,
    repeat: int = 1,
    progress: bool = True,
    **fixed: Any,
):
    """The headline, measured: each mode at each RAM size with the HEADLINE guest (hot set RAM/hot_share,
    rewritten at 256 MiB/s, QEMU's default 128 MiB/s link, a 1 s downtime limit). One row per run, as sweep()."""
    import pandas as pd

    frames = []
    for ram in rams:
        size = parse_size(ram, "m") if isinstance(ram, str) else ram
        settings = {**HEADLINE, "working_set": size // hot_share, **fixed}
        frames.append(sweep({"mode": list(modes)}, repeat=repeat, progress=progress, ram=ram, **settings))
    return pd.concat(frames, ignore_index=True)


class _NoBar:
    def set_postfix_str(self, *a: Any, **k: Any) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="migrations", unit="run")


def summarize(frame, by: Sequence[str] = ("mode", "ram_bytes")):
    """Median pause and total time per group, with the number of runs: the table to read before the plot."""
    cols = [
        c for c in ("pause_ms_reported", "pause_ms_events", "total_ms", "bytes_main", "passes") if c in frame
    ]
    out = frame.groupby(list(by))[cols].median()
    out["runs"] = frame.groupby(list(by)).size()
    return out


# -- a pre-copy that does not converge ---------------------------------------------------------------------
@dataclass
class PrecopyWatch:
    """What query-migrate said while a pre-copy ran, and what the source did after migrate_cancel."""

    samples: Any  # DataFrame: t_s, status, dirty_sync_count, expected_downtime_ms, remaining, ...
    converged: bool
    downtime_limit: int
    max_bandwidth: int
    dirty_rate: int
    after_cancel: dict[str, Any] = field(default_factory=dict)
    rescue: dict[str, Any] = field(default_factory=dict)  # the parameters set mid-migration, if any
    rescued_at_s: float | None = None

    @property
    def ratio(self) -> float:
        """r = dirty rate / bandwidth: pass i sends about M*r^i; at r >= 1 nothing shrinks."""
        return self.dirty_rate / self.max_bandwidth if self.max_bandwidth else float("inf")


class _PrecopyWatcher:
    """A Lab observer: samples query-migrate every `interval` s once `migrate` is sent; after `passes`
    dirty-bitmap syncs it changes the parameters mid-migration (rescue) or sends migrate_cancel."""

    def __init__(self, scenario: Scenario, passes: int, interval: float, timeout: float,
                 rescue: dict[str, Any]) -> None:  # fmt: skip
        self.scenario, self.passes, self.interval, self.timeout = scenario, passes, interval, timeout
        self.rescue = rescue
        self.samples: list[dict[str, Any]] = []
        self.rescued_at: float | None = None
        self.cancelled = False
        self._next = 0.0

    def _since_migrate(self, lab: Lab) -> float | None:
        sent = next((r for r in lab.marks if r.kind == "qmp" and r.detail == "migrate"), None)
        return None if sent is None else (time.monotonic_ns() - lab.t0) / 1e9 - sent.t_ms / 1000

    def sample(self, lab: Lab, t_s: float) -> MigrationInfo:
        """One row of query-migrate; none while the migration is still in setup (it has sent nothing)."""
        assert lab.src is not None
        info = MigrationInfo.from_qmp(lab.src.cmd("query-migrate"))
        if info.status in ("none", "setup"):
            return info
        rescued = self.rescued_at is not None
        limit = self.rescue.get("downtime-limit", self.scenario.downtime_limit) if rescued else None
        bandwidth = self.rescue.get("max-bandwidth", self.scenario.max_bandwidth) if rescued else None
        self.samples.append(
            {
                "t_s": round(t_s, 2),
                "status": info.status,
                "dirty_sync_count": info.ram.dirty_sync_count if info.ram else None,
                "expected_downtime_ms": info.expected_downtime,
                "downtime_limit_ms": limit if limit is not None else self.scenario.downtime_limit,
                "max_bandwidth_MiB_s": round((bandwidth or self.scenario.max_bandwidth) / (1 << 20)),
                "remaining_MiB": round(info.stats.remaining / (1 << 20), 1),
                "transferred_MiB": round(info.stats.transferred / (1 << 20), 1),
                "dirty_pages_rate": info.ram.dirty_pages_rate if info.ram else None,
                "downtime_ms": info.downtime,
                "rescued": rescued,
            }
        )
        return info

    def __call__(self, lab: Lab) -> None:
        t_s = self._since_migrate(lab)
        if t_s is None or t_s < self._next or self.cancelled or lab.src is None:
            return
        info = self.sample(lab, t_s)
        if info.status in ("none", "setup"):
            return  # ask again at the next poll
        self._next = t_s + self.interval
        many = info.stats.dirty_sync_count >= self.passes
        if many and self.rescue and self.rescued_at is None and info.status == "active":
            lab.src.cmd("migrate-set-parameters", self.rescue)  # mid-migration: the next pass uses them
            self.rescued_at = self.samples[-1]["t_s"]
        elif info.status == "active" and ((many and self.rescued_at is None) or t_s > self.timeout):
            lab.src.cmd("migrate_cancel")
            self.cancelled = True


def watch_precopy(
    ram: str | int = "64M",
    dirty_rate: str | int = "256M",
    max_bandwidth: str | int = "128M",
    downtime_limit: int = 300,
    pattern: Pattern = "sequential",
    passes: int = 5,
    timeout: float = 20.0,
    interval: float = 0.25,
    seed: int = 1,
    backend: Backend = "emulated",
    rescue: Mapping[str, Any] | None = None,
) -> PrecopyWatch:
    """Run a normal (pre-copy) migration through the Lab, sampling query-migrate every `interval` s until it
    completes or has made `passes` dirty-bitmap syncs, then migrate_cancel if it is still going; report the
    source afterwards (status, runstate, guest memory verified). Both VMs end before this returns.

    With `rescue` (migrate-set-parameters arguments, e.g. {"max-bandwidth": "1G"}), a migration still going
    after `passes` syncs is not cancelled: the parameters are changed mid-migration, as an operator would,
    and the sampling goes on until it completes or `timeout` runs out; only then is it cancelled."""
    import pandas as pd

    scenario = Scenario(
        mode="normal", backend=backend, ram=parse_size(ram, "m"), dirty_rate=parse_size(dirty_rate),
        max_bandwidth=parse_size(max_bandwidth), downtime_limit=downtime_limit, pattern=pattern, seed=seed,
        warmup=0.2, timeout=timeout + 30,
    )  # fmt: skip
    rescue_args = {k: parse_size(v) if k == "max-bandwidth" else v for k, v in (rescue or {}).items()}
    watcher = _PrecopyWatcher(scenario, passes, interval, timeout, rescue_args)
    with Lab(scenario) as lab:
        lab.observers.append(watcher)
        result = lab.run()
        if not watcher.cancelled and watcher.samples and result.status == "completed":
            watcher.sample(lab, watcher._since_migrate(lab) or 0.0)  # the last word: completed
    after: dict[str, Any] = {}
    converged = result.status == "completed"
    if not converged:
        after = {
            "migration status": result.status,
            "source runstate": result.states.get("source"),
            "guest memory verified": result.guest_verified,
        }
    watch = PrecopyWatch(
        pd.DataFrame(watcher.samples), converged, downtime_limit, scenario.max_bandwidth, scenario.dirty_rate,
        after,
    )  # fmt: skip
    watch.rescue, watch.rescued_at_s = dict(rescue or {}), watcher.rescued_at
    return watch


# -- reference data committed by `labkit bench` ------------------------------------------------------------
def reference_files(start: str | Path = ".", pattern: str = "reference-*.csv") -> list[Path]:
    """data/reference-*.csv in `start` or the nearest parent that has a data/ folder (notebooks run from
    notebooks/, the data lives at the top of the repository)."""
    here = Path(start).resolve()
    for folder in (here, *here.parents):
        data = folder / "data"
        if data.is_dir():
            return sorted(data.glob(pattern))
    return []


def _per_run(frame, y: str):
    """A `labkit bench` summary (y_median, y_min, y_max per cell) as three rows per cell under y, so that
    plot_pause's median and min-max whiskers redraw exactly the summary; a per-run frame is returned as is."""
    import pandas as pd

    if y in frame:
        return frame
    parts = []
    for stat in ("min", "median", "max"):
        col = f"{y}_{stat}"
        if col in frame:
            parts.append(
                frame.drop(columns=[c for c in frame if c.startswith(f"{y}_")]).assign(**{y: frame[col]})
            )
    return pd.concat(parts, ignore_index=True) if parts else frame


def plot_reference(frame, y: str = "pause_ms_events") -> list[tuple[Any, str]]:
    """Figures for a reference CSV (per-run rows, or `labkit bench`'s per-cell medians with min and max):
    pause against RAM size at the lowest dirty rate, and against dirty rate at the largest RAM, one pair per
    backend. Returns [(figure or None, a sentence saying what was drawn or why not)]."""
    from labkit.measure.plots import plot_pause

    frame = _per_run(frame, y)
    missing = [c for c in ("mode", "ram_bytes", y) if c not in frame]
    if missing:
        return [(None, f"nothing to draw: no column {', '.join(missing)}")]
    if "dirty_rate" not in frame:
        frame = frame.assign(dirty_rate=0)
    out: list[tuple[Any, str]] = []
    backends = sorted(frame["backend"].dropna().unique()) if "backend" in frame else [None]
    for backend in backends:
        sub = frame if backend is None else frame[frame["backend"] == backend]
        sub = sub[sub[y].notna()]
        label = f"{backend} backend, " if backend else ""
        if sub.empty:
            out.append((None, f"{label}no {y} figures"))
            continue
        drawn = len(out)
        low = sub[sub["dirty_rate"] == sub["dirty_rate"].min()]
        if low["ram_bytes"].nunique() > 1:
            rate = int(low["dirty_rate"].iloc[0])
            caption = f"{label}{y} against RAM size, dirty rate {_human_bytes(rate)}/s"
            out.append((plot_pause(low, x="ram_bytes", y=y), caption))
        big = sub[sub["ram_bytes"] == sub["ram_bytes"].max()]
        if big["dirty_rate"].nunique() > 1:
            ram = int(big["ram_bytes"].iloc[0])
            caption = f"{label}{y} against dirty rate, RAM {_human_bytes(ram)}"
            out.append((plot_pause(big, x="dirty_rate", y=y), caption))
        if len(out) == drawn:
            out.append((None, f"{label}only one RAM size and one dirty rate: nothing to draw a line through"))
    return out


def describe_runs(frame, columns: Iterable[str] = ("mode", "ram_bytes", "dirty_rate", "status")):
    """The columns a reader needs to trust a sweep: what ran and whether it completed."""
    return frame[[c for c in columns if c in frame]]


# -- figures and tables the notebooks read -----------------------------------------------------------------
def plot_total(frame, x: str = "ram_bytes"):
    """Total migration time (migrate to completed) per mode, drawn like plot_pause."""
    from labkit.measure.plots import plot_pause

    fig = plot_pause(frame, x=x, y="total_ms")  # its title names the measure and the runs' conditions
    fig.axes[0].set_ylabel("total time (ms, migrate to completed)")
    return fig


def plot_headline(frame):
    """Pause (STOP to RESUME) and total time against guest RAM, one line per mode, both on linear axes from
    zero, titled with the run's conditions in human units: the headline as a person reads it, where a line
    that grows looks like it grows."""
    from matplotlib.figure import Figure

    from labkit.qemu_syntax import human_size

    fig = Figure(figsize=(10, 3.8))
    first = frame.iloc[0]
    conditions = (
        f"guest rewrites a hot set of RAM/{int(frame.ram_bytes.iloc[0] // first.working_set)} at "
        f"{human_size(first.dirty_rate)}/s; max-bandwidth {human_size(first.max_bandwidth)}/s; "
        f"downtime-limit {int(first.downtime_limit)} ms"
        if "working_set" in frame and first.get("working_set")
        else ""
    )
    for n, (y, label) in enumerate(
        (("pause_ms_events", "pause, STOP to RESUME (ms)"), ("total_ms", "total time (ms)"))
    ):
        ax = fig.add_subplot(1, 2, n + 1)
        for mode in sorted(frame["mode"].unique()):
            sub = frame[(frame["mode"] == mode) & frame[y].notna()]
            med = sub.groupby("ram_bytes")[y].median()
            ax.plot(med.index.to_numpy(dtype=float) / (1 << 20), med.to_numpy(), marker="o", label=mode)
        ax.set_xlabel("guest RAM (MiB)")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.set_xlim(left=0)
        ax.legend()
    fig.suptitle(f"normal against cpr-transfer by guest RAM\n{conditions}", fontsize=10)
    fig.tight_layout()
    return fig


def plot_main_bytes(frame, by: str = "mode"):
    """Bytes on the main channel per group (median), on a linear axis with each bar labelled in human units:
    hundreds of bytes next to gigabytes read from the labels (a log axis would make them look alike)."""
    from matplotlib.figure import Figure

    med = frame.groupby(by)["bytes_main"].median()
    fig = Figure(figsize=(6, 3.2))
    ax = fig.add_subplot()
    bars = ax.bar([str(i) for i in med.index], med.to_numpy() / (1 << 20), color="tab:blue")
    ax.bar_label(bars, labels=[_human_bytes(v) for v in med.to_numpy()], fontsize=8)
    ax.margins(y=0.15)  # room for the labels
    ax.set_ylabel("MiB on the main channel (median)")
    ax.set_xlabel(by)
    from labkit.measure.plots import frame_conditions

    held = frame_conditions(frame, x="")
    ax.set_title(f"main-channel bytes by {by}" + (f"\n{held}" if held else ""), fontsize=10)
    fig.tight_layout()
    return fig


def _human_bytes(n: float) -> str:
    from labkit.qemu_syntax import human_size

    return human_size(float(n))


def model_vs_measured(frame, downtime_limit_ms: int | None = None):
    """For each pre-copy run: the model's passes and total time (pass i sends M*r^i, r = dirty rate /
    max-bandwidth) next to what was measured."""
    import pandas as pd

    from labkit.measure.plots import precopy_model

    rows = []
    for _, run in frame.iterrows():
        limit = (downtime_limit_ms or run.get("downtime_limit") or 300) / 1000
        sent, total_s, _, converged = precopy_model(
            float(run["ram_bytes"]), float(run["max_bandwidth"]), float(run["dirty_rate"]), limit
        )
        rows.append(
            {
                "dirty_rate_MiB_s": run["dirty_rate"] / (1 << 20),
                "r": round(run["dirty_rate"] / run["max_bandwidth"], 2),
                "model_passes": len(sent) + 1 if converged else None,  # + the stop-and-copy pass
                "measured_passes": run["passes"],
                "model_total_ms": round(total_s * 1000) if converged else None,
                "measured_total_ms": run["total_ms"],
                "status": run["status"],
            }
        )
    return pd.DataFrame(rows)
