"""labkit.host.procfs: /proc/PID/maps, /proc/PID/fd and /proc/PID/pagemap on real memfds and mmaps."""

from __future__ import annotations

import mmap
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from labkit.host.procfs import (
    PAGE_SIZE,
    Mapping,
    memfd_fds,
    page_frames,
    ram_block_mappings,
    read_fds,
    read_maps,
    sample_frames,
)

IS_ROOT = os.geteuid() == 0


@pytest.fixture
def memfd_twice():
    """A 16-page memfd mapped twice, shared, in this process."""
    fd = os.memfd_create("lk-inspect-ram")
    os.ftruncate(fd, 16 * PAGE_SIZE)
    a = mmap.mmap(fd, 16 * PAGE_SIZE)
    b = mmap.mmap(fd, 16 * PAGE_SIZE)
    yield fd, a, b
    a.close()
    b.close()
    os.close(fd)


def mine(name: str) -> list[Mapping]:
    return [m for m in read_maps(os.getpid()) if m.path == f"/memfd:{name} (deleted)"]


def test_read_maps_parses_every_line():
    # other threads of this process (the QMP loop, a previous test's leftovers) may map memory between the
    # two reads: compare counts until two consecutive reads agree
    for _ in range(20):
        maps = read_maps("self")
        with open("/proc/self/maps") as f:
            lines = sum(1 for _ in f)
        if len(maps) == lines:
            break
    assert len(maps) == lines
    assert all(m.start < m.end and len(m.perms) == 4 for m in maps)
    assert any(m.path == "[stack]" for m in maps)
    anon = [m for m in maps if m.path == ""]
    assert anon and all(m.inode == 0 for m in anon)


def test_same_memfd_mapped_twice(memfd_twice):
    fd, a, b = memfd_twice
    maps = mine("lk-inspect-ram")
    assert len(maps) == 2
    m1, m2 = maps
    assert m1.inode == m2.inode == os.fstat(fd).st_ino
    assert m1.start != m2.start
    assert m1.size == m2.size == 16 * PAGE_SIZE
    assert m1.shared and m2.shared and m1.perms.startswith("rw")
    assert m1.offset == m2.offset == 0
    a[0:5] = b"hello"
    assert b[0:5] == b"hello"  # one page, two addresses
    found = ram_block_mappings(os.getpid(), ["lk-inspect-ram", "not-there"])
    assert list(found) == ["lk-inspect-ram"]
    assert found["lk-inspect-ram"].inode == m1.inode


def test_ram_block_mappings_file_path(tmp_path):
    path = tmp_path / "ram.img"
    path.write_bytes(bytes(4 * PAGE_SIZE))
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 4 * PAGE_SIZE) as m:
        m[0] = 1
        found = ram_block_mappings("self", [str(path)])
        assert found[str(path)].inode == os.stat(path).st_ino


@pytest.mark.skipif(not IS_ROOT, reason="PFNs read as 0 without CAP_SYS_ADMIN")
def test_page_frames_same_page_two_mappings(memfd_twice):
    _, a, b = memfd_twice
    m1, m2 = sorted(mine("lk-inspect-ram"), key=lambda m: m.start)
    for i in (0, 3, 15):
        a[i * PAGE_SIZE] = 7  # allocate the page through one mapping ...
        _ = b[i * PAGE_SIZE]  # ... and fault it into the other one
    pfn1 = page_frames(os.getpid(), [m1.start + i * PAGE_SIZE for i in (0, 3, 15)])
    pfn2 = page_frames(os.getpid(), [m2.start + i * PAGE_SIZE for i in (0, 3, 15)])
    assert all(p is not None for p in pfn1)
    assert pfn1 == pfn2
    assert len(set(pfn1)) == 3
    # a page never touched in this process is not present
    assert page_frames(os.getpid(), [m1.start + 9 * PAGE_SIZE]) == [None]


@pytest.mark.skipif(not IS_ROOT, reason="PFNs read as 0 without CAP_SYS_ADMIN")
@pytest.mark.timeout(60)
def test_page_frames_same_page_two_processes(memfd_twice):
    """What cpr-transfer does: another process maps the memfd and sees the very same frames."""
    fd, a, b = memfd_twice
    a[0 : 4 * PAGE_SIZE] = b"\x01" * (4 * PAGE_SIZE)
    _ = [b[i * PAGE_SIZE] for i in range(4)]  # present in both of our mappings
    child_code = textwrap.dedent(
        """
        import mmap, sys
        fd = int(sys.argv[1])
        m = mmap.mmap(fd, 16 * mmap.PAGESIZE)
        for i in range(4):
            m[i * mmap.PAGESIZE]
        print("ready", flush=True)
        sys.stdin.readline()
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", child_code, str(fd)],
        pass_fds=[fd],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        theirs = ram_block_mappings(child.pid, ["lk-inspect-ram"])["lk-inspect-ram"]
        ours = sorted(mine("lk-inspect-ram"), key=lambda m: m.start)[0]
        assert theirs.inode == ours.inode
        assert sample_frames(child.pid, theirs, 4)[:1] != [(0, None)]
        pfn_theirs = page_frames(child.pid, [theirs.start + i * PAGE_SIZE for i in range(4)])
        pfn_ours = page_frames(os.getpid(), [ours.start + i * PAGE_SIZE for i in range(4)])
        assert pfn_theirs == pfn_ours and None not in pfn_ours
        assert ours.inode in [f.inode for f in memfd_fds(child.pid)]
    finally:
        child.communicate("\n", timeout=30)


def test_sample_frames_spacing(memfd_twice):
    m = min(mine("lk-inspect-ram"), key=lambda m: m.start)
    samples = sample_frames(os.getpid(), m, 4)
    assert [i for i, _ in samples] == [0, 5, 10, 15]
    assert [i for i, _ in sample_frames(os.getpid(), m, 100)] == list(range(16))
    assert [i for i, _ in sample_frames(os.getpid(), m, 1)] == [0]


def test_read_fds_kinds(tmp_path):
    mfd = os.memfd_create("lk-fd-kinds")
    os.ftruncate(mfd, 3 * PAGE_SIZE)
    r, w = os.pipe()
    s1, s2 = socket.socketpair()
    path = tmp_path / "plain"
    path.write_bytes(b"12345")
    ffd = os.open(path, os.O_RDONLY)
    try:
        by_fd = {i.fd: i for i in read_fds(os.getpid())}
        assert by_fd[mfd].kind == "memfd" and by_fd[mfd].size == 3 * PAGE_SIZE
        assert by_fd[mfd].memfd_name == "lk-fd-kinds"
        assert by_fd[mfd].inode == os.fstat(mfd).st_ino
        assert by_fd[r].kind == by_fd[w].kind == "pipe" and by_fd[r].size is None
        assert by_fd[s1.fileno()].kind == "socket"
        assert by_fd[ffd].kind == "file" and by_fd[ffd].size == 5 and by_fd[ffd].target == str(path)
        assert [i.fd for i in memfd_fds("self")].count(mfd) == 1
    finally:
        for fd in (mfd, r, w, ffd):
            os.close(fd)
        s1.close()
        s2.close()
