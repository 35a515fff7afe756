"""cpr-transfer from first principles, before any VM: a memfd, mapped twice, handed to another process.

Notebook 01 uses these helpers. Everything is real: `memfd_create(2)` makes the "guest RAM", `mmap(2)` maps it
(twice, at two addresses), and a child process receives the fd over a UNIX socket with SCM_RIGHTS
(`socket.send_fds`), maps it at an address of its own and writes to it. /proc shows it all. QEMU does the same:
memory-backend-memfd calls qemu_memfd_create(), cpr_state_save() sends each RAM block's fd over the cpr channel,
and the new QEMU's cpr_state_load() + cpr_find_fd() get them back and mmap them.

The child (`python -m labkit.teach.memfd_demo FD`) answers small JSON requests on a SOCK_SEQPACKET socket, so each
request and reply is one message and an fd can ride along with any of them. It exits when the parent closes
the socket or dies, so it never outlives the notebook.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import socket
import subprocess
import sys
from dataclasses import dataclass

from labkit.host.procfs import PAGE_SIZE, FdInfo, Mapping, page_frames, read_fds, read_maps

__all__ = [
    "MiB",
    "memfd_create",
    "memfd_inode",
    "fd_target",
    "MemfdMapping",
    "mmap_shared",
    "munmap",
    "map_shared",
    "memfd_maps",
    "maps_lines",
    "memfds_of",
    "frames",
    "send_fd",
    "Receiver",
]

MiB = 1 << 20


def memfd_create(name: str = "guest-ram", size: int = 16 * MiB) -> int:
    """An anonymous file in RAM of `size` bytes, as memory-backend-memfd makes one (qemu_memfd_create).

    The pages are allocated only when first touched; the file lives as long as an fd or a mapping refers to it.
    """
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        raise
    return fd


def memfd_inode(fd: int) -> int:
    """The inode number of the open file: the same memory has the same inode in every process."""
    return os.fstat(fd).st_ino


def fd_target(pid: int | str, fd: int) -> str:
    """What /proc/PID/fd/N points at, e.g. '/memfd:guest-ram (deleted)'."""
    return os.readlink(f"/proc/{pid}/fd/{fd}")


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


def mmap_shared(fd: int, size: int) -> int:
    """mmap(NULL, size, PROT_READ|PROT_WRITE, MAP_SHARED, fd, 0) from libc, returning the address as C does.

    (Python's mmap module would work too, but it keeps a dup of the fd, which muddies /proc/PID/fd.)
    """
    addr = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    if addr in (None, _MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, f"mmap: {os.strerror(err)}")
    return addr


def munmap(addr: int, size: int) -> None:
    if _libc.munmap(addr, size) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"munmap: {os.strerror(err)}")


@dataclass
class MemfdMapping:
    """One shared mapping (MAP_SHARED) of a memfd in this process, at the virtual address mmap returned."""

    addr: int
    size: int
    closed: bool = False

    def _check(self, offset: int, length: int) -> None:
        if self.closed:
            raise ValueError("the mapping is closed (munmap'ed)")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"{offset}+{length} is outside the {self.size}-byte mapping")

    def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        ctypes.memmove(self.addr + offset, data, len(data))

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return ctypes.string_at(self.addr + offset, length)

    def close(self) -> None:
        if not self.closed:
            munmap(self.addr, self.size)
            self.closed = True

    def __repr__(self) -> str:
        return f"MemfdMapping(addr={self.addr:#x}, size={self.size})"


def map_shared(fd: int, size: int | None = None) -> MemfdMapping:
    """Map a memfd MAP_SHARED: writes reach the memfd itself, so every mapping of it, in any process, sees
    them. Mapping it twice gives two addresses for the same pages."""
    size = os.fstat(fd).st_size if size is None else size
    return MemfdMapping(mmap_shared(fd, size), size)


def _memfd_paths(name: str) -> tuple[str, str]:
    return (f"/memfd:{name} (deleted)", f"/memfd:{name}")


def memfd_maps(pid: int | str, name: str) -> list[Mapping]:
    """The lines of /proc/PID/maps that map the memfd called `name`, in address order."""
    return [m for m in read_maps(pid) if m.path in _memfd_paths(name)]


def maps_lines(pid: int | str, name: str) -> list[str]:
    """The raw text of those /proc/PID/maps lines, exactly as the kernel prints them."""
    with open(f"/proc/{pid}/maps") as f:
        return [line.rstrip("\n") for line in f if line.rstrip("\n").endswith(_memfd_paths(name))]


def memfds_of(pid: int | str) -> list[FdInfo]:
    """The memfds among a process's open fds (/proc/PID/fd)."""
    return [f for f in read_fds(pid) if f.kind == "memfd"]


def frames(pid: int | str, addr: int, pages: int = 4) -> list[int | None]:
    """Physical frame numbers of the first `pages` pages at `addr` (/proc/PID/pagemap); None without root."""
    return page_frames(pid, [addr + i * PAGE_SIZE for i in range(pages)])


def send_fd(sock: socket.socket, fd: int, message: bytes = b" ") -> int:
    """Send `fd` over a UNIX socket in an SCM_RIGHTS control message (QEMU's qemu_file_put_fd sends one
    dummy byte " " with it). Returns the bytes of ordinary data that crossed: the memory itself never does."""
    return socket.send_fds(sock, [message], [fd])


# ------------------------------------------------------------------------------------------------ the child


class Receiver:
    """A second, real process that can receive an fd, map it and read or write through its own mapping.

    It plays the new QEMU of cpr-transfer: it starts with no memfd, gets one over SCM_RIGHTS, and maps the
    same pages at an address of its own.
    """

    def __init__(self, timeout: float = 10.0):
        self.timeout = timeout
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.bytes_sent = 0  # ordinary bytes that crossed the socket (requests and the dummy byte)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "labkit.teach.memfd_demo", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self.sock.settimeout(timeout)
        self.pid = self.proc.pid
        hello = self._reply()
        assert hello["pid"] == self.pid

    def _reply(self) -> dict:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the receiver exited")
        reply = json.loads(data)
        if "error" in reply:
            raise OSError(reply["error"])
        return reply

    def _call(self, op: str, fds: list[int] | None = None, **args: object) -> dict:
        msg = json.dumps({"op": op, **args}).encode()
        if fds:
            socket.send_fds(self.sock, [msg], fds)
        else:
            self.sock.send(msg)
        self.bytes_sent += len(msg)
        return self._reply()

    def receive(self, fd: int) -> int:
        """Pass `fd` to the child with SCM_RIGHTS; returns the fd number the kernel gave it there."""
        return self._call("take", fds=[fd])["fd"]

    def map(self, fd: int, size: int | None = None) -> int:
        """The child mmaps its fd (MAP_SHARED); returns the address it landed at in the child."""
        return self._call("map", fd=fd, size=size)["addr"]

    def read(self, offset: int, length: int) -> bytes:
        """Read through the child's mapping."""
        return bytes.fromhex(self._call("read", offset=offset, length=length)["data"])

    def write(self, offset: int, data: bytes) -> None:
        """Write through the child's mapping."""
        self._call("write", offset=offset, data=data.hex())

    def close_fd(self, fd: int) -> None:
        """Close the child's fd but keep its mapping: a mapping alone keeps the memory alive."""
        self._call("close-fd", fd=fd)

    def memfds(self) -> list[FdInfo]:
        return memfds_of(self.pid)

    def close(self) -> None:
        """End the child: it exits when its socket closes; wait for it, kill it if it lingers."""
        if self.proc.poll() is None:
            self.sock.close()
            try:
                self.proc.wait(self.timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.sock.close()

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _child_main(sock_fd: int) -> None:
    """The receiving process: one request per message, one reply per request, until the socket closes."""
    sock = socket.socket(fileno=sock_fd)
    mapping: MemfdMapping | None = None
    sock.send(json.dumps({"pid": os.getpid()}).encode())
    while True:
        try:
            data, new_fds, _, _ = socket.recv_fds(sock, 65536, 4)
        except OSError:
            return
        if not data:
            return  # the parent closed its end, or died
        req = json.loads(data)
        op = req["op"]
        try:
            if op == "take":
                reply: dict = {"fd": new_fds[0]}
            elif op == "map":
                mapping = map_shared(req["fd"], req.get("size"))
                reply = {"addr": mapping.addr}
            elif op == "read":
                assert mapping is not None, "map the fd first"
                reply = {"data": mapping.read(req["offset"], req["length"]).hex()}
            elif op == "write":
                assert mapping is not None, "map the fd first"
                mapping.write(req["offset"], bytes.fromhex(req["data"]))
                reply = {}
            elif op == "close-fd":
                os.close(req["fd"])
                reply = {}
            else:
                reply = {"error": f"unknown op {op!r}"}
        except (OSError, AssertionError, ValueError, KeyError, IndexError) as e:
            reply = {"error": str(e)}
        sock.send(json.dumps(reply).encode())


if __name__ == "__main__":
    _child_main(int(sys.argv[1]))
