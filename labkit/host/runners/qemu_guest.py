"""Build and inspect labkit's tiny guest for real QEMU 10, and find QEMU itself.

The guest (guest/ at the top of the repository) is a Multiboot kernel that QEMU loads with `-kernel`;
it keeps rewriting all of its RAM in a pattern that names each page and the pass that wrote it, and
keeps a heartbeat page at a fixed guest-physical address. Because QEMU's guest RAM is a memfd
(memory-backend-memfd,share=on), a host tool can map it through /proc/PID/fd/N and judge a migration
from outside: did every page arrive intact, and does the guest still run? guest/README.md has the layout.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# package data in an installed wheel (labkit/guest), the top-level guest/ in a clone
GUEST_DIR = next(
    (d for d in (Path(__file__).resolve().parents[1] / "guest", Path(__file__).resolve().parents[2] / "guest")
     if (d / "guest.c").is_file()),
    Path(__file__).resolve().parents[1] / "guest",
)  # fmt: skip
GUEST_SOURCES = ("boot.S", "guest.c", "layout.h", "link.ld")

# Compiled as x86-64 (boot.S switches to long mode), linked as ELF64, then converted to ELF32, which is
# what QEMU's Multiboot loader accepts. No libc and no libgcc are needed.
CFLAGS = (
    "-m64",
    "-ffreestanding",
    "-nostdlib",
    "-fno-pic",
    "-fno-pie",
    "-mcmodel=small",
    "-mno-red-zone",
    "-fno-stack-protector",
    "-mgeneral-regs-only",
    "-fno-tree-loop-distribute-patterns",
    "-fno-asynchronous-unwind-tables",
    "-O2",
    "-Wall",
    "-Wextra",
)
LDFLAGS = ("-m", "elf_x86_64", "-nostdlib", "-z", "max-page-size=0x1000", "-z", "noexecstack")

# ---- guest layout, mirrored from guest/layout.h ----
PAGE_SIZE = 4096
PAGE_SHIFT = 12
FIRST_PFN = 0x200
PAGE_HEADER_WORDS = 3
PATTERN_MUL_PFN = 0x9E3779B1
PATTERN_MUL_GEN = 0x85EBCA77
PATTERN_MUL_IDX = 0x01000193
HEARTBEAT_ADDR = 0x1FF000
HEARTBEAT_MAGIC = 0x42484B4C
HEARTBEAT_VERSION = 2
HEARTBEAT_RANGES = 4
HEARTBEAT_GAP_SLOTS = 16
HEARTBEAT_SIZE = 0x330
HEARTBEAT_PROGRESS_OFF = 0x328  # u64 progress_bytes: bytes written since boot, read alone (no seqlock)
_HB_HEAD = struct.Struct("<4I7Q2IQ4I")  # magic .. reserved0, 0x000-0x068
_HB_RANGE = struct.Struct("<2Q")
_HB_GAP = struct.Struct("<3Q")
_HB_RANGES_OFF = 0x68
_HB_GAPS_OFF = 0xA8
_HB_CMDLINE_OFF = 0x228

FOUR_GIB = 1 << 32


class GuestBuildError(RuntimeError):
    """The guest could not be built (compiler or linker missing or failing)."""


# ---------------------------------------------------------------------------------------------- QEMU


def qemu_binary() -> str | None:
    """Path of qemu-system-x86_64 on PATH (or $LABKIT_QEMU), or None."""
    env = os.environ.get("LABKIT_QEMU")
    if env:
        return env if os.access(env, os.X_OK) else None
    return shutil.which("qemu-system-x86_64")


def qemu_version(binary: str | None = None) -> tuple[int, int, int] | None:
    """(major, minor, micro) from `qemu-system-x86_64 --version`, or None when absent or unreadable."""
    binary = binary or qemu_binary()
    if not binary:
        return None
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", out)
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def kvm_usable() -> bool:
    """True when /dev/kvm opens read-write, which is what QEMU's `-accel kvm` needs."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def default_accel() -> str:
    """`kvm` when usable, else `tcg`; $LABKIT_QEMU_ACCEL overrides."""
    return os.environ.get("LABKIT_QEMU_ACCEL") or ("kvm" if kvm_usable() else "tcg")


def qemu_argv(
    guest: Path | str,
    ram: str = "256M",
    *,
    qmp: str,
    accel: str | None = None,
    incoming: Sequence[str] = (),
    append: str | None = None,
    serial: str | None = None,
    bios: str | None = None,
    binary: str | None = None,
) -> list[str]:
    """The command line seen working for cpr-transfer on QEMU 10.0.2 (docs/real-qemu-figures.md): q35 with
    aux-ram-share=on and RAM in a shared memfd backend named ram0, no default devices, no display.
    `bios="/usr/share/qemu/qboot.rom"` boots in ~0.5 s instead of SeaBIOS's 5-8 s on a nested KVM host."""
    argv = [
        binary or qemu_binary() or "qemu-system-x86_64",
        "-accel",
        accel or default_accel(),
        "-machine",
        "q35,aux-ram-share=on",
        "-m",
        ram,
        "-nodefaults",
        "-display",
        "none",
        "-object",
        f"memory-backend-memfd,id=ram0,size={ram},share=on",
        "-machine",
        "memory-backend=ram0",
        "-kernel",
        str(guest),
        "-qmp",
        f"unix:{qmp},server=on,wait=off",
    ]
    if bios:
        argv += ["-bios", bios]
    if append:
        argv += ["-append", append]
    if serial:
        argv += ["-serial", serial]
    for inc in incoming:
        argv += ["-incoming", inc]
    return argv


# --------------------------------------------------------------------------------------------- build


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "labkit"


def _sources_hash(src_dir: Path) -> str:
    h = hashlib.sha256()
    for name in GUEST_SOURCES:
        h.update(name.encode() + b"\0" + (src_dir / name).read_bytes() + b"\0")
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    return h.hexdigest()[:16]


def build_guest(cache_dir: Path | None = None, src_dir: Path | None = None, force: bool = False) -> Path:
    """Build the guest ELF into the cache (~/.cache/labkit/guest-<hash>.elf) or reuse it; the hash
    covers the sources and flags, so editing guest/ rebuilds it."""
    src_dir = src_dir or GUEST_DIR
    cache_dir = cache_dir or _cache_dir()
    missing = [n for n in GUEST_SOURCES if not (src_dir / n).is_file()]
    if missing:
        raise GuestBuildError(f"guest sources missing in {src_dir}: {', '.join(missing)}")
    out = cache_dir / f"guest-{_sources_hash(src_dir)}.elf"
    if out.is_file() and not force:
        return out
    found = {t: shutil.which(t) for t in ("gcc", "ld", "objcopy")}
    absent = [t for t, p in found.items() if not p]
    tools = {t: p for t, p in found.items() if p}
    if absent:
        raise GuestBuildError(
            f"cannot build the labkit guest: {', '.join(absent)} not found; install gcc and binutils "
            "(Debian: apt-get install gcc binutils, or run scripts/install-qemu)"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="labkit-guest-", dir=cache_dir) as tmp:
        t = Path(tmp)
        steps = [
            [tools["gcc"], *CFLAGS, "-c", str(src_dir / "boot.S"), "-o", str(t / "boot.o")],
            [tools["gcc"], *CFLAGS, "-c", str(src_dir / "guest.c"), "-o", str(t / "guest.o")],
            [tools["ld"], *LDFLAGS, "-T", str(src_dir / "link.ld"), str(t / "boot.o"), str(t / "guest.o"),
             "-o", str(t / "guest64.elf")],
            [tools["objcopy"], "-O", "elf32-i386", str(t / "guest64.elf"), str(t / "guest.elf")],
        ]  # fmt: skip
        for argv in steps:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
            if r.returncode != 0:
                raise GuestBuildError(f"guest build failed: {' '.join(argv)}\n{r.stdout}{r.stderr}")
        os.replace(t / "guest.elf", out)  # atomic: concurrent builders agree on the result
    return out


# ------------------------------------------------------------------------------------- guest memory


@dataclass
class MemfdMapping:
    """One line of /proc/PID/maps that maps a memfd."""

    start: int
    end: int
    offset: int
    inode: int
    name: str  # e.g. "memory-backend-memfd" (from "/memfd:memory-backend-memfd (deleted)")

    @property
    def size(self) -> int:
        return self.end - self.start


def memfd_mappings(pid: int) -> list[MemfdMapping]:
    """The memfd mappings of a process: QEMU names guest RAM's memfd after the backend type."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) < 6 or not parts[5].startswith("/memfd:"):
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            name = parts[5].strip().removeprefix("/memfd:").removesuffix(" (deleted)")
            out.append(MemfdMapping(start, end, int(parts[2], 16), int(parts[4]), name))
    return out


def find_ram_memfd(pid: int, name: str = "memory-backend-memfd", size: int | None = None) -> str:
    """Path /proc/PID/fd/N of the process's memfd called `name` (of `size` bytes, if given)."""
    fd_dir = f"/proc/{pid}/fd"
    for n in sorted(os.listdir(fd_dir), key=int):
        path = f"{fd_dir}/{n}"
        try:
            target = os.readlink(path)
        except OSError:
            continue
        if target.removesuffix(" (deleted)") != f"/memfd:{name}":
            continue
        if size is None or os.stat(path).st_size == size:
            return path
    raise FileNotFoundError(
        f"no memfd {name!r}{'' if size is None else f' of {size} bytes'} in process {pid}"
    )


def q35_below_4g(ram_size: int) -> int:
    """Bytes of RAM QEMU's q35 puts below 4 GiB (pc_q35_init): all of it under 2.75 GiB, else 2 GiB.
    The memfd holds the low part first and the part mapped at 4 GiB after it."""
    return ram_size if ram_size < 0xB0000000 else 0x80000000


class _GuestRam:
    """A read-only shared mapping of a guest RAM memfd, addressed by guest-physical address."""

    def __init__(self, memfd: str | int | os.PathLike[str], size: int | None = None, below_4g: int | None = None):
        if isinstance(memfd, int):
            fd = os.dup(memfd)
        else:
            fd = os.open(memfd, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.size = size if size is not None else os.fstat(fd).st_size
            self.map = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        self.below_4g = below_4g if below_4g is not None else q35_below_4g(self.size)
        self.words = np.frombuffer(self.map, dtype=np.uint32)

    def offset(self, phys: int) -> int:
        return phys if phys < FOUR_GIB else phys - FOUR_GIB + self.below_4g

    def close(self) -> None:
        del self.words
        self.map.close()

    def __enter__(self) -> _GuestRam:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Heartbeat:
    """The guest's heartbeat page (guest/layout.h `struct heartbeat`), as one consistent snapshot."""

    magic: int
    version: int
    lock: int
    tsc_khz: int
    seq: int
    tsc: int
    boot_tsc: int
    max_gap_tsc: int
    max_gap_seq: int
    max_gap_end_tsc: int
    dirty_rate: int
    generation: int
    passes: int
    cur_pfn: int
    mem_upper_kib: int
    gap_count: int
    nr_ranges: int
    ranges: list[tuple[int, int]] = field(default_factory=list)
    gaps: list[tuple[int, int, int]] = field(default_factory=list)  # (end_tsc, gap_tsc, seq), oldest first
    cmdline: str = ""
    progress_bytes: int = 0  # bytes written since boot (version 2), what the progress sampler reads

    @property
    def valid(self) -> bool:
        return self.magic == HEARTBEAT_MAGIC and self.version == HEARTBEAT_VERSION

    def tsc_to_ms(self, cycles: int) -> float | None:
        return cycles / self.tsc_khz if self.tsc_khz else None

    @property
    def max_gap_ms(self) -> float | None:
        """Largest guest-visible gap between two page writes, in ms of the guest's TSC."""
        return self.tsc_to_ms(self.max_gap_tsc)

    @property
    def patterned_pages(self) -> int:
        return sum(e - s for s, e in self.ranges)


def _parse_heartbeat(buf: bytes) -> Heartbeat:
    head = _HB_HEAD.unpack_from(buf, 0)
    hb = Heartbeat(*head[:17])
    n = min(hb.nr_ranges, HEARTBEAT_RANGES)
    hb.ranges = [_HB_RANGE.unpack_from(buf, _HB_RANGES_OFF + i * _HB_RANGE.size) for i in range(n)]
    slots = [_HB_GAP.unpack_from(buf, _HB_GAPS_OFF + i * _HB_GAP.size) for i in range(HEARTBEAT_GAP_SLOTS)]
    count = hb.gap_count
    if count <= HEARTBEAT_GAP_SLOTS:
        hb.gaps = slots[:count]
    else:
        first = count % HEARTBEAT_GAP_SLOTS
        hb.gaps = slots[first:] + slots[:first]
    hb.cmdline = buf[_HB_CMDLINE_OFF : _HB_CMDLINE_OFF + 256].split(b"\0", 1)[0].decode(errors="replace")
    if len(buf) >= HEARTBEAT_PROGRESS_OFF + 8:
        hb.progress_bytes = struct.unpack_from("<Q", buf, HEARTBEAT_PROGRESS_OFF)[0]
    return hb


def _read_heartbeat_ram(ram: _GuestRam, tries: int = 1000) -> Heartbeat:
    off = ram.offset(HEARTBEAT_ADDR)
    for _ in range(tries):
        lock1 = struct.unpack_from("<I", ram.map, off + 8)[0]
        buf = ram.map[off : off + HEARTBEAT_SIZE]
        lock2 = struct.unpack_from("<I", ram.map, off + 8)[0]
        if lock1 == lock2 and not lock1 & 1:
            return _parse_heartbeat(buf)
    return _parse_heartbeat(buf)  # a stopped guest caught mid-update: report what is there


def read_heartbeat(
    memfd: str | int | os.PathLike[str], size: int | None = None, below_4g: int | None = None
) -> Heartbeat:
    """Read the heartbeat page through a guest RAM memfd (a path such as /proc/PID/fd/N, or an fd),
    retrying while the guest's seqlock shows an update in progress."""
    with _GuestRam(memfd, size, below_4g) as ram:
        return _read_heartbeat_ram(ram)


def wait_for_heartbeat(
    memfd: str | int | os.PathLike[str],
    timeout: float = 60.0,
    min_seq: int = 1,
    min_passes: int = 0,
    size: int | None = None,
) -> Heartbeat:
    """Wait until the guest has booted and written at least `min_seq` pages and completed `min_passes`
    passes (boot through SeaBIOS can take seconds on a nested KVM host)."""
    deadline = time.monotonic() + timeout
    with _GuestRam(memfd, size) as ram:
        while True:
            hb = _read_heartbeat_ram(ram)
            if hb.valid and hb.seq >= min_seq and hb.passes >= min_passes:
                return hb
            if time.monotonic() > deadline:
                raise TimeoutError(f"guest heartbeat not seen within {timeout} s (last: magic={hb.magic:#x})")
            time.sleep(0.02)


_IDX_MUL = (np.arange(PAGE_SIZE // 4, dtype=np.uint32) * np.uint32(PATTERN_MUL_IDX))[PAGE_HEADER_WORDS:]


def _check_pages(words: np.ndarray, pfns: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ok, untouched, generation) per page of `words` (n x 1024 uint32) expected to hold `pfns`."""
    hdr_pfn = words[:, 0].astype(np.uint64) | (words[:, 1].astype(np.uint64) << np.uint64(32))
    gen = words[:, 2]
    seed = (hdr_pfn.astype(np.uint32) * np.uint32(PATTERN_MUL_PFN)) + (gen * np.uint32(PATTERN_MUL_GEN)).astype(
        np.uint32
    )
    body_ok = (words[:, PAGE_HEADER_WORDS:] == (seed[:, None] ^ _IDX_MUL[None, :])).all(axis=1)
    ok = body_ok & (hdr_pfn == pfns) & (gen > 0)
    untouched = ~ok & ~words.any(axis=1)
    return ok, untouched, gen


def verify_guest_memory(
    memfd: str | int | os.PathLike[str],
    size: int | None = None,
    *,
    below_4g: int | None = None,
    stopped: bool = False,
    chunk_pages: int = 4096,
    retries: int = 3,
) -> dict[str, Any]:
    """Check every patterned page of the guest's RAM through its memfd.

    Returns counts: `ok` (pattern intact, names its own page), `bad`, `untouched` (not yet written: all
    zero, or during the first pass anything beyond the page in progress, e.g. what SeaBIOS left), `in_progress` (the one page the guest was writing), `stale` (only when `stopped`: a page
    whose generation is not the one the heartbeat says it must have, i.e. a lost write), plus the
    generation range seen, the heartbeat and the first few bad pfns. On a running guest pages that
    look bad are re-read `retries` times first, since the guest may be rewriting them as we read.
    """
    with _GuestRam(memfd, size, below_4g) as ram:
        hb = _read_heartbeat_ram(ram)
        if not hb.valid:
            raise ValueError(f"no labkit guest heartbeat at {HEARTBEAT_ADDR:#x} (magic {hb.magic:#x})")
        res: dict[str, Any] = {"ok": 0, "bad": 0, "untouched": 0, "in_progress": 0, "stale": 0, "pages": 0}
        gen_min: int | None = None
        gen_max = 0
        bad_pfns: list[int] = []
        for start, end in hb.ranges:
            for c0 in range(start, end, chunk_pages):
                c1 = min(end, c0 + chunk_pages)
                off = ram.offset(c0 << PAGE_SHIFT)
                if ram.offset(c1 << PAGE_SHIFT) > ram.size:
                    raise ValueError(f"guest range {c0:#x}-{c1:#x} lies beyond the memfd ({ram.size} bytes)")
                w0 = off // 4
                words = np.array(ram.words[w0 : w0 + (c1 - c0) * 1024]).reshape(c1 - c0, 1024)  # a copy
                pfns = np.arange(c0, c1, dtype=np.uint64)
                ok, untouched, gen = _check_pages(words, pfns)
                if hb.passes == 0:  # first pass: pages past the cursor still hold what boot left there
                    untouched |= ~ok & (pfns > np.uint64(hb.cur_pfn))
                for i in np.nonzero(~ok & ~untouched)[0]:
                    pfn = int(pfns[i])
                    if stopped and pfn == hb.cur_pfn:
                        continue
                    for _ in range(0 if stopped else retries):
                        page = np.array(ram.words[w0 + i * 1024 : w0 + (i + 1) * 1024]).reshape(1, 1024)
                        o, u, g = _check_pages(page, pfns[i : i + 1])
                        if o[0] or u[0]:
                            ok[i], untouched[i], gen[i] = o[0], u[0], g[0]
                            break
                if stopped:
                    # Pages before cur_pfn carry this pass's generation, later ones the previous pass's.
                    cur = np.uint64(hb.cur_pfn)
                    expect = np.where(pfns < cur, hb.generation, hb.generation - 1).astype(np.uint32)
                    prog = pfns == cur
                    stale_ok = ok & (gen != expect) & ~prog
                    stale_zero = untouched & (expect > 0) & ~prog
                    res["stale"] += int(stale_ok.sum() + stale_zero.sum())
                    res["in_progress"] += int((prog & ~ok).sum())
                    bad = ~ok & ~untouched & ~prog
                else:
                    bad = ~ok & ~untouched
                res["ok"] += int(ok.sum())
                res["untouched"] += int(untouched.sum())
                res["bad"] += int(bad.sum())
                res["pages"] += c1 - c0
                if len(bad_pfns) < 16:
                    bad_pfns += [int(p) for p in pfns[bad][: 16 - len(bad_pfns)]]
                if ok.any():
                    g = gen[ok]
                    gen_min = int(g.min()) if gen_min is None else min(gen_min, int(g.min()))
                    gen_max = max(gen_max, int(g.max()))
        res.update(generation_min=gen_min, generation_max=gen_max, bad_pfns=bad_pfns, heartbeat=hb)
        return res
