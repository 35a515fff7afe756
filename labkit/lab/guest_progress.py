"""The guest's progress as a time series: its own bytes-written counter, read from the host through the memfd.

Both guests keep a running count of the bytes they have written in their own RAM (the emulated guest in its
header page, the real-QEMU tiny guest in its heartbeat page, see guest/README.md). A sampler thread in the
lab's process opens each VM's guest-RAM memfd through /proc/PID/fd/N, maps the page holding the counter
read-only and reads it at >= 1 kHz on CLOCK_MONOTONIC, the clock the lab's timeline uses. Nothing is asked of
the VM: no QMP, no ptrace, no fault in its page tables (the mapping is the sampler's own). It also reads
/proc/PID/stat's fault counters every few ms, so the faults a destination takes after RESUME line up with
the guest's slowdown (labkit.lab.post_resume).

The series is stitched from both sides: the source's RAM until the destination's RESUME, the destination's
after it. For cpr-transfer both memfds are the same inode; for normal pre-copy the destination's copy of the
counter moves as pages arrive, which is why it only counts from RESUME.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

from labkit.host.runners.base import CounterLocation

PAGE = mmap.PAGESIZE
SAMPLE_PERIOD_S = 0.0005  # aim at 2 kHz, so that scheduling jitter still leaves >= 1 kHz
STAT_PERIOD_S = 0.005  # /proc/PID/stat costs ~20 us a read: every 5 ms is enough to place the faults
MAX_SAMPLES = 4_000_000  # per side: about half an hour at 2 kHz (a Stepper held open), 64 MiB at most
RATE_WINDOW_MS = 5.0  # the write rate at t is the counter's slope over the 5 ms before t

def find_memfd(pid: int, loc: CounterLocation) -> str | None:
    """/proc/PID/fd/N of the memfd `loc` names, or None while the process has none (yet)."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = sorted(os.listdir(fd_dir), key=int)
    except OSError:
        return None
    for n in names:
        path = f"{fd_dir}/{n}"
        try:
            if os.readlink(path).removesuffix(" (deleted)") != f"/memfd:{loc.memfd_name}":
                continue
            if loc.size is None or os.stat(path).st_size >= loc.size:
                return path
        except OSError:
            continue
    return None


def read_faults(pid: int) -> tuple[int, int] | None:
    """(minor, major) page faults of the whole process so far, from /proc/PID/stat (fields 10 and 12)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()  # the name may hold spaces: count from after it
    return int(fields[7]), int(fields[9])


class CounterReader:
    """A read-only map of the one page that holds a guest's counter, through its memfd."""

    def __init__(self, path: str, offset: int):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            # one whole page of the file's own size: a 4 KiB map of a hugetlb memfd maps, but its munmap fails
            # (EINVAL, which mmap.close() ignores), so the huge page would stay mapped until this process ends
            page = max(PAGE, os.fstat(fd).st_blksize)
            base = offset - offset % page
            self.map = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ, offset=base)
        finally:
            os.close(fd)
        self.at = offset - base
        self.inode = os.stat(path).st_ino

    def read(self) -> int:
        value: int = struct.unpack_from("<Q", self.map, self.at)[0]  # an aligned 8-byte load: never torn
        return value

    def close(self) -> None:
        self.map.close()


@dataclass
class SideSamples:
    """One VM's raw samples: counter values and fault counts, each with its CLOCK_MONOTONIC time in ns."""

    side: str
    pid: int
    loc: CounterLocation
    reader: CounterReader | None = None
    t_ns: array[int] = field(default_factory=lambda: array("q"))
    value: array[int] = field(default_factory=lambda: array("Q"))
    stat_t_ns: array[int] = field(default_factory=lambda: array("q"))
    minflt: array[int] = field(default_factory=lambda: array("Q"))
    majflt: array[int] = field(default_factory=lambda: array("Q"))
    gone: bool = False


class ProgressSampler(threading.Thread):
    """Samples every attached VM's counter at ~2 kHz until stopped. attach() may name a VM whose memfd does
    not exist yet (a cpr-transfer destination before it has loaded the CPR state): it is looked for again
    every few ms."""

    def __init__(self, period_s: float = SAMPLE_PERIOD_S, stat_period_s: float = STAT_PERIOD_S):
        super().__init__(name="labkit-progress", daemon=True)
        self.period_s = period_s
        self.stat_period_s = stat_period_s
        self.sides: list[SideSamples] = []
        self._lock = threading.Lock()
        self._done = threading.Event()

    def attach(self, side: str, pid: int, loc: CounterLocation) -> None:
        with self._lock:
            self.sides.append(SideSamples(side, pid, loc))

    def stop(self) -> None:
        self._done.set()
        if self.is_alive():
            self.join(timeout=5)
        for s in self.sides:
            if s.reader is not None:
                s.reader.close()
                s.reader = None

    def _open(self, s: SideSamples) -> None:
        path = find_memfd(s.pid, s.loc)
        if path is None:
            if not os.path.exists(f"/proc/{s.pid}"):
                s.gone = True
            return
        with contextlib.suppress(OSError, ValueError):
            s.reader = CounterReader(path, s.loc.offset)

    def run(self) -> None:
        clock: Callable[[], int] = time.monotonic_ns
        next_stat = next_open = 0
        period_ns = int(self.period_s * 1e9)
        while not self._done.is_set():
            now = clock()
            with self._lock:
                sides = list(self.sides)
            for s in sides:
                if s.gone or len(s.t_ns) >= MAX_SAMPLES:
                    continue
                if s.reader is None:
                    if now >= next_open:
                        self._open(s)
                    if s.reader is None:
                        continue
                t = clock()
                s.value.append(s.reader.read())
                s.t_ns.append(t)
                if now >= next_stat:
                    faults = read_faults(s.pid)
                    if faults is None:
                        s.gone = True  # the process has exited: its last samples stand
                        continue
                    s.stat_t_ns.append(clock())
                    s.minflt.append(faults[0])
                    s.majflt.append(faults[1])
            if now >= next_open:
                next_open = now + 5_000_000
            if now >= next_stat:
                next_stat = now + int(self.stat_period_s * 1e9)
            spare = period_ns - (clock() - now)
            if spare > 0:
                time.sleep(spare / 1e9)

    def side(self, name: str) -> SideSamples | None:
        """The samples of the last VM attached as `name` (cpr-reboot's and cpr-exec's sides are one each)."""
        return next((s for s in reversed(self.sides) if s.side == name), None)


@dataclass
class ProgressRow:
    """One sample of the guest's progress: when (ms on the lab's clock), which side's RAM it was read from,
    the bytes the guest had written since boot, and its write rate over the RATE_WINDOW_MS before."""

    t_ms: float
    side: str
    bytes: int
    bytes_per_s: float | None


def windowed_rate(t_ns: list[int], value: list[int], window_ms: float = RATE_WINDOW_MS) -> list[float | None]:
    """The counter's slope over the `window_ms` before each sample (bytes/s); None until a window exists.

    A window rather than sample-to-sample differences: the emulated vCPU writes in 0.5 ms slices, so two
    samples 0.5 ms apart see either a whole slice or none."""
    out: list[float | None] = []
    w = int(window_ms * 1e6)
    j = 0
    for i, t in enumerate(t_ns):
        while j < i and t_ns[j + 1] <= t - w:
            j += 1
        if t - t_ns[j] < w or j == i:
            out.append(None)
        else:
            out.append((value[i] - value[j]) / ((t - t_ns[j]) / 1e9))
    return out


def stitch(
    source: tuple[list[int], list[int]] | None,
    destination: tuple[list[int], list[int]] | None,
    resume_ns: int | None,
    t0_ns: int,
    window_ms: float = RATE_WINDOW_MS,
) -> list[ProgressRow]:
    """One series from both sides' (t_ns, value) samples: the source's before resume_ns, the destination's
    from it on (each side's rate from its own samples only). Without a RESUME, the source's alone."""
    rows: list[ProgressRow] = []
    for side, samples, keep in (
        ("source", source, lambda t: resume_ns is None or t < resume_ns),
        ("destination", destination, lambda t: resume_ns is not None and t >= resume_ns),
    ):
        if not samples:
            continue
        pairs = [(t, v) for t, v in zip(*samples, strict=True) if keep(t)]
        if not pairs:
            continue
        ts, vs = [p[0] for p in pairs], [p[1] for p in pairs]
        for t, v, r in zip(ts, vs, windowed_rate(ts, vs, window_ms), strict=True):
            rows.append(
                ProgressRow(round((t - t0_ns) / 1e6, 3), side, int(v), None if r is None else round(r, 1))
            )
    return rows


def sample_rate_hz(t_ns: list[int]) -> float | None:
    """Median sampling rate of one side (what the >= 1 kHz promise is checked against)."""
    if len(t_ns) < 3:
        return None
    gaps = sorted(b - a for a, b in zip(t_ns, t_ns[1:], strict=False))
    mid = gaps[len(gaps) // 2]
    return round(1e9 / mid, 1) if mid > 0 else None
