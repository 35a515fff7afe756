"""The machine's ceilings for the work a migration does, each measured the fastest way this host can do it.

A ceiling that the emulator beats is no ceiling: it was measured the slow way. So each ceiling here is the
best of several ways to do the same work, all into memory that is already faulted in (the destination's
guest RAM is mapped before pre-copy starts, so a receiver that pays page faults measures the kernel's
fault path, not the copy):

- copy: libc memcpy through ctypes, numpy copyto, and copy_file_range between two memfds (an in-kernel copy);
- socket: memfd -> unix stream socket with sendfile, sendmsg straight from the mapping, and splice through a
  pipe, read by another process into a pre-faulted shared mapping;
- fd passing: the round trip of sending memfds over SCM_RIGHTS, the other side mapping them and answering.

`check` compares measured rates with these ceilings and names the first one beaten; `labkit bench` exits
non-zero on it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import mmap
import os
import socket
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

MiB = 1 << 20
CHUNK = 1 * MiB  # per sendmsg/splice/recv call: big enough that Python's per-call cost is noise
#: Socket buffer sizes tried: which one is fastest depends on the caches and the load (the emulator asks 1 MiB).
SOCKET_BUFFERS = (256 << 10, 1 * MiB, 4 * MiB)


@dataclass
class Ceiling:
    """One ceiling: the best method's median, with every method's median beside it (why it is the best)."""

    name: str
    unit: str  # "bytes/s" (higher is faster) or "s" (lower is faster)
    value: float
    method: str
    methods: dict[str, float] = field(default_factory=dict)  # each method's median
    errors: dict[str, str] = field(default_factory=dict)  # methods this host refused, with the reason

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def best_of(name: str, unit: str, methods: dict[str, Callable[[], float]], reps: int) -> Ceiling:
    """Run each method `reps` times, turn about (so load that comes and goes hits every method alike). The
    ceiling is the best single run of any method (max for a rate, min for a time): on a shared machine
    the best run is the one the load spared, and a ceiling must be what the machine *can* do."""
    runs: dict[str, list[float]] = {m: [] for m in methods}
    errors: dict[str, str] = {}
    for _ in range(reps):
        for method, fn in methods.items():
            if method in errors:
                continue
            try:
                runs[method].append(fn())
            except OSError as e:  # e.g. copy_file_range or splice refused by this kernel for these files
                errors[method] = f"{type(e).__name__}: {e}"
    runs = {m: v for m, v in runs.items() if v and m not in errors}
    if not runs:
        raise RuntimeError(f"no way to measure the {name} ceiling here: {errors}")
    pick = max if unit == "bytes/s" else min
    best = {m: pick(v) for m, v in runs.items()}
    method = pick(best, key=lambda k: best[k])
    medians = {m: statistics.median(v) for m, v in runs.items()}
    return Ceiling(name, unit, best[method], method, medians, errors)


# -- copy ----------------------------------------------------------------------------------------------------
def _memfd(name: str, size: int, fill: int | None) -> tuple[int, mmap.mmap]:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    mm = mmap.mmap(fd, size)
    arr = np.frombuffer(mm, dtype=np.uint8)
    arr[:] = 0 if fill is None else fill  # faulted in (and, with a fill, not a zero page)
    del arr
    return fd, mm


def _timed(fn: Callable[[], object], size: int) -> float:
    t0 = time.perf_counter()
    fn()
    return size / (time.perf_counter() - t0)


def _copy_methods(
    src: mmap.mmap, dst: mmap.mmap, sfd: int, dfd: int, size: int
) -> dict[str, Callable[[], float]]:
    """The ways to copy src into dst; the numpy views live in the closures only, so clearing the dict frees
    them before the mappings close."""
    a = np.frombuffer(src, dtype=np.uint8)
    b = np.frombuffer(dst, dtype=np.uint8)
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.memcpy.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
    libc.memcpy.restype = ctypes.c_void_p
    pa, pb = a.ctypes.data, b.ctypes.data

    def copy_file_range() -> None:
        done = 0
        while done < size:
            n = os.copy_file_range(sfd, dfd, size - done, done, done)
            if n <= 0:
                raise OSError("copy_file_range made no progress")
            done += n

    return {
        "memcpy (ctypes)": lambda: _timed(lambda: libc.memcpy(pb, pa, size), size),
        "numpy copyto": lambda: _timed(lambda: np.copyto(b, a), size),
        "copy_file_range memfd->memfd": lambda: _timed(copy_file_range, size),
    }


def _only(names: Iterable[str], wanted: Iterable[str] | None) -> list[str]:
    """The method names to measure: all of `names`, or those of them in `wanted` (an unknown one is an error,
    not a ceiling quietly measured another way)."""
    names = list(names)
    if wanted is None:
        return names
    unknown = set(wanted) - set(names)
    if unknown:
        raise ValueError(f"unknown ceiling method(s) {sorted(unknown)}; known: {names}")
    return [n for n in names if n in set(wanted)]


def copy_ceiling(size: int = 256 * MiB, reps: int = 3, methods_wanted: Iterable[str] | None = None) -> Ceiling:
    """Bytes/s copying guest-RAM-like memory (a memfd mapping) into another one that is already faulted in."""
    sfd, src = _memfd("ceiling-src", size, 0x5A)
    dfd, dst = _memfd("ceiling-dst", size, None)
    try:
        methods = _copy_methods(src, dst, sfd, dfd, size)
        for name in set(methods) - set(_only(methods, methods_wanted)):
            del methods[name]
        try:
            return best_of("copy", "bytes/s", methods, reps)
        finally:
            methods.clear()  # the views go before their mappings close
    finally:
        src.close()
        dst.close()
        os.close(sfd)
        os.close(dfd)


# -- socket --------------------------------------------------------------------------------------------------
def _receiver(sock: socket.socket, size: int, rounds: int) -> None:
    """The destination's side (a forked child): receive `rounds` x `size` bytes straight into a shared
    mapping faulted in beforehand, answering one byte after each round."""
    _, mm = _memfd("ceiling-recv", size, None)
    view = memoryview(mm)
    for _ in range(rounds):
        got = 0
        while got < size:
            n = sock.recv_into(view[got : got + CHUNK])
            if not n:
                return
            got += n
        sock.sendall(b"k")


def _send_sendfile(sock: socket.socket, fd: int, mm: mmap.mmap, size: int) -> None:
    off = 0
    while off < size:
        off += os.sendfile(sock.fileno(), fd, off, size - off)


def _send_sendmsg(sock: socket.socket, fd: int, mm: mmap.mmap, size: int) -> None:
    view = memoryview(mm)
    off = 0
    while off < size:
        off += sock.send(view[off : off + CHUNK])
    view.release()


def _send_splice(sock: socket.socket, fd: int, mm: mmap.mmap, size: int) -> None:
    r, w = os.pipe()
    try:
        try:
            import fcntl

            fcntl.fcntl(w, 1031, CHUNK)  # F_SETPIPE_SZ: a bigger pipe, fewer splice calls
        except OSError:
            pass
        off = 0
        while off < size:
            n = os.splice(fd, w, min(CHUNK, size - off), offset_src=off)
            off += n
            while n:
                n -= os.splice(r, sock.fileno(), n)
    finally:
        os.close(r)
        os.close(w)


SENDERS = {
    "sendfile": _send_sendfile,
    "sendmsg from the mapping": _send_sendmsg,
    "splice via a pipe": _send_splice,
}


def socket_method_name(sender: str, bufsize: int) -> str:
    return f"{sender}, {bufsize >> 10} KiB socket buffers"


def socket_ceiling(size: int = 256 * MiB, reps: int = 3, methods_wanted: Iterable[str] | None = None) -> Ceiling:
    """Bytes/s from a memfd (guest RAM) through a unix stream socket into another process's pre-faulted
    mapping: the best of sendfile, sendmsg and splice, each with several socket buffer sizes (or of the
    `methods_wanted` among them). One receiver per method, its mapping faulted in once."""
    combos = {socket_method_name(s, b): (s, b) for s, b in itertools.product(SENDERS, SOCKET_BUFFERS)}
    fd, mm = _memfd("ceiling-send", size, 0x5A)
    methods: dict[str, Callable[[], float]] = {}
    children: list[tuple[int, socket.socket]] = []
    try:
        for name in _only(combos, methods_wanted):
            sender, bufsize = combos[name]
            send = SENDERS[sender]
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            for s in (a, b):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    a.close()
                    _receiver(b, size, reps)
                except BaseException:  # noqa: BLE001 - the child must never return into the bench
                    code = 1
                finally:
                    os._exit(code)
            b.close()
            children.append((pid, a))

            def run(send: Callable[..., None] = send, a: socket.socket = a) -> float:
                t0 = time.perf_counter()
                send(a, fd, mm, size)
                if a.recv(1) != b"k":
                    raise OSError("the receiver went away")
                return size / (time.perf_counter() - t0)

            methods[name] = run
        return best_of("socket", "bytes/s", methods, reps)
    finally:
        for pid, a in children:
            a.close()
            os.waitpid(pid, 0)
        mm.close()
        os.close(fd)


# -- fd passing ----------------------------------------------------------------------------------------------
def fd_pass_round_trip(nfds: int = 7, size: int = 256 * MiB, reps: int = 20) -> Ceiling:
    """Seconds for a round trip: send nfds memfds over SCM_RIGHTS, the other process maps them all and answers
    (what cpr-transfer's CPR channel costs, minus its few bytes of state)."""
    fds = []
    for i in range(nfds):
        fd = os.memfd_create(f"bench-{i}", os.MFD_CLOEXEC)
        os.ftruncate(fd, size if i == 0 else 256 << 10)
        fds.append(fd)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            a.close()
            for _ in range(reps + 1):
                _, got, _, _ = socket.recv_fds(b, 1, nfds)
                maps = [mmap.mmap(f, os.fstat(f).st_size) for f in got]
                for m in maps:
                    m.close()
                for f in got:
                    os.close(f)
                b.sendall(b"k")
        except BaseException:  # noqa: BLE001 - the child must never return into the bench
            code = 1
        finally:
            os._exit(code)
    b.close()
    times = []
    try:
        for i in range(reps + 1):
            t0 = time.perf_counter()
            socket.send_fds(a, [b" "], fds)
            a.recv(1)
            if i:  # the first round trip warms both sides up
                times.append(time.perf_counter() - t0)
    finally:
        a.close()
        os.waitpid(pid, 0)
        for fd in fds:
            os.close(fd)
    return Ceiling("fd_pass", "s", statistics.median(times), "send_fds + mmap + 1-byte answer",
                   {"send_fds + mmap + 1-byte answer": statistics.median(times)})  # fmt: skip


def measure_all(
    size: int = 256 * MiB, reps: int = 3, methods: Mapping[str, Iterable[str]] | None = None
) -> dict[str, Ceiling]:
    """Every ceiling, in one go (the bench runs these before any VM starts); `methods` narrows a ceiling
    ("copy", "socket") to the named methods (`labkit bench --quick`)."""
    methods = methods or {}
    return {
        "copy": copy_ceiling(size, reps, methods.get("copy")),
        "socket": socket_ceiling(size, reps, methods.get("socket")),
        "fd_pass": fd_pass_round_trip(),
    }


# -- the check -----------------------------------------------------------------------------------------------
@dataclass
class Breach:
    """A measured figure that beat its ceiling (or went below its floor): the ceiling is wrong."""

    figure: str
    measured: float
    ceiling: str
    ceiling_value: float
    ceiling_method: str
    unit: str

    def line(self) -> str:
        def show(v: float) -> str:
            return f"{v / 1e9:.3f} GB/s" if self.unit == "bytes/s" else f"{v * 1e3:.3f} ms"

        beat = "exceeds" if self.unit == "bytes/s" else "is below"
        return (
            f"ceiling broken: {self.figure} {show(self.measured)} {beat} the {self.ceiling} ceiling "
            f"{show(self.ceiling_value)} ({self.ceiling_method}): real code did this work faster than the "
            "ceiling's best method, so that ceiling is not measured the fastest way and must be fixed"
        )


def check(figures: list[tuple[str, float | None, str]], ceilings: dict[str, dict[str, Any]]) -> list[Breach]:
    """figures: (what, measured value, which ceiling). A rate above a bytes/s ceiling, or a time below an
    "s" floor, is a breach. Figures or ceilings that are missing are skipped (nothing to compare)."""
    out = []
    for figure, value, which in figures:
        c = ceilings.get(which)
        if value is None or c is None or c.get("value") is None:
            continue
        beaten = value > c["value"] if c["unit"] == "bytes/s" else value < c["value"]
        if beaten:
            out.append(Breach(figure, value, which, c["value"], c["method"], c["unit"]))
    return out


def ratio_to_ceiling(value: float | None, ceiling: dict[str, Any] | None) -> float | None:
    """How close a figure came to its ceiling: rate/ceiling, or floor/time for a time; <= 1 always, or the
    ceiling is wrong."""
    if value is None or ceiling is None or not ceiling.get("value") or not value:
        return None
    return float(value / ceiling["value"] if ceiling["unit"] == "bytes/s" else ceiling["value"] / value)
