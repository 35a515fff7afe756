"""The qemu backend: real qemu-system-x86_64 10.x running labkit's tiny guest, judged from outside.

The same VMConfig that starts the emulated VM renders to QEMU's command line here. What QEMU cannot answer
over QMP the lab reads from the host, as root: the guest's heartbeat and its pattern through the guest RAM
memfd (/proc/PID/fd/N), or through /proc/PID/mem when RAM is private anonymous memory; where each RAM block
is mapped from QEMU's x-query-ramblock (its HVA column) and /proc/PID/maps; and event times moved from QMP's
wall-clock timestamps onto the host's CLOCK_MONOTONIC, which is what every other lab figure uses.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import labkit.host.runners.qemu_guest as qg
from labkit.host.hardware import VMConfig
from labkit.host.procfs import read_maps
from labkit.host.runners.base import CounterLocation, Runner
from labkit.host.runners.qemu_prefill import prefill_ahead_of_guest
from labkit.host.runners.qemu_trace import (
    SOCKET_CHECKPOINTS,
    TRACE_LOG,
    read_trace_log,
    strip_msg_timestamps,
    trace_argv,
)

if TYPE_CHECKING:
    from labkit.host.machine import Machine

QEMU_MIN_VERSION = (10, 0, 0)
QEMU_CPR_EXEC_VERSION = (10, 2, 0)
QBOOT = "/usr/share/qemu/qboot.rom"
BOOT_TIMEOUT = 60.0  # SeaBIOS alone takes 5-12 s under a nested KVM; qboot about 1 s


# ------------------------------------------------------------------------------------------ availability


def qemu_cpr_exec_refusal() -> str:
    """Why real QEMU here cannot run cpr-exec (one line naming the version needed)."""
    binary = qg.qemu_binary()
    version = qg.qemu_version(binary) if binary else None
    if version is None or version < QEMU_CPR_EXEC_VERSION:
        have = "not installed" if binary is None else f"{binary} is version {'.'.join(map(str, version or ()))}"
        return f"cpr-exec needs QEMU 10.2 or later ({have})"
    return "cpr-exec on the qemu backend is not implemented: labkit follows QEMU 10.2's source in the emulator"


def qemu_missing() -> str | None:
    """Why the qemu backend cannot run here, or None when qemu-system-x86_64 >= 10 is installed."""
    binary = qg.qemu_binary()
    if binary is None:
        return "qemu-system-x86_64 not found (install QEMU 10 with scripts/install-qemu)"
    version = qg.qemu_version(binary)
    if version is None or version < QEMU_MIN_VERSION:
        return f"{binary} is version {version}; labkit needs QEMU >= 10.0 for cpr-transfer"
    return None


def default_bios() -> str | None:
    """qboot when installed (the guest runs ~1 s after start instead of 5-12 s with SeaBIOS under a nested
    KVM, and migration of every mode works with it); $LABKIT_QEMU_BIOS overrides ("" = QEMU's SeaBIOS)."""
    env = os.environ.get("LABKIT_QEMU_BIOS")
    if env is not None:
        return env or None
    return QBOOT if os.path.isfile(QBOOT) else None


# -------------------------------------------------------------------------------------------- argv


def guest_append(config: VMConfig) -> str:
    """The guest's kernel command line. Its `dirty-rate=` is bytes/s like the emulator's, but 0 means
    "unpaced" (as fast as the vCPU can, ~GB/s) rather than "heartbeat only": the real guest's heartbeat is
    its page writes, and only an unpaced guest sees a pause wherever it falls (see docs/conformance.md)."""
    g = config.guest
    if g.pattern != "sequential" or g.working_set is not None:
        raise ValueError(
            "the QEMU guest writes all of its RAM in address order: pattern must be 'sequential' "
            "and working_set None on the qemu backend"
        )
    return f"dirty-rate={int(g.dirty_rate)}"


def qemu_argv(
    config: VMConfig,
    qmp_path: str,
    *,
    accel: str | None = None,
    bios: str | None = None,
    binary: str | None = None,
    guest: str | os.PathLike[str] | None = None,
    trace_log: str | None = None,
) -> list[str]:
    """Real QEMU's command line for a VMConfig: the options both backends share (config.common_argv), an
    accelerator (KVM when /dev/kvm is usable, else TCG), the tiny guest as a Multiboot -kernel, and with
    `trace_log` QEMU's downtime checkpoints and CPR trace points written there (labkit.host.runners.qemu_trace)."""
    if config.holds:
        raise ValueError("-x-hold is the emulator's own option: real QEMU cannot hold at migration points")
    argv = [binary or qg.qemu_binary() or "qemu-system-x86_64", "-accel", accel or qg.default_accel()]
    argv += config.common_argv(qmp_path)
    if bios:
        argv += ["-bios", bios]
    argv += ["-kernel", str(guest or qg.build_guest()), "-append", guest_append(config)]
    if trace_log:
        argv += trace_argv(trace_log)
    return argv


# ------------------------------------------------------------------------------------- host clock


def _wall_minus_monotonic() -> int:
    """CLOCK_REALTIME - CLOCK_MONOTONIC in ns, from the closest of a few paired readings."""
    best = None
    for _ in range(5):
        m0 = time.monotonic_ns()
        w = time.time_ns()
        m1 = time.monotonic_ns()
        if best is None or m1 - m0 < best[0]:
            best = (m1 - m0, w - (m0 + m1) // 2)
    assert best is not None
    return best[1]


_OFFSET_NS: int | None = None


def wall_to_monotonic_ns(timestamp: dict[str, Any]) -> int:
    """A QMP event timestamp (wall clock, seconds + microseconds) on the host's CLOCK_MONOTONIC.

    The offset between the two clocks is sampled once per process, so every converted event shares it and
    differences between events are exact to QEMU's microsecond; absolute times are off by whatever NTP
    slewed the wall clock since the sample (at most 0.05 %), see docs/conformance.md."""
    wall = int(timestamp["seconds"]) * 1_000_000_000 + int(timestamp["microseconds"]) * 1000
    return wall_ns_to_monotonic_ns(wall)


def wall_ns_to_monotonic_ns(wall_ns: int) -> int:
    """A CLOCK_REALTIME time in ns (a QMP timestamp, a trace-log line) on CLOCK_MONOTONIC, with the one
    offset this process measured, so QEMU's trace points and its QMP events share one timeline."""
    global _OFFSET_NS
    if _OFFSET_NS is None:
        _OFFSET_NS = _wall_minus_monotonic()
    return wall_ns - _OFFSET_NS


# -------------------------------------------------------------------------------------- RAM blocks

_RAMBLOCK_LINE = re.compile(
    r"^\s*(?P<name>\S.*?)\s+(?P<psize>\d+ \w+)\s+0x(?P<offset>[0-9a-f]+)\s+0x(?P<used>[0-9a-f]+)\s+"
    r"0x(?P<total>[0-9a-f]+)\s+0x(?P<hva>[0-9a-f]+)\s+(?P<ro>r[ow])\s*$"
)


def parse_ramblocks(text: str) -> list[dict[str, Any]]:
    """Rows of x-query-ramblock (HMP `info ramblock`): name, used size, host virtual address, read-only."""
    out = []
    for line in text.splitlines():
        m = _RAMBLOCK_LINE.match(line)
        if m:
            out.append(
                {
                    "name": m["name"],
                    "size": int(m["used"], 16),
                    "max-size": int(m["total"], 16),
                    "offset": int(m["offset"], 16),
                    "host-addr": int(m["hva"], 16),
                    "readonly": m["ro"] == "ro",
                }
            )
    return out


def _main_block_name(config: VMConfig) -> str:
    return "pc.ram" if config.memory_backend == "none" else config.backend_id


@dataclass
class GuestRamAccess:
    """Where the host can read guest RAM: a file (the memfd through /proc/PID/fd/N, or the backing file)
    read at guest-physical offsets, or /proc/PID/mem read at host-addr + offset (private RAM)."""

    path: str
    base: int
    size: int
    shared: bool  # a shared file: it can be mapped, and outlives the process

    def pread(self, length: int, offset: int) -> bytes:
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.pread(fd, length, self.base + offset)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------------ the runner


@dataclass
class _Baseline:
    seq: int
    gap_count: int


class QemuRunner(Runner):
    """The runner for real QEMU: everything QMP does not answer is read from outside the process. It holds a
    migration only where QEMU does (pause-before-switchover, -S), keeps no event history of its own, and has
    no x-labkit-* command."""

    name = "qemu"
    description = "real QEMU 10"

    def __init__(
        self,
        accel: str | None = None,
        bios: str | None = None,
        boot_timeout: float = BOOT_TIMEOUT,
        trace: bool = True,
    ):
        self.accel = accel
        self.bios = bios if bios is not None else default_bios()
        self.boot_timeout = boot_timeout
        self.tracing = trace  # write QEMU's trace log (checkpoints() reads it)
        self._baselines: dict[int, _Baseline] = {}  # by the guest's boot_tsc: one guest, either process

    def refusal(self, mode: str) -> str | None:
        return qemu_cpr_exec_refusal() if mode == "cpr-exec" else None

    def progress_counter(self, config: VMConfig) -> CounterLocation:
        # the tiny guest's progress_bytes, in its heartbeat page (guest/layout.h)
        return CounterLocation("memory-backend-memfd", qg.HEARTBEAT_ADDR + qg.HEARTBEAT_PROGRESS_OFF, config.ram)

    def version(self) -> str | None:
        found = qg.qemu_version()
        return None if found is None else ".".join(map(str, found))

    def argv(self, config: VMConfig, qmp_path: str) -> list[str]:
        # the trace log lives in the VM's run dir, beside its QMP socket, and goes when the run dir goes
        trace_log = os.path.join(os.path.dirname(qmp_path), TRACE_LOG) if self.tracing else None
        return qemu_argv(config, qmp_path, accel=self.accel, bios=self.bios, trace_log=trace_log)

    # -- finding guest RAM ---------------------------------------------------------------------------------
    def ram_blocks(self, m: Machine) -> list[dict[str, Any]]:
        """QEMU's own block list (x-query-ramblock) with each block's mapping from /proc/PID/maps; falls back
        to the memfd mappings alone (guest RAM's memfd is named after its backend type, not its id)."""
        maps = read_maps(m.pid)
        try:
            blocks = parse_ramblocks(m.cmd("x-query-ramblock", timeout=10)["human-readable-text"])
        except Exception:  # noqa: BLE001 - an x- command may go away; /proc still answers
            blocks = []
        if blocks:
            for b in blocks:
                mp = next((x for x in maps if x.start == b["host-addr"]), None)
                b.update(path=mp.path if mp else None, inode=mp.inode if mp else None)
            return blocks
        out = []
        for mp in maps:
            if mp.path.startswith("/memfd:"):
                name = mp.path.removeprefix("/memfd:").removesuffix(" (deleted)")
                if name == "memory-backend-memfd":
                    name = m.config.backend_id
                out.append(
                    {"name": name, "size": mp.size, "host-addr": mp.start, "path": mp.path, "inode": mp.inode}
                )
        return out

    def guest_ram(self, m: Machine) -> GuestRamAccess:
        """How to read the main RAM block of `m` from the host."""
        cfg, pid = m.config, m.pid
        # share=off maps the memfd privately: the guest's writes land in private copies the memfd never shows,
        # so the boot check would wait for a heartbeat forever; read those like private RAM, via /proc/PID/mem
        if cfg.memory_backend == "memfd" and cfg.share is not False:
            path = qg.find_ram_memfd(pid, "memory-backend-memfd", size=cfg.ram)
            return GuestRamAccess(path, 0, cfg.ram, True)
        if cfg.memory_backend == "file" and cfg.share and cfg.mem_path:
            return GuestRamAccess(cfg.mem_path, 0, cfg.ram, True)
        name = _main_block_name(cfg)
        block = next((b for b in self.ram_blocks(m) if b["name"] == name), None)
        if block is None:
            raise FileNotFoundError(f"QEMU process {pid} has no RAM block {name!r}")
        return GuestRamAccess(f"/proc/{pid}/mem", block["host-addr"], block["size"], False)

    def read_heartbeat(self, m: Machine, ram: GuestRamAccess | None = None) -> qg.Heartbeat:
        """The guest's heartbeat page, retried while its seqlock shows an update in progress."""
        ram = ram or self.guest_ram(m)
        hb = None
        for _ in range(1000):
            buf = ram.pread(qg.HEARTBEAT_SIZE, qg.HEARTBEAT_ADDR)
            hb = qg._parse_heartbeat(buf)
            if not hb.lock & 1:
                return hb
        assert hb is not None
        return hb

    def ready(self, m: Machine) -> None:
        """The Lab calls this after spawning a source: the guest has booted and writes its RAM (and, with
        prefill, every page it has not reached yet holds data, as the emulated guest's prefill=on does)."""
        self.wait_booted(m)
        if m.config.guest.prefill:
            ram = self.guest_ram(m)
            if ram.shared:
                rate = m.config.guest.dirty_rate
                prefill_ahead_of_guest(ram.path, ram.size, lambda: self.read_heartbeat(m, ram), rate)

    def wait_booted(self, m: Machine, timeout: float | None = None) -> qg.Heartbeat:
        """Wait until the guest has written its first pages (firmware and the Multiboot load come first)."""
        timeout = self.boot_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        ram = None
        while True:
            if not m.alive():
                raise RuntimeError(
                    f"QEMU exited before the guest ran: {strip_msg_timestamps(m.log()).strip()[-500:]}"
                )
            with contextlib.suppress(FileNotFoundError):
                ram = ram or self.guest_ram(m)
                hb = self.read_heartbeat(m, ram)
                if hb.valid and hb.seq > 0:
                    return hb
            if time.monotonic() > deadline:
                raise TimeoutError(f"the guest in QEMU process {m.pid} did not start within {timeout} s")
            time.sleep(0.01)

    # -- the guest's view ----------------------------------------------------------------------------------
    def guest_stats(self, m: Machine) -> dict[str, Any]:
        """The emulator's keys, from the heartbeat page. max-gap-ns is the longest gap between two page
        writes since reset_gap (the guest's own TSC), or None with "max-gap-why" when the guest cannot see
        the pause: under TCG (its TSC stops with the VM). A paced guest counts a stall inside its pacing wait too."""
        hb = self.read_heartbeat(m)
        if not hb.valid:
            return {"heartbeat-seq": 0, "max-gap-ns": None, "max-gap-why": "the guest has not started yet"}
        ns = (lambda tsc: tsc * 1_000_000 // hb.tsc_khz) if hb.tsc_khz else (lambda tsc: None)
        base = self._baselines.get(hb.boot_tsc)
        gap_tsc, exact = self._max_gap_since(hb, base)
        stats: dict[str, Any] = {
            "heartbeat-seq": hb.seq,
            "max-gap-ns": ns(gap_tsc) if gap_tsc is not None else None,
            "bytes-written": hb.seq * qg.PAGE_SIZE,
            "pages-written": hb.seq,
            "dirty-rate": hb.dirty_rate,
            "pattern": "sequential",
            "working-set": hb.patterned_pages * qg.PAGE_SIZE,
            "generation": hb.generation,
            "passes": hb.passes,
            "tsc-khz": hb.tsc_khz,
            "gap-count": hb.gap_count - (base.gap_count if base else 0),
            "gaps-ns": [ns(g[1]) for g in hb.gaps if base is None or g[2] > base.seq],
            "accel": _accel_of(m),
        }
        why = None
        if gap_tsc is None:
            why = "no gap of 1 ms or more since the reset (the guest logs only gaps from 1 ms up)"
        elif not hb.tsc_khz:
            why = "the guest could not calibrate its TSC"
        elif not exact:
            stats["max-gap-note"] = "more than 16 gaps since the reset: the largest of the last 16"
        if stats["accel"] == "tcg":
            shown = stats["max-gap-ns"]
            why = (
                "under TCG the guest's TSC follows QEMU's virtual clock, which stops with the VM: the guest "
                f"cannot see the pause (its largest gap was {'n/a' if shown is None else f'{shown / 1e6:.3f} ms'})"
            )
        if why is not None:
            stats["max-gap-ns"] = None
            stats["max-gap-why"] = why
        return stats

    @staticmethod
    def _max_gap_since(hb: qg.Heartbeat, base: _Baseline | None) -> tuple[int | None, bool]:
        """(largest gap in TSC cycles since the baseline, whether that is certainly the largest)."""
        if base is None:
            return (hb.max_gap_tsc or None), True
        if hb.max_gap_seq > base.seq:  # the all-time largest came after the reset: exact
            return hb.max_gap_tsc, True
        recent = [g[1] for g in hb.gaps if g[2] > base.seq]
        lost = hb.gap_count - base.gap_count > qg.HEARTBEAT_GAP_SLOTS
        return (max(recent) if recent else None), not lost

    def reset_gap(self, m: Machine) -> None:
        """The guest cannot be told to forget its largest gap: remember where its gap log stood, so that
        guest_stats reports only the gaps after this. Waits for the guest to have started first."""
        hb = self.wait_booted(m)
        self._baselines[hb.boot_tsc] = _Baseline(hb.seq, hb.gap_count)

    def verify(self, m: Machine) -> dict[str, Any]:
        """Check every patterned page of guest RAM with the guest held still, the way the emulator's
        x-labkit-verify holds its vCPU: the whole QEMU process is frozen (SIGSTOP) rather than stopped
        over QMP, so no STOP/RESUME events and no runstate change enter the record; the guest, whose TSC
        runs on under KVM, sees the check as a gap, as the emulated guest does."""
        try:
            self.wait_booted(m)
        except (TimeoutError, RuntimeError) as e:
            return {"ok": False, "error": str(e)}
        status = m.cmd("query-status", timeout=10)["status"]
        # a source in postmigrate after cpr-transfer shares its RAM with the running destination
        stopped = status != "postmigrate"
        ram = self.guest_ram(m)
        with frozen(m.pid) if status == "running" else contextlib.nullcontext():
            if status == "running":
                _settle_heartbeat(m.pid, lambda: self.read_heartbeat(m, ram))  # no QMP while frozen
            if ram.shared:
                res = qg.verify_guest_memory(ram.path, ram.size, stopped=stopped)
            else:
                fd = _copy_to_memfd(ram)
                try:
                    res = qg.verify_guest_memory(fd, ram.size, stopped=stopped)
                finally:
                    os.close(fd)
        hb = res.pop("heartbeat")
        res["written"] = res["ok"]
        res["heartbeat"] = {"seq": hb.seq, "generation": hb.generation, "passes": hb.passes}
        res["read-through"] = ram.path if ram.shared else f"{ram.path} (copied while frozen)"
        res["ok-pages"] = res["ok"]
        res["ok"] = res["bad"] == 0 and res["stale"] == 0 and res["ok-pages"] > 0
        res["runstate"] = status
        return res

    # -- events --------------------------------------------------------------------------------------------
    def events(self, m: Machine) -> list[dict[str, Any]]:
        """The events this client saw since it connected (QEMU keeps no history of its own), each with
        "monotonic-ns" converted from its wall-clock timestamp."""
        return [{**e, "monotonic-ns": wall_to_monotonic_ns(e["timestamp"])} for e in list(m.events)]

    def checkpoints(self, m: Machine) -> list[dict[str, Any]]:
        """QEMU's own trace points from the VM's trace log, on CLOCK_MONOTONIC: each downtime checkpoint
        under its own name ("src-vm-stopped", ...) and the main channel's connect/accept as kind
        "checkpoint"; every other traced event (cpr_*, per-section vmstate_downtime_save/load) as kind
        "trace" with its arguments as detail. Empty when tracing is off or the run dir has gone."""
        out = []
        for p in read_trace_log(str(m.run_dir / TRACE_LOG)):
            is_checkpoint = p.checkpoint is not None or p.name in SOCKET_CHECKPOINTS
            out.append(
                {
                    "name": p.checkpoint or p.name,
                    "monotonic-ns": wall_ns_to_monotonic_ns(p.wall_ns),
                    "kind": "checkpoint" if is_checkpoint else "trace",
                    "detail": "" if p.checkpoint else p.args,
                }
            )
        return out


def _all_threads_stopped(pid: int) -> bool:
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if state not in ("T", "t", "Z", "X"):
            return False
    return True


@contextlib.contextmanager
def frozen(pid: int, timeout: float = 10.0) -> Iterator[None]:
    """Hold every thread of a process still (SIGSTOP ... SIGCONT), waiting until all of them have stopped."""
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + timeout
        while not _all_threads_stopped(pid):
            if time.monotonic() > deadline:
                raise TimeoutError(f"process {pid} did not stop within {timeout} s")
            time.sleep(0.001)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _settle_heartbeat(pid: int, read: Callable[[], qg.Heartbeat], tries: int = 50) -> None:
    """Frozen in the middle of a heartbeat update (its seqlock odd)? Let it run a moment and freeze again,
    so that the heartbeat names exactly which pass each page must hold."""
    for _ in range(tries):
        if not read().lock & 1:
            return
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.001)
        os.kill(pid, signal.SIGSTOP)
        while not _all_threads_stopped(pid):
            time.sleep(0.001)


def _accel_of(m: Machine) -> str | None:
    argv = m.argv
    return argv[argv.index("-accel") + 1] if "-accel" in argv else None


def _copy_to_memfd(ram: GuestRamAccess, chunk: int = 16 << 20) -> int:
    """Copy private guest RAM out of /proc/PID/mem into a new memfd (the VM is stopped meanwhile)."""
    fd = os.memfd_create("labkit-guest-copy", os.MFD_CLOEXEC)
    try:
        src = os.open(ram.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            off = 0
            while off < ram.size:
                data = os.pread(src, min(chunk, ram.size - off), ram.base + off)
                if not data:
                    raise OSError(f"short read of guest RAM at {ram.base + off:#x}")
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                off += len(data)
        finally:
            os.close(src)
    except BaseException:
        os.close(fd)
        raise
    return fd
