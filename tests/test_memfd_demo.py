"""memfd_demo: a real memfd, mapped twice, handed to a real child process over SCM_RIGHTS."""

from __future__ import annotations

import os
import socket

import psutil
import pytest

from labkit.teach.memfd_demo import (
    MiB,
    Receiver,
    fd_target,
    frames,
    map_shared,
    maps_lines,
    memfd_create,
    memfd_inode,
    memfd_maps,
    memfds_of,
    send_fd,
)

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def memfd():
    fd = memfd_create("labkit-test-ram", 4 * MiB)
    yield fd
    os.close(fd)


def test_memfd_is_a_sized_anonymous_file(memfd):
    assert os.fstat(memfd).st_size == 4 * MiB
    assert fd_target("self", memfd) == "/memfd:labkit-test-ram (deleted)"
    assert memfd_inode(memfd) == os.fstat(memfd).st_ino
    assert any(f.fd == memfd and f.inode == memfd_inode(memfd) for f in memfds_of(os.getpid()))


def test_two_mappings_share_pages_at_two_addresses(memfd):
    a, b = map_shared(memfd), map_shared(memfd)
    try:
        assert a.addr != b.addr and a.size == b.size == 4 * MiB
        a.write(4096, b"guest page")
        assert b.read(4096, 10) == b"guest page"
        maps = memfd_maps("self", "labkit-test-ram")
        assert sorted(m.start for m in maps) == sorted([a.addr, b.addr])
        assert {m.inode for m in maps} == {memfd_inode(memfd)}
        assert all(m.shared for m in maps)
        lines = maps_lines("self", "labkit-test-ram")
        assert len(lines) == 2 and all("rw-s" in line and "/memfd:labkit-test-ram" in line for line in lines)
        fa, fb = frames("self", a.addr + 4096, 1), frames("self", b.addr + 4096, 1)
        assert fa == fb  # the same physical frame (both None when not root)
    finally:
        a.close()
        b.close()
    assert memfd_maps("self", "labkit-test-ram") == []
    with pytest.raises(ValueError):
        a.read(0, 1)


def test_mapping_bounds_are_checked(memfd):
    m = map_shared(memfd, MiB)
    try:
        with pytest.raises(ValueError):
            m.read(MiB - 1, 2)
        with pytest.raises(ValueError):
            m.write(-1, b"x")
    finally:
        m.close()


def test_send_fd_crosses_a_socket_with_one_byte(memfd):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        assert send_fd(a, memfd) == 1
        data, fds, _, _ = socket.recv_fds(b, 16, 1)
        try:
            assert data == b" " and len(fds) == 1 and fds[0] != memfd
            assert os.fstat(fds[0]).st_ino == memfd_inode(memfd)
        finally:
            for fd in fds:
                os.close(fd)
    finally:
        a.close()
        b.close()


def test_receiver_maps_the_same_memory_at_its_own_address(memfd):
    mine = map_shared(memfd)
    try:
        mine.write(0, b"written by the parent")
        with Receiver() as r:
            assert psutil.Process(r.pid).ppid() == os.getpid()
            assert r.memfds() == []  # a new process holds no memfd until one is sent
            theirs = r.receive(memfd)
            held = r.memfds()
            assert [(f.fd, f.inode) for f in held] == [(theirs, memfd_inode(memfd))]
            addr = r.map(theirs)
            [line] = memfd_maps(r.pid, "labkit-test-ram")
            assert line.start == addr and line.inode == memfd_inode(memfd)
            assert r.read(0, 21) == b"written by the parent"
            r.write(100, b"written by the child")
            assert mine.read(100, 20) == b"written by the child"
            assert frames(r.pid, addr, 1) == frames("self", mine.addr, 1)
            # the mapping alone keeps the memory alive once every fd is closed, here and there
            r.close_fd(theirs)
            mine.close()
            os.close(os.dup(memfd))
            assert r.memfds() == []
            assert r.read(100, 20) == b"written by the child"
            assert r.bytes_sent < 1024  # requests only: 4 MiB of memory never crossed the socket
            with pytest.raises(OSError, match="outside"):
                r.read(4 * MiB, 1)
            pid = r.pid
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        mine.close()


def test_receiver_ends_when_closed_twice_and_rejects_use_before_map():
    r = Receiver()
    try:
        with pytest.raises(OSError, match="map the fd first"):
            r.read(0, 1)
    finally:
        r.close()
        r.close()
    assert r.proc.poll() is not None
