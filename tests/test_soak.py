"""Soak: one guest migrated back and forth, hop after hop, rotating normal / cpr-transfer / cpr-reboot.

Ping-pong: A runs; B is spawned as destination; A -> B; B is verified; A is shut down; A' is spawned; B -> A';
and so on, while the guest keeps writing memory. After every hop the guest memory is verified page by page in the
process that now runs it, its write counter has only grown (the memory really came along), and the surviving
VM's fds, memfd bytes and RSS, and the test process's fds and RSS, stay flat.

The short run (10 hops) is part of every test run; the long one (200 hops) needs --run-slow.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import psutil
import pytest
from faults import unix_socket_listening
from helpers import unix, wait_for

from labkit.host.hardware import VMConfig
from labkit.host.machine import Machine
from labkit.host.procfs import read_fds
from labkit.host.runners import spawn
from labkit.qemu_syntax import GuestConfig, MiB

RAM = 32 * MiB
MODES = ("normal", "cpr-transfer", "cpr-reboot")


def completed(m: Machine) -> bool:
    st = m.cmd("query-migrate")["status"]
    assert st not in ("failed", "cancelled"), m.cmd("query-migrate")
    return st == "completed"


@dataclass
class Sample:
    hop: int
    mode: str
    vm_rss: int
    vm_fds: int
    vm_memfd_bytes: int
    test_rss: int
    test_fds: int
    written: int


def memfd_bytes(pid: int) -> int:
    """Bytes held in distinct memfds (Python's mmap keeps a dup of each fd it maps: count inodes once)."""
    seen = {f.inode: f.size or 0 for f in read_fds(pid) if f.kind == "memfd"}
    return sum(seen.values())


def hop(src: Machine, mode: str, base: VMConfig, d: Path, i: int) -> Machine:
    """Migrate the guest from src to a new process with `mode`; return the new process, running it."""
    src.cmd("migrate-set-parameters", {"mode": mode})
    cfg = replace(base, name=f"vm{i}")
    main, cpr, state = str(d / f"h{i}-main.sock"), str(d / f"h{i}-cpr.sock"), str(d / "vm-state")
    dst: Machine | None = None
    try:
        if mode == "normal":
            dst = spawn(cfg.with_incoming(f"unix:{main}"))
            src.cmd("migrate", {"uri": f"unix:{main}"})
            wait_for(lambda: completed(src), "the source")
        elif mode == "cpr-transfer":
            dst = spawn(cfg.with_incoming(f"unix:{main}", unix(cpr, "cpr")), connect=False)
            wait_for(lambda: unix_socket_listening(cpr), "the cpr socket")
            src.cmd("migrate", {"channels": [unix(main), unix(cpr, "cpr")]})
            dst.connect()
            wait_for(lambda: completed(src), "the source")
        else:  # cpr-reboot: save to a file, quit, restore in a new process
            src.cmd("migrate", {"uri": f"file:{state}"})
            wait_for(lambda: completed(src), "the save")
            src.shutdown()
            dst = spawn(cfg.with_incoming("defer"))
            dst.cmd("migrate-incoming", {"uri": f"file:{state}"})
        wait_for(lambda: completed(dst), "the destination")
    except BaseException:
        if dst is not None:
            dst.kill()
        raise
    src.shutdown()
    return dst


def soak(hops: int, d: Path) -> list[Sample]:
    base = VMConfig(name="vm0", ram=RAM, guest=GuestConfig(dirty_rate=16 * MiB, pattern="random"))
    me = psutil.Process()
    samples: list[Sample] = []
    vm = spawn(base)
    try:
        time.sleep(0.1)
        written = 0
        for i in range(1, hops + 1):
            mode = MODES[(i - 1) % len(MODES)]
            vm = hop(vm, mode, base, d, i)
            assert vm.cmd("query-status")["status"] == "running"
            verify = vm.cmd("x-labkit-verify")
            assert verify["ok"], (i, mode, verify)
            now = vm.cmd("x-labkit-guest-stats")["pages-written"]
            assert now > written, (i, mode, now, written)  # the guest's history came along, and it runs on
            written = now
            p = psutil.Process(vm.pid)
            samples.append(
                Sample(
                    i,
                    mode,
                    p.memory_info().rss,
                    p.num_fds(),
                    memfd_bytes(vm.pid),
                    me.memory_info().rss,
                    me.num_fds(),
                    written,
                )
            )
    finally:
        vm.shutdown()
    return samples


def check_flat(samples: list[Sample]) -> str:
    """Nothing grows with the number of hops; returns a one-line summary."""
    for mode in MODES:
        s = [x for x in samples if x.mode == mode]
        if not s:
            continue
        assert len({x.vm_fds for x in s}) == 1, [(x.hop, x.vm_fds) for x in s]
        assert len({x.vm_memfd_bytes for x in s}) == 1, [(x.hop, x.vm_memfd_bytes) for x in s]
        first = s[0].vm_rss
        assert max(x.vm_rss for x in s) <= first * 1.25 + 16 * MiB, [(x.hop, x.vm_rss >> 20) for x in s]
    after_first = samples[1:] or samples
    assert len({x.test_fds for x in after_first}) == 1, [(x.hop, x.test_fds) for x in samples]
    growth = samples[-1].test_rss - samples[0].test_rss
    assert growth < 24 * MiB, [(x.hop, x.test_rss >> 20) for x in samples]
    by_mode = {m: sorted({x.vm_rss >> 20 for x in samples if x.mode == m}) for m in MODES}
    return (
        f"{len(samples)} hops; VM fds {sorted({x.vm_fds for x in samples})}; VM RSS MiB by mode "
        f"{ {m: (v[0], v[-1]) for m, v in by_mode.items() if v} }; test fds {samples[-1].test_fds}; "
        f"test RSS growth {growth / MiB:.1f} MiB; guest pages written {samples[-1].written}"
    )


@pytest.mark.timeout(90)
def test_ping_pong_short(tmp_path, capsys):
    samples = soak(10, tmp_path)
    summary = check_flat(samples)
    with capsys.disabled():
        print(f"\nsoak: {summary}")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_ping_pong_200_hops(tmp_path, capsys):
    samples = soak(200, tmp_path)
    summary = check_flat(samples)
    with capsys.disabled():
        print(f"\nsoak: {summary}")
