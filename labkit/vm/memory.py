"""Guest RAM: RAM blocks held in real kernel objects, named and allocated as QEMU allocates them.

QEMU keeps guest memory in RAMBlocks (system/physmem.c). A memory-backend-memfd block is a memfd mapped
MAP_SHARED; memory-backend-ram is private anonymous memory (a memfd when share=on); memory-backend-file maps a
file. The PC's implicit blocks (firmware, option ROMs, video RAM, ACPI tables) are private anonymous memory unless
`-machine aux-ram-share=on`, which turns them into memfds too: that is what lets cpr-transfer hand *every* block
to the new process. Each block carries a dirty bitmap that the guest fills (it plays KVM's dirty log, since this
kernel has no soft-dirty bits).

A block has a used length (what the guest sees and migration sends) and a maximum length (what is reserved,
mapped and, for a memfd, the file's size): ACPI tables use 128 KiB of 2 MiB so they can grow after a reset.
QEMU keeps ram_list sorted by maximum length, largest first, and registers CPR fds in creation order; both
orders are kept here, because the main stream follows the first and the CPR state and the blockers the second.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from labkit.errors import LabkitError
from labkit.vm.memfd import (
    MEMFD_BACKEND_SEALS,
    MemfdError,
    check_hugetlbsize,
    fd_page_size,
    map_backing_store,
    qemu_memfd_create,
)
from labkit.vm.options import MachineOptions
from labkit.vm.oslib import qemu_prealloc_mem

PAGE_SIZE = 4096

RAM_BLOCK_ALIGN = 64 * PAGE_SIZE  # find_ram_offset(): a block starts on a 'long' of the dirty bitmap


@dataclass(frozen=True)
class ImplicitBlock:
    """A RAM block the q35 machine or one of its default devices creates itself (no -object describes it)."""

    name: str  # the MemoryRegion's name: what CPR blockers and size errors print
    used: int
    max: int
    readonly: bool = True
    dev: str | None = None  # qdev_get_dev_path() of the owning PCI device: the idstr is "dev/name"
    default_device: bool = False  # belongs to a default device (VGA, NIC): absent with -nodefaults

    @property
    def idstr(self) -> str:
        """qemu_ram_set_idstr(): "<PCI path>/<name>" for device RAM, the bare name otherwise (= cpr_name())."""
        return f"{self.dev}/{self.name}" if self.dev else self.name


# The implicit blocks of `-machine q35` with SeaBIOS, in creation order, as QEMU 10.0.2's `info ramblock`
# lists them here (used and maximum lengths, PCI paths). Without -nodefaults q35 adds a VGA at 00:01.0 and an
# e1000e NIC at 00:02.0. QEMU prepends CPR blockers, so the block created last is the one `migrate` names:
# /rom@etc/acpi/rsdp, as QEMU 10.0.2 did here.
IMPLICIT_BLOCKS: tuple[ImplicitBlock, ...] = (
    ImplicitBlock("pc.bios", 256 << 10, 256 << 10),
    ImplicitBlock("pc.rom", 128 << 10, 128 << 10),
    ImplicitBlock("vga.vram", 16 << 20, 16 << 20, False, "0000:00:01.0", True),
    ImplicitBlock("vga.rom", 64 << 10, 64 << 10, True, "0000:00:01.0", True),
    ImplicitBlock("e1000e.rom", 256 << 10, 256 << 10, True, "0000:00:02.0", True),
    ImplicitBlock("/rom@etc/acpi/tables", 128 << 10, 2 << 20),
    ImplicitBlock("/rom@etc/table-loader", 4 << 10, 64 << 10),
    ImplicitBlock("/rom@etc/acpi/rsdp", 4 << 10, 4 << 10),
)

# qemu_ram_alloc_from_fd()'s refusal of an fd smaller than the block (QEMU 10.0.2's text; the name is the
# MemoryRegion's, the sizes are hexadecimal, the offset is always 0 here).
BACKING_STORE_TOO_SMALL = (
    "{name} backing store size 0x{size:x} is too small for 'size' option 0x{max_length:x} "
    "plus 'offset' option 0x0"
)

CPR_BLOCKER_TEXT = (
    "Memory region {name} is not compatible with CPR. share=on is required for memory-backend objects, "
    "and aux-ram-share=on is required."
)


class RAMBlockError(LabkitError):
    """A RAM block could not be created as asked (wrong fd from the CPR channel, a backing store too small).

    ``idstr`` names the block, as QEMU's RAMBlock idstr; start-up prints the message and exits with status 1.
    """

    def __init__(self, idstr: str, message: str):
        super().__init__(message)
        self.idstr = idstr


@dataclass(eq=False)
class RAMBlock:
    """One block of guest RAM and its dirty bitmap (QEMU's RAMBlock + its KVM dirty log)."""

    idstr: str
    size: int  # QEMU's used_length: what the guest sees and migration sends
    kind: str  # memfd | anon | file
    backend: str  # the QOM type (memory-backend-memfd, ...) or "implicit"
    shared: bool
    fd: int = -1  # -1 for private anonymous memory
    path: str | None = None  # file path for memory-backend-file
    reused: bool = False  # True when the memory came over the CPR channel and must not be re-initialised
    max_length: int = 0  # what is mapped (and the memfd's size); 0 = the used length
    mr_name: str = ""  # the MemoryRegion's name ("vga.vram" for "0000:00:01.0/vga.vram"); "" = idstr
    readonly: bool = False  # a ROM (info ramblock's RO column)
    prealloc: bool = False  # its backend has prealloc=on (query-memdev's "prealloc")
    offset: int = 0  # the block's ram_addr_t (find_ram_offset), info ramblock's Offset column
    page_size: int = PAGE_SIZE  # the host pages behind it (qemu_fd_getpagesize): 2 MiB for a hugetlb memfd
    mm: mmap.mmap | None = field(default=None, repr=False)
    dirty: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint8), repr=False)  # sized in _new_block
    dirty_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    dirty_marked: bool = False  # a page was marked since the log was last cleared (clearing can then be skipped)

    def __post_init__(self) -> None:
        self.max_length = self.max_length or self.size
        self.mr_name = self.mr_name or self.idstr

    @property
    def used_length(self) -> int:
        return self.size

    @property
    def npages(self) -> int:
        return self.size // PAGE_SIZE

    @property
    def named_file(self) -> bool:
        """QEMU's qemu_ram_is_named_file(): memory a new process can reopen by path."""
        return self.kind == "file"

    @property
    def cpr_compatible(self) -> bool:
        """ram_is_cpr_compatible(): compatible iff the block has an fd and is shared."""
        return self.fd >= 0 and self.shared and self.backend != "memory-backend-epc"

    def array(self) -> np.ndarray:
        """The block's used bytes as a numpy array over the mapping (no copy)."""
        assert self.mm is not None
        return np.frombuffer(self.mm, dtype=np.uint8, count=self.size)

    def view(self) -> memoryview:
        """The block's used bytes (the mapping beyond them is reserved up to max_length)."""
        assert self.mm is not None
        return memoryview(self.mm)[: self.size]

    def dirty_sync(self) -> np.ndarray:
        """Take and clear the dirty bitmap (migration_bitmap_sync): pages written since the last sync."""
        with self.dirty_lock:
            taken = self.dirty.copy()
            self.dirty[:] = 0
            self.dirty_marked = False
        return taken

    def dirty_clear(self) -> None:
        """Start a clean dirty log. A log no page was marked in is left alone: it is still the zero pages
        calloc gave it, and writing it would fault in one byte per guest page (2 MiB at 8 GiB of RAM)."""
        with self.dirty_lock:
            if self.dirty_marked:
                self.dirty[:] = 0
                self.dirty_marked = False

    def mark_dirty(self, pages: np.ndarray | slice) -> None:
        with self.dirty_lock:
            self.dirty[pages] = 1
            self.dirty_marked = True

    def close(self) -> None:
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:
                pass  # a numpy view still alive at exit; the kernel unmaps it with the process
            self.mm = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _map(fd: int, size: int, shared: bool) -> mmap.mmap:
    flags = mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE
    return mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)


def _page_align(n: int) -> int:
    return (n + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE


def _new_block(
    idstr: str,
    size: int,
    backend: str,
    shared: bool,
    mem_path: str | None,
    cpr_fds: dict[str, int],
    *,
    max_length: int = 0,
    mr_name: str = "",
    readonly: bool = False,
    hugetlb: tuple[bool, int | None] | None = None,
) -> RAMBlock:
    """Allocate (or, under cpr-transfer, adopt) the memory of one block, as qemu_ram_alloc_internal does:
    max_length is reserved and mapped, a new memfd is created that large, and the guest uses `size` of it."""
    size = _page_align(size)
    max_length = _page_align(max(max_length, size))
    mr_name = mr_name or idstr
    if backend == "memory-backend-file":
        assert mem_path is not None
        fd = os.open(mem_path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        block = RAMBlock(idstr, size, "file", backend, shared, fd, mem_path, mr_name=mr_name)
        block.mm = _map(fd, size, shared)
        if not shared:
            os.close(fd)
            block.fd = -1
    elif shared:
        fd = cpr_fds.pop(idstr, -1)  # cpr_find_fd(name, 0)
        reused = fd >= 0
        if reused:
            # A memory-backend-memfd maps its fd with grow=false; implicit blocks and memory-backend-ram,
            # share=on go through qemu_ram_alloc_internal, which passes grow=reused.
            try:
                _adopt_cpr_fd(idstr, mr_name, fd, max_length, grow=backend != "memory-backend-memfd")
            except BaseException:
                os.close(fd)  # taken out of cpr_fds: no one else will close it
                raise
        elif hugetlb is not None:  # hugetlb= or hugetlbsize= given: QEMU's own memfd path, sealed
            fd = _hugetlb_memfd(idstr, max_length, hugetlb)
        else:
            fd = os.memfd_create(idstr, os.MFD_CLOEXEC)
            os.ftruncate(fd, max_length)
        block = RAMBlock(idstr, size, "memfd", backend, True, fd, reused=reused, page_size=fd_page_size(fd))
        try:
            block.mm = map_backing_store(fd, max_length)
        except MemfdError as e:
            block.close()
            raise RAMBlockError(idstr, str(e)) from None
    else:
        block = RAMBlock(idstr, size, "anon", backend, False)
        block.mm = mmap.mmap(
            -1, max_length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
    block.max_length = len(block.mm)
    block.mr_name, block.readonly = mr_name, readonly
    block.dirty = np.zeros(block.npages, dtype=np.uint8)
    return block


def _hugetlb_memfd(idstr: str, size: int, hugetlb: tuple[bool, int | None]) -> int:
    """memfd_backend_memory_alloc() with hugetlb= or hugetlbsize= set: the property check, then
    qemu_memfd_create() with QEMU's default seals; QEMU's texts on failure."""
    on, hsize = hugetlb
    try:
        if hsize is not None:
            check_hugetlbsize(hsize)
        return qemu_memfd_create(idstr, size, on, hsize or 0, MEMFD_BACKEND_SEALS)
    except MemfdError as e:
        raise RAMBlockError(idstr, str(e)) from None


def _adopt_cpr_fd(idstr: str, mr_name: str, fd: int, max_length: int, grow: bool) -> None:
    """qemu_ram_alloc_from_fd() on an fd from the CPR channel, before anything is mapped.

    Larger than the block is fine (only max_length is mapped). Smaller is refused with QEMU's text, unless
    the file is empty or `grow` is set: then it is grown to max_length, which grows the source's memfd too
    (the same inode), so neither process can touch a page past the end of the file. labkit also refuses an
    fd that is not a memfd at all, with its own text: QEMU would only fail later, at mmap."""
    from labkit.vm.migration.cpr import CprError, cpr_fd_check

    try:
        info = cpr_fd_check(fd)
    except CprError as e:
        raise RAMBlockError(idstr, f"cpr fd for RAM block {idstr}: {e}") from None
    have = info["size"] or 0
    if have and have < max_length and not grow:
        raise RAMBlockError(
            idstr, BACKING_STORE_TOO_SMALL.format(name=mr_name, size=have, max_length=max_length)
        )
    if have < max_length:
        os.ftruncate(fd, max_length)


def find_ram_offset(blocks: list[RAMBlock], size: int) -> int:
    """QEMU's find_ram_offset(): the start of the smallest gap in ram_addr_t space that fits `size`, each
    candidate rounded up to RAM_BLOCK_ALIGN. Blocks are only ever added here, so it ends up appending."""
    if not blocks:
        return 0
    offset, mingap = 0, None
    for b in blocks:
        candidate = -(-(b.offset + b.max_length) // RAM_BLOCK_ALIGN) * RAM_BLOCK_ALIGN
        following = [n.offset for n in blocks if n.offset >= candidate]
        gap = (min(following) if following else 1 << 64) - candidate
        if gap >= size and (mingap is None or gap < mingap):
            offset, mingap = candidate, gap
    return offset


class RAMList:
    """All RAM blocks of one VM (QEMU's ram_list) and the system RAM the guest runs in.

    Iterating gives ram_list's order: largest maximum length first, ties in creation order (ram_block_add
    inserts a block before the first smaller one). `created` keeps creation order, which is the order QEMU
    registers CPR fds and adds CPR blockers in."""

    def __init__(self, blocks: list[RAMBlock], system: RAMBlock):
        self.created = list(blocks)
        self.blocks: list[RAMBlock] = []
        for b in self.created:
            self.add(b)
        self.system = system

    def add(self, block: RAMBlock) -> None:
        """ram_block_add(): give the block its ram_addr_t and insert it in ram_list's order."""
        block.offset = find_ram_offset(self.blocks, block.max_length)
        at = next((i for i, b in enumerate(self.blocks) if b.max_length < block.max_length), len(self.blocks))
        self.blocks.insert(at, block)
        if block not in self.created:
            self.created.append(block)

    def __iter__(self) -> Iterator[RAMBlock]:
        return iter(self.blocks)

    def find(self, idstr: str) -> RAMBlock | None:
        return next((b for b in self.blocks if b.idstr == idstr), None)

    def cpr_blockers(self) -> list[str]:
        """The CPR blocker texts in creation order, as query-migrate's blocked-reasons lists them. QEMU
        prepends to migration_blockers, so `migrate` reports the last one (migration_is_blocked)."""
        return [CPR_BLOCKER_TEXT.format(name=b.mr_name) for b in self.created if not b.cpr_compatible]

    def cpr_fds(self) -> list[tuple[str, int]]:
        """(name, fd) of every block whose memory the new process must adopt, in registration order."""
        return [(b.idstr, b.fd) for b in self.created if b.fd >= 0 and b.kind == "memfd"]

    def total(self) -> int:
        return sum(b.size for b in self.blocks)

    def close(self) -> None:
        for b in self.blocks:
            b.close()


def ram_blocks_create(opts: MachineOptions, cpr_fds: dict[str, int] | None = None) -> RAMList:
    """Create the VM's RAM blocks: backends first (as -object creates them), then the machine's implicit blocks.

    cpr_fds holds the fds received on the CPR channel, by name (cpr_find_fd(name, 0)); a block whose name is
    there adopts that memory instead of allocating, and keeps its contents. Leftover fds are closed by the caller.
    """
    fds = dict(cpr_fds or {})
    blocks: list[RAMBlock] = []
    system: RAMBlock | None = None
    try:
        for obj in opts.objects.values():
            shared = obj.share and obj.qom_type != "memory-backend-epc"
            huge = (obj.hugetlb, obj.hugetlbsize) if obj.hugetlb or obj.hugetlbsize is not None else None
            block = _new_block(obj.id, obj.size, obj.qom_type, shared, obj.mem_path, fds, hugetlb=huge)
            if obj.prealloc:  # qemu_prealloc_mem(): at creation, also for memory adopted over CPR
                qemu_prealloc_mem(block.mm)
                block.prealloc = True
            blocks.append(block)
            if obj.id == opts.memory_backend:
                system = block
        if system is None:
            # QEMU's create_default_memdev(): a memory-backend-ram object named pc.ram, share=off.
            system = _new_block("pc.ram", opts.ram_size, "memory-backend-ram", False, None, fds)
            blocks.append(system)
        for imp in IMPLICIT_BLOCKS:
            if imp.default_device and opts.nodefaults:
                continue  # -nodefaults: no VGA and no NIC, so neither their RAM nor their ROMs (as QEMU)
            block = _new_block(
                imp.idstr,
                imp.used,
                "implicit",
                opts.aux_ram_share,
                None,
                fds,
                max_length=imp.max,
                mr_name=imp.name,
                readonly=imp.readonly,
            )
            if not block.reused:
                _load_rom(block)
            blocks.append(block)
    except BaseException:
        for b in blocks:
            b.close()
        raise
    finally:
        for fd in fds.values():
            os.close(fd)
    return RAMList(blocks, system)


def format_ramblock_info(ram: RAMList) -> str:
    """HMP `info ramblock` / QMP x-query-ramblock's text (ram_block_format()), in ram_list order. The HVA
    column is where this process mapped the block."""
    import ctypes

    lines = [
        f"{'Block Name':>24} {'PSize':>8}  {'Offset':>18} {'Used':>18} {'Total':>18} {'HVA':>18} {'RO':>3}"
    ]
    for b in ram:
        hva = ctypes.addressof(ctypes.c_char.from_buffer(b.mm)) if b.mm is not None else 0
        lines.append(
            f"{b.idstr:>24} {_psize(b.page_size):>8}  0x{b.offset:016x} 0x{b.size:016x} 0x{b.max_length:016x} "
            f"0x{hva:016x} {'ro' if b.readonly else 'rw':>3}"
        )
    return "\n".join(lines) + "\n"


def _psize(n: int) -> str:
    """size_to_str() as info ramblock prints a page size: '4 KiB', '2 MiB'."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):g} {unit}"
    return f"{n} B"


def rom_image(name: str, size: int) -> np.ndarray:
    """The bytes a firmware/ROM block is loaded with: a pattern derived from its name, so it can be checked."""
    seed = sum(name.encode()) & 0xFF
    return ((np.arange(size, dtype=np.uint32) * 31 + seed) & 0xFF).astype(np.uint8)


def _load_rom(block: RAMBlock) -> None:
    """rom_reset(): copy the image into a ROM's used length. Skipped for blocks adopted over CPR ('hw/loader:
    fix roms during cpr'), and for video RAM, which starts as the memfd's zeros."""
    if block.readonly:
        block.array()[:] = rom_image(block.idstr, block.size)


def verify_roms(ram: RAMList) -> list[str]:
    """Names of implicit blocks whose contents differ from their image (should be none, after any migration)."""
    bad = []
    for b in ram:
        if b.backend == "implicit" and b.readonly:
            if not np.array_equal(b.array(), rom_image(b.idstr, b.size)):
                bad.append(b.idstr)
    return bad
