"""What the lab can be asked to do on this host, checked before any process is spawned.

A request the host cannot honour (more guest RAM than it has free, a working set larger than RAM, a
millisecond limit QEMU would refuse) is refused here with one line that names the setting and the range it
accepts, instead of surfacing later as an OOM kill, a timeout or a monitor that never opened.
"""

from __future__ import annotations

from dataclasses import dataclass

from labkit.qemu_syntax import GUEST_PATTERNS, SizeError, human_size, parse_size

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
    if not rng.minimum <= size <= rng.maximum:
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
