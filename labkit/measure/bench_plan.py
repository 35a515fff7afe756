"""What one `labkit bench` run measures: the full plan (the reference run) and `--quick`'s smaller one.

`--quick` keeps every figure and ratio the full run reports (the pause breakdown of both backends, medians of
3, every ratio with its target) and drops what only tightens them: fewer ceiling methods (the ones that have
won on this kind of host), ceilings re-measured after the migrations by their winning method only, one VM
figure run and a shorter warm-up. Pre-copy stays at 1 GiB: at 512 MiB both backends' fixed costs weigh more
(throughput 10-25% lower, interleaved runs), which moved the writing emulated/QEMU ratio by a fifth and the
socket-ceiling ratio below what 1 GiB gives. The plan a run used is in its output, so a quick run is never
mistaken for the reference one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from labkit.qemu_syntax import MiB, format_size

#: The "idle" guest, the same on both backends: one page written a second. (The real guest has no idle: its
#: dirty-rate 0 means "as fast as it can".)
IDLE_RATE = 4096
#: The "writing" guest of the like-for-like pre-copy comparison, the same rate on both backends.
WRITING_RATE = 256 * MiB

#: --quick's ceiling methods (labkit.measure.ceilings' names). Left out: copy_file_range (a third of the
#: user-space copies in every stored run) and sendmsg from the mapping (never the fastest socket sender);
#: sendfile keeps all three buffer sizes, because which one wins changes from run to run.
QUICK_CEILING_METHODS: dict[str, tuple[str, ...]] = {
    "copy": ("memcpy (ctypes)", "numpy copyto"),
    "socket": (
        "sendfile, 256 KiB socket buffers",
        "sendfile, 1024 KiB socket buffers",
        "sendfile, 4096 KiB socket buffers",
        "splice via a pipe, 4096 KiB socket buffers",
    ),
}


@dataclass
class BenchPlan:
    """What one bench run migrates. cpr modes run at the first dirty rate only (their pause holds no RAM);
    pre-copy ("normal") runs at every dirty rate and at the precopy_rams (all RAM sizes if empty)."""

    modes: list[str] = field(default_factory=lambda: ["cpr-transfer", "normal"])
    rams: list[int] = field(default_factory=lambda: [256 * MiB, 1024 * MiB, 4096 * MiB])
    dirty_rates: list[int] = field(default_factory=lambda: [IDLE_RATE, WRITING_RATE])
    backends: list[str] = field(default_factory=lambda: ["emulated", "qemu"])
    reps: int = 5
    max_bandwidth: int = 10 << 30
    vm_reps: int = 5
    precopy_rams: list[int] = field(default_factory=list)
    floor_runs: int = 30
    ceiling_bytes: int = 256 * MiB  # moved per copy/socket ceiling run
    warmup: float = 0.3  # seconds each source's guest runs before migrate
    #: the Lab's progress sampler (Result.progress, ~2 kHz reads of the guest's counter, 250 ms past RESUME):
    #: the bench reports none of it, and on two cores its thread competes with the pause it measures
    progress: bool = False
    #: ceiling name -> the methods measured before the migrations (None: every method labkit knows)
    ceiling_methods: dict[str, tuple[str, ...]] | None = None
    #: after the migrations, measure each ceiling again with every planned method ("all") or only with the
    #: method that won before ("winner"); the better of the two runs counts either way
    ceilings_after: str = "all"
    name: str = "full"

    @classmethod
    def quick(cls, backends: list[str]) -> BenchPlan:
        return cls(
            rams=[256 * MiB, 1024 * MiB],
            backends=backends,
            reps=3,
            vm_reps=1,
            precopy_rams=[1024 * MiB],
            ceiling_bytes=128 * MiB,
            warmup=0.1,
            ceiling_methods=dict(QUICK_CEILING_METHODS),
            ceilings_after="winner",
            name="quick",
        )

    def cells(self) -> list[tuple[str, str, int, int]]:
        """(backend, mode, RAM, dirty rate) of every cell, in the order they run."""
        out = []
        for b in self.backends:
            for m in self.modes:
                rams = (self.precopy_rams or self.rams) if m == "normal" else self.rams
                rates = self.dirty_rates if m == "normal" else self.dirty_rates[:1]
                out += [(b, m, r, d) for r in rams for d in rates]
        return out

    def describe(self) -> dict[str, Any]:
        """The plan as the bench's JSON reports it."""
        return {
            "name": self.name,
            "modes": self.modes,
            "rams": self.rams,
            "precopy_rams": self.precopy_rams or self.rams,
            "dirty_rates": self.dirty_rates,
            "backends": self.backends,
            "reps": self.reps,
            "max_bandwidth": self.max_bandwidth,
            "warmup_s": self.warmup,
            "progress_sampled": self.progress,
            "vm_reps": self.vm_reps,
            "floor_runs": self.floor_runs,
            "ceiling_bytes": self.ceiling_bytes,
            "ceiling_methods": "all" if self.ceiling_methods is None else self.ceiling_methods,
            "ceilings_after": self.ceilings_after,
            "text": self.lines(),
        }

    def lines(self) -> list[str]:
        """The plan in words, first in the text report: which run this is, and what it left out."""

        def sizes(xs: list[int]) -> str:
            return "+".join(format_size(x) for x in xs)

        rates = "+".join(f"{format_size(d)}/s" for d in self.dirty_rates)
        head = f"plan {self.name}" + (" (NOT the reference run: `labkit bench` without --quick is)"
                                      if self.name.startswith("quick") else "")  # fmt: skip
        methods = (
            "every method"
            if self.ceiling_methods is None
            else "; ".join(f"{k}: {', '.join(v)}" for k, v in self.ceiling_methods.items())
        )
        after = "every method again" if self.ceilings_after == "all" else "the winning method only"
        return [
            f"{head}: {', '.join(self.backends)} x {', '.join(self.modes)}; cpr at {sizes(self.rams)} and "
            f"{rates.split('+')[0]}, pre-copy at {sizes(self.precopy_rams or self.rams)} and {rates}; "
            f"{self.reps} reps, warm-up {self.warmup} s; VM figures x{self.vm_reps}",
            f"  ceilings: {format_size(self.ceiling_bytes)} per run, {methods}; after the migrations: {after}; "
            f"pause floor {self.floor_runs} runs before and after",
        ]
