#!/usr/bin/env python3
"""Throughput of labkit's migration stream between two real processes over a unix socketpair.

A 1 GiB memfd mapping (by default 58% random pages and 42% zero pages, a third of the RAM in runs of single
pages alternating between the two; ``--pattern random`` has no zero pages) is streamed with ram_save_pages() from one process's mmap into another process's mmap of a
fresh memfd, read with qemu_loadvm_state(); then the ceiling is measured: one raw ``sock.sendall`` of the whole
mapping into ``recv_into`` on the other side. Each case runs 3 times; the median is printed. Timing is on
the source: from the first byte to the destination's one-byte acknowledgement after its last byte.

    python scripts/bench_stream.py [--size 1G] [--sndbuf 0] [--no-prefault] [--chunk-pages 256] [--pattern mixed|random]
"""

from __future__ import annotations

import argparse
import mmap
import os
import socket
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from labkit.vm.migration import qemu_file, ram, stream  # noqa: E402

MADV_POPULATE_WRITE = 23


def fill_source(mm: mmap.mmap, pattern: str = "mixed") -> None:
    """mixed: runs of 64 random pages, 64 zero pages, 64 pages each random (3 in 4) or zero; random: no zeros."""
    pages = np.frombuffer(mm, dtype=np.uint64).reshape(-1, stream.PAGE_SIZE // 8)
    n = len(pages)
    rng = np.random.default_rng(42)
    kind = np.full(n, pattern == "random")  # True = random page
    block = 64
    for b0 in range(
        0, n if pattern == "mixed" else 0, block
    ):  # alternate: 64 random, 64 zero, 64 mixed(random/zero per page), ...
        sel = (b0 // block) % 3
        if sel == 0:
            kind[b0 : b0 + block] = True
        elif sel == 2:
            kind[b0 : b0 + block] = rng.random(min(block, n - b0)) < 0.75
    for p0 in range(0, n, 4096):
        rows = pages[p0 : p0 + 4096]
        k = kind[p0 : p0 + 4096]
        rows[k] = rng.integers(1, 2**63, size=(int(k.sum()), rows.shape[1]), dtype=np.uint64)
    mm.madvise(MADV_POPULATE_WRITE)


def tune(sock: socket.socket, bufsize: int) -> None:
    if bufsize:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)


def fresh_destination(size: int, prefault: bool) -> tuple[int, mmap.mmap, float]:
    fd = os.memfd_create("bench-dst")
    os.ftruncate(fd, size)
    mm = mmap.mmap(fd, size)
    t = time.perf_counter()
    if prefault:
        mm.madvise(MADV_POPULATE_WRITE)
    return fd, mm, time.perf_counter() - t


def receiver(sock: socket.socket, size: int, reps: int, prefault: bool, src_sum: int, bufsize: int) -> None:
    """Child process: for each case and repetition, a fresh memfd, then the stream or raw bytes into it."""
    for case in ("stream", "raw"):
        for _ in range(reps):
            fd, mm, prefault_s = fresh_destination(size, prefault)
            mv = memoryview(mm)
            sock.sendall(b"r")  # ready
            c0 = time.process_time()
            if case == "stream":
                f = stream.QEMUFileIn(sock, bufsize)
                st = stream.qemu_loadvm_state(
                    f, lambda name, mv=mv: mv, lambda *a: None, zero_page_needs_write=lambda name: False
                )
                assert st.normal_pages + st.zero_pages == size // stream.PAGE_SIZE, st
            else:
                got = 0
                while got < size:
                    n = sock.recv_into(mv[got:])
                    if not n:
                        raise SystemExit("raw: early EOF")
                    got += n
            cpu = time.process_time() - c0
            sock.sendall(b"k")
            ok = int(np.frombuffer(mm, dtype=np.uint64).sum(dtype=np.uint64)) == src_sum
            sock.sendall(f"{int(ok)} {prefault_s:.3f} {cpu:.3f}".encode().ljust(64))
            del mv
            mm.close()
            os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G", help="RAM size (K/M/G suffix)")
    ap.add_argument(
        "--sndbuf",
        type=lambda s: int(s, 0),
        default=stream.SOCKET_BUFFER_SIZE,
        help="SO_SNDBUF/SO_RCVBUF for both cases (0 = leave Linux's default; QEMUFileOut/In still raise it "
        "to stream.SOCKET_BUFFER_SIZE unless --keep-default-buffers)",
    )
    ap.add_argument(
        "--keep-default-buffers", action="store_true", help="stop QEMUFileOut/In resizing buffers"
    )
    ap.add_argument("--no-prefault", action="store_true", help="let the stream fault destination pages in")
    ap.add_argument("--chunk-pages", type=int, default=stream.RAM_SAVE_CHUNK_PAGES)
    ap.add_argument("--rx-bufsize", type=int, default=qemu_file.READ_AHEAD_SIZE, help="QEMUFileIn read-ahead bytes")
    ap.add_argument("--pattern", choices=["mixed", "random"], default="mixed", help="source RAM contents")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    size = int(args.size[:-1]) << {"K": 10, "M": 20, "G": 30}[args.size[-1].upper()]
    ram.RAM_SAVE_CHUNK_PAGES = args.chunk_pages  # set where ram_save_pages() and QEMUFile read them
    if args.keep_default_buffers:
        qemu_file.SOCKET_BUFFER_SIZE = 0
    prefault = not args.no_prefault

    src_fd = os.memfd_create("bench-src")
    os.ftruncate(src_fd, size)
    src = mmap.mmap(src_fd, size)
    fill_source(src, args.pattern)
    src_sum = int(np.frombuffer(src, dtype=np.uint64).sum(dtype=np.uint64))
    zero_pages = int((~np.frombuffer(src, dtype=np.uint64).reshape(-1, 512).any(axis=1)).sum())

    a, b = socket.socketpair()
    tune(a, args.sndbuf)
    tune(b, args.sndbuf)
    pid = os.fork()
    if pid == 0:
        a.close()
        code = 0
        try:
            receiver(b, size, args.reps, prefault, src_sum, args.rx_bufsize)
        except BaseException as e:  # noqa: BLE001 - report anything from the child, then exit
            print(f"receiver failed: {e!r}", file=sys.stderr)
            code = 1
        os._exit(code)
    b.close()
    print(
        f"{size >> 20} MiB, {zero_pages} of {size // stream.PAGE_SIZE} pages zero, "
        f"SO_SNDBUF/SO_RCVBUF={args.sndbuf or 'default'} (effective {a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)}), "
        f"destination {'pre-faulted (MADV_POPULATE_WRITE) before' if prefault else 'faulted in by'} the stream, "
        f"chunk {stream.RAM_SAVE_CHUNK_PAGES} pages, read-ahead {args.rx_bufsize} bytes"
    )
    data = memoryview(src)
    results: dict[str, list[float]] = {}
    cpu: dict[str, list[tuple[float, float]]] = {}
    try:
        for case in ("stream", "raw"):
            for _ in range(args.reps):
                if a.recv(1) != b"r":
                    raise SystemExit("receiver died")
                t0 = time.perf_counter()
                c0 = time.process_time()
                if case == "stream":
                    f = stream.QEMUFileOut(a)
                    stream.qemu_savevm_state_header(f)
                    stream.ram_save_setup(f, [("pc.ram", size)])
                    stream.ram_save_pages(f, "pc.ram", 0, data)
                    stream.ram_save_iterate_end(f)
                    stream.qemu_savevm_state_end(f)
                else:
                    a.sendall(data)
                if a.recv(1) != b"k":
                    raise SystemExit("receiver died")
                dt = time.perf_counter() - t0
                src_cpu = time.process_time() - c0
                ok, pre_s, dst_cpu = a.recv(64, socket.MSG_WAITALL).decode().split()
                results.setdefault(case, []).append(size / dt / 1e9)
                cpu.setdefault(case, []).append((src_cpu, float(dst_cpu)))
                print(
                    f"  {case:6s} {size / dt / 1e9:5.2f} GB/s  {dt * 1e3:5.0f} ms wall, CPU source {src_cpu * 1e3:4.0f} ms "
                    f"destination {float(dst_cpu) * 1e3:4.0f} ms; destination identical: {ok == '1'}; "
                    f"its pre-fault took {float(pre_s) * 1e3:.0f} ms"
                )
    finally:
        a.close()
        os.waitpid(pid, 0)
    med = {k: statistics.median(v) for k, v in results.items()}
    gib = size / (1 << 30)
    for case, v in cpu.items():
        print(
            f"median CPU per GiB, {case:6s}: source {statistics.median(c[0] for c in v) / gib:.3f} s, "
            f"destination {statistics.median(c[1] for c in v) / gib:.3f} s"
        )
    print(
        f"median: stream {med['stream']:.2f} GB/s, raw sendall->recv_into ceiling {med['raw']:.2f} GB/s "
        f"({100 * med['stream'] / med['raw']:.0f}% of raw)"
    )


if __name__ == "__main__":
    main()
