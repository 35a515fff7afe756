"""Guest RAM: RAM blocks held in real kernel objects, named and allocated as QEMU allocates them.

QEMU keeps guest memory in RAMBlocks (system/physmem.c). A memory-backend-memfd block is a memfd mapped
MAP_SHARED; memory-backend-ram is private anonymous memory (a memfd when share=on); memory-backend-file maps a
file. The PC's implicit blocks (firmware, option ROMs, video RAM, ACPI tables) are private anonymous memory unless
`-machine aux-ram-share=on`, which turns them into memfds too: that is what lets cpr-transfer hand *every* block
to the new process. Each block carries a dirty bitmap that the guest fills (it plays KVM's dirty log, since this
kernel has no soft-dirty bits).
"""

from __future__ import annotations

import mmap
import os
import threading
from dataclasses import dataclass, field

import numpy as np

from labkit.vm.options import MachineOptions

PAGE_SIZE = 4096
MADV_POPULATE_WRITE = 23  # linux/mman.h; pre-faults a mapping so the first writes do not fault page by page

# The implicit RAM blocks a q35 PC has, in creation order, with QEMU's names (sizes are QEMU's for a plain
# q35 with SeaBIOS, rounded to pages). QEMU prepends CPR blockers, so the block created last is the one an
# error names: /rom@etc/acpi/rsdp, as QEMU 10.0.2 did here.
IMPLICIT_BLOCKS: tuple[tuple[str, int], ...] = (
    ("pc.bios", 256 << 10),
    ("pc.rom", 128 << 10),
    ("vga.vram", 1 << 20),
    ("/rom@etc/acpi/tables", 128 << 10),
    ("/rom@etc/table-loader", 64 << 10),
    ("/rom@etc/acpi/rsdp", 4 << 10),
)

CPR_BLOCKER_TEXT = (
    "Memory region {name} is not compatible with CPR. share=on is required for memory-backend objects, "
    "and aux-ram-share=on is required."
)


class MemoryError_(Exception):  # noqa: N801 - not the builtin MemoryError: a start-up error about guest RAM
    """Guest RAM could not be created as asked (bad backend, wrong fd from the CPR channel, ...)."""


@dataclass(eq=False)
class RAMBlock:
    """One block of guest RAM and its dirty bitmap (QEMU's RAMBlock + its KVM dirty log)."""

    idstr: str
    size: int
    kind: str  # memfd | anon | file
    backend: str  # the QOM type (memory-backend-memfd, ...) or "implicit"
    shared: bool
    fd: int = -1  # -1 for private anonymous memory
    path: str | None = None  # file path for memory-backend-file
    reused: bool = False  # True when the memory came over the CPR channel and must not be re-initialised
    mm: mmap.mmap | None = field(default=None, repr=False)
    dirty: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    dirty_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def npages(self) -> int:
        return self.size // PAGE_SIZE

    @property
    def named_file(self) -> bool:
        """QEMU's qemu_ram_is_named_file(): memory a new process can reopen by path."""
        return self.kind == "file"

    @property
    def cpr_compatible(self) -> bool:
        """ram_block_add_cpr_blocker(): compatible iff the block has an fd and is shared."""
        return self.fd >= 0 and self.shared and self.backend != "memory-backend-epc"

    def array(self) -> np.ndarray:
        """The block's bytes as a numpy array over the mapping (no copy)."""
        assert self.mm is not None
        return np.frombuffer(self.mm, dtype=np.uint8)

    def view(self) -> memoryview:
        assert self.mm is not None
        return memoryview(self.mm)

    def dirty_sync(self) -> np.ndarray:
        """Take and clear the dirty bitmap (migration_bitmap_sync): pages written since the last sync."""
        with self.dirty_lock:
            taken = self.dirty.copy()
            self.dirty[:] = 0
        return taken

    def mark_dirty(self, pages: np.ndarray | slice) -> None:
        with self.dirty_lock:
            self.dirty[pages] = 1

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


def _new_block(
    idstr: str, size: int, backend: str, shared: bool, mem_path: str | None, cpr_fds: dict[str, int]
) -> RAMBlock:
    """Allocate (or, under cpr-transfer, adopt) the memory of one block, as qemu_ram_alloc_internal does."""
    size = (size + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
    if backend == "memory-backend-file":
        assert mem_path is not None
        fd = os.open(mem_path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        block = RAMBlock(idstr, size, "file", backend, shared, fd, mem_path)
        block.mm = _map(fd, size, shared)
        if not shared:
            os.close(fd)
            block.fd = -1
    elif shared:
        fd = cpr_fds.pop(idstr, -1)
        reused = fd >= 0
        if reused:
            _check_cpr_fd(idstr, fd, size)
        else:
            fd = os.memfd_create(idstr, os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
        block = RAMBlock(idstr, size, "memfd", backend, True, fd, reused=reused)
        block.mm = _map(fd, size, True)
    else:
        block = RAMBlock(idstr, size, "anon", backend, False)
        block.mm = mmap.mmap(
            -1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
    block.dirty = np.zeros(block.npages, dtype=np.uint8)
    return block


def _check_cpr_fd(name: str, fd: int, size: int) -> None:
    """Refuse an fd from the CPR channel that is not the memfd this block expects (checked before mapping)."""
    from labkit.vm.migration.cpr import CprError, cpr_fd_check

    try:
        cpr_fd_check(fd, size)
    except CprError as e:
        raise MemoryError_(f"cpr fd for RAM block {name}: {e}") from None


def populate(block: RAMBlock) -> None:
    """Fault the whole block in ahead of an incoming stream (MADV_POPULATE_WRITE), where the kernel allows it."""
    if block.mm is None:
        return
    try:
        block.mm.madvise(MADV_POPULATE_WRITE)
    except OSError:
        pass


class RAMList:
    """All RAM blocks of one VM in creation order (QEMU's ram_list), and the system RAM the guest runs in."""

    def __init__(self, blocks: list[RAMBlock], system: RAMBlock):
        self.blocks = blocks
        self.system = system

    def __iter__(self):
        return iter(self.blocks)

    def find(self, idstr: str) -> RAMBlock | None:
        return next((b for b in self.blocks if b.idstr == idstr), None)

    def cpr_blockers(self) -> list[str]:
        """The CPR blocker texts in creation order, as query-migrate's blocked-reasons lists them. QEMU
        prepends to migration_blockers, so `migrate` reports the last one (migration_is_blocked)."""
        return [CPR_BLOCKER_TEXT.format(name=b.idstr) for b in self.blocks if not b.cpr_compatible]

    def cpr_fds(self) -> list[tuple[str, int]]:
        """(name, fd) of every block whose memory the new process must adopt, in registration order."""
        return [(b.idstr, b.fd) for b in self.blocks if b.fd >= 0 and b.kind == "memfd"]

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
            block = _new_block(obj.id, obj.size, obj.qom_type, shared, obj.mem_path, fds)
            blocks.append(block)
            if obj.id == opts.memory_backend:
                system = block
        if system is None:
            # QEMU's create_default_memdev(): a memory-backend-ram object named pc.ram, share=off.
            system = _new_block("pc.ram", opts.ram_size, "memory-backend-ram", False, None, fds)
            blocks.append(system)
        for name, size in IMPLICIT_BLOCKS:
            if name == "vga.vram" and opts.nodefaults:
                continue  # -nodefaults: no VGA device, so no video RAM (as QEMU)
            block = _new_block(name, size, "implicit", opts.aux_ram_share, None, fds)
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


def rom_image(name: str, size: int) -> np.ndarray:
    """The bytes a firmware/ROM block is loaded with: a pattern derived from its name, so it can be checked."""
    seed = sum(name.encode()) & 0xFF
    if name == "vga.vram":
        return np.zeros(size, dtype=np.uint8)
    return ((np.arange(size, dtype=np.uint32) * 31 + seed) & 0xFF).astype(np.uint8)


def _load_rom(block: RAMBlock) -> None:
    """rom_reset(): copy the image in. Skipped for blocks adopted over CPR ('hw/loader: fix roms during cpr')."""
    block.array()[:] = rom_image(block.idstr, block.size)


def verify_roms(ram: RAMList) -> list[str]:
    """Names of implicit blocks whose contents differ from their image (should be none, after any migration)."""
    bad = []
    for b in ram:
        if b.backend == "implicit" and b.idstr != "vga.vram":
            if not np.array_equal(b.array(), rom_image(b.idstr, b.size)):
                bad.append(b.idstr)
    return bad
