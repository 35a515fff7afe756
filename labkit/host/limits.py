"""What the lab can be asked to do on this host, checked before any process is spawned.

A request the host cannot honour (more guest RAM than it has free, a working set larger than RAM, a
millisecond limit QEMU would refuse) is refused here with one line that names the setting and the range it
accepts, instead of surfacing later as an OOM kill, a timeout or a monitor that never opened.
"""

from __future__ import annotations

from dataclasses import dataclass

from labkit.host.hugepages import HugePageError, pages_for, parse_page_size, pool_for
from labkit.qemu_syntax import GUEST_PATTERNS, SizeError, format_size, human_size, parse_size

LAB_MIN_RAM = 16 << 20  # the smallest guest both backends run (the real guest's tables end at 2 MiB)
MAX_DOWNTIME_MS = 2000 * 1000  # QEMU's MAX_MIGRATE_DOWNTIME_SECONDS, in the lab's milliseconds
LAB_BACKENDS = ("emulated", "qemu")
LAB_MEMORY_BACKENDS = ("memfd", "ram", "file", "epc", "none")


class LimitError(ValueError):
    """A request outside what the lab or this host accepts; its text is the one line a user sees."""


@dataclass(frozen=True)
class RamRange:
    """The guest RAM sizes a migration mode can use on this host right now."""

    minimum: int
    maximum: int
    available: int  # MemAvailable when measured
    copies: int  # how many copies of guest RAM the mode holds at once

    def describe(self) -> str:
        why = "this host's available memory" + (
            ", halved: this mode holds two copies" if self.copies > 1 else ""
        )
        return f"{human_size(self.minimum)} to {human_size(self.maximum)} ({why})"


def available_memory() -> int:
    """MemAvailable: what the kernel can hand out without swapping (psutil reads /proc/meminfo)."""
    import psutil

    return int(psutil.virtual_memory().available)


def ram_range(mode: str, shared: bool) -> RamRange:
    """Normal pre-copy and cpr-reboot hold two copies of guest RAM (source and destination, or the saved
    file on a tmpfs); cpr-transfer over shared memory maps the same pages in both processes."""
    copies = 1 if mode in ("cpr-transfer", "cpr-exec") and shared else 2
    avail = available_memory()
    return RamRange(LAB_MIN_RAM, max(LAB_MIN_RAM, avail // copies), avail, copies)


def _size(value: str | int | None, what: str, default_suffix: str = "b") -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value, default_suffix)
    except SizeError as e:
        raise LimitError(f"{what}: {e}") from None


def check_request(
    *,
    backend: str,
    mode: str,
    ram: str | int,
    memory_backend: str,
    share: bool | None,
    pattern: str,
    dirty_rate: str | int,
    working_set: str | int | None,
    downtime_limit: int,
    max_bandwidth: str | int,
    timeout: float,
    hugetlb: str | int | None = None,
) -> int:
    """Refuse what cannot work, before anything is spawned; returns guest RAM in bytes."""
    if backend not in LAB_BACKENDS:
        raise LimitError(f"backend {backend!r}: choose one of {', '.join(LAB_BACKENDS)}")
    if memory_backend not in LAB_MEMORY_BACKENDS:
        raise LimitError(f"memory backend {memory_backend!r}: choose one of {', '.join(LAB_MEMORY_BACKENDS)}")
    if pattern not in GUEST_PATTERNS:
        raise LimitError(f"pattern {pattern!r}: choose one of {', '.join(GUEST_PATTERNS)}")
    size = _size(ram, "ram (--ram)", "m")
    assert size is not None
    shared = share if share is not None else memory_backend in ("memfd", "file")
    rng = ram_range(mode, shared)
    if hugetlb is not None:  # guest RAM comes from the huge page pool, not from MemAvailable
        check_hugetlb(hugetlb, size, mode, memory_backend, share)
        in_range = size >= rng.minimum
    else:
        in_range = rng.minimum <= size <= rng.maximum
    if not in_range:
        raise LimitError(f"ram (--ram) {human_size(size)}: the lab runs guests of {rng.describe()}")
    _size(dirty_rate, "dirty rate (--dirty-rate)")
    ws = _size(working_set, "working set (--working-set)")
    if ws is not None and ws > size:
        raise LimitError(
            f"working set (--working-set) {human_size(ws)} is larger than guest RAM ({human_size(size)}): "
            "choose at most --ram"
        )
    if not isinstance(downtime_limit, int) or not 0 <= downtime_limit <= MAX_DOWNTIME_MS:
        raise LimitError(
            f"downtime limit (--downtime-limit) {downtime_limit} ms: Parameter 'downtime_limit' expects an "
            f"integer in the range of 0 to 2000 seconds (--downtime-limit is in ms: 0 to {MAX_DOWNTIME_MS})"
        )
    bw = _size(max_bandwidth, "max bandwidth (--max-bandwidth)")
    if bw == 0:
        raise LimitError("max bandwidth (--max-bandwidth) 0: a migration needs some bandwidth (e.g. 128M)")
    if not timeout > 0:
        raise LimitError(f"timeout (--timeout) {timeout} s: must be more than 0")
    return size


def check_hugetlb(hugetlb: str | int, ram: int, mode: str, memory_backend: str, share: bool | None) -> int:
    """Refuse a huge-page guest this host cannot start, before any process exists: QEMU itself would only
    fail at start ("unable to map backing store for guest RAM: Cannot allocate memory"), and a normal
    migration's destination only once the source is already running. Returns the page size in bytes."""
    if memory_backend != "memfd":
        raise LimitError(
            f"hugetlb (--hugetlb) needs --memory-backend memfd, not {memory_backend}: hugetlb= and hugetlbsize= "
            "are properties of QEMU's memory-backend-memfd only"
        )
    if share is False:
        raise LimitError(
            "hugetlb (--hugetlb) with --share off: the lab's huge-page guests are shared memfds (the emulator "
            "keeps a share=off backend in private anonymous memory); drop --share off"
        )
    try:
        page = parse_page_size(hugetlb)
        pool = pool_for(page)
    except HugePageError as e:
        raise LimitError(str(e)) from None
    flag = f"--hugetlb {format_size(page)}"
    if ram % page:
        raise LimitError(
            f"ram (--ram) {human_size(ram)} is not a multiple of the {pool.label} huge page ({flag}): QEMU "
            f"cannot size the memfd ('failed to resize memfd to {ram}: Invalid argument')"
        )
    # normal pre-copy holds a second memfd in the destination; the CPR modes reuse the source's
    # (cpr-reboot's source quits before the new process maps its own)
    copies = 2 if mode == "normal" else 1
    need = pages_for(ram, page) * copies
    if need > pool.available:
        short = need - pool.available
        why = f"a {human_size(ram)} guest" + (", twice (source and destination)" if copies > 1 else "")
        raise LimitError(
            f"hugetlb ({flag}): {why} needs {need} huge pages of {pool.label}, this host has {pool.available} "
            f"available ({pool.describe()}): grow the pool with "
            f"`labkit hugepages --reserve {format_size((pool.total + short) * page)}` as root"
        )
    return page


def convergence_hint(dirty_rate: int, max_bandwidth: int) -> str | None:
    """Why pre-copy cannot finish: the guest dirties pages faster than the link carries them."""
    if not dirty_rate or dirty_rate < max_bandwidth:
        return None
    ratio = dirty_rate / max_bandwidth
    return (
        f"the guest dirties {human_size(dirty_rate)}/s, {ratio:.0f}x what --max-bandwidth "
        f"{human_size(max_bandwidth)}/s carries, so pre-copy never converges: lower --dirty-rate, raise "
        "--max-bandwidth or --downtime-limit, or use --mode cpr-transfer"
    )
