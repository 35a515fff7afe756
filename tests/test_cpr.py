"""CPR state on the cpr channel: QEMU 10's bytes, real fds over real sockets, and every refusal."""

from __future__ import annotations

import array
import json
import mmap
import os
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from labkit.vm.migration.channels import MigrationAddress, MigrationChannel, parse_channel
from labkit.vm.migration.cpr import (
    QEMU_CPR_FILE_MAGIC,
    QEMU_CPR_FILE_VERSION,
    CprError,
    CprFd,
    cpr_fd_check,
    cpr_state_load,
    cpr_state_save,
)
from labkit.vm.migration.cpr_inspect import cpr_inspect, cpr_inspect_listen, format_cpr_inspect
from labkit.vm.migration.cpr_transfer import cpr_transfer_input, cpr_transfer_output

REPO = Path(__file__).resolve().parents[1]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def no_fd_leak():
    """Every test that receives fds must end with exactly the fds it started with."""
    before = open_fds()
    yield
    assert open_fds() == before, "file descriptors leaked"


def memfd(name: str, size: int, fill: bytes = b"") -> int:
    fd = os.memfd_create(name)
    os.ftruncate(fd, size)
    if fill:
        os.pwrite(fd, fill, 0)
    return fd


def entry_bytes(name: str, ident: int) -> bytes:
    """One QLIST element up to (not including) its dummy byte, built by hand from the format."""
    raw = name.encode() + b"\0"
    return b"\x01" + struct.pack(">I", len(raw)) + raw + struct.pack(">i", ident)


HEADER = bytes.fromhex("51435052") + bytes.fromhex("00000001")


def read_raw(sock: socket.socket) -> tuple[bytes, list[int], list[int]]:
    """Read a whole stream with recvmsg: data, the offsets of bytes that carried fds, and the fds."""
    data = bytearray()
    offsets, fds = [], []
    while True:
        chunk, anc, flags, _ = sock.recvmsg(4096, socket.CMSG_SPACE(4 * 8))
        assert not flags & socket.MSG_CTRUNC
        for level, kind, cdata in anc:
            assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
            got = array.array("i")
            got.frombytes(cdata)
            fds.extend(got)
            offsets.append(len(data) + len(chunk) - 1)  # the fd rides on the chunk's last byte
        if not chunk:
            return bytes(data), offsets, fds
        data += chunk


def send_segments(sock: socket.socket, segments: list[tuple[bytes, list[int]]]) -> None:
    """Send ``(bytes, fds)`` pieces; fds ride on the piece's bytes as SCM_RIGHTS."""
    for data, fds in segments:
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            assert sock.sendmsg([data], anc) == len(data)
        elif data:
            sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


def load_segments(segments, **kwargs) -> list[CprFd]:
    a, b = socket.socketpair()
    with a, b:
        send_segments(a, segments)
        return cpr_state_load(b, **kwargs)


# ------------------------------------------------------------------------------------------
# The bytes on the wire


@pytest.mark.timeout(30)
def test_save_is_qemu_wire_format_byte_for_byte(no_fd_leak):
    ram, bios = memfd("pc.ram", 1 << 20), memfd("pc.bios", 4096)
    # QEMU registers pc.ram first, then pc.bios; QLIST_INSERT_HEAD puts pc.bios first on the wire.
    entries = [CprFd("pc.bios", 0, bios), CprFd("pc.ram", 0, ram)]
    a, b = socket.socketpair()
    with a, b:
        sent = cpr_state_save(a, entries)
        a.shutdown(socket.SHUT_WR)
        data, offsets, fds = read_raw(b)
    try:
        e1, e2 = entry_bytes("pc.bios", 0), entry_bytes("pc.ram", 0)
        expected = HEADER + e1 + b" " + e2 + b" " + b"\x00"
        assert data == expected
        assert data[:8] == b"QCPR\x00\x00\x00\x01"
        assert sent == len(expected) == 8 + (1 + 4 + 8 + 4 + 1) + (1 + 4 + 7 + 4 + 1) + 1
        assert offsets == [len(HEADER + e1), len(HEADER + e1 + b" " + e2)]
        assert [data[o : o + 1] for o in offsets] == [b" ", b" "]
        assert [os.fstat(f).st_ino for f in fds] == [os.fstat(bios).st_ino, os.fstat(ram).st_ino]
    finally:
        for fd in (*fds, ram, bios):
            os.close(fd)


@pytest.mark.timeout(30)
def test_negative_id_and_empty_list(no_fd_leak):
    a, b = socket.socketpair()
    with a, b:
        assert cpr_state_save(a, []) == 9
        a.shutdown(socket.SHUT_WR)
        assert read_raw(b) == (HEADER + b"\x00", [], [])
    fd = memfd("x", 4096)
    a, b = socket.socketpair()
    with a, b:
        cpr_state_save(a, [CprFd("x", -2, fd)])
        a.shutdown(socket.SHUT_WR)
        data, _, fds = read_raw(b)
    os.close(fd)
    os.close(fds[0])
    assert data == HEADER + b"\x01\x00\x00\x00\x02x\x00\xff\xff\xff\xfe \x00"


@pytest.mark.timeout(30)
def test_round_trip_in_process(no_fd_leak):
    fds = [memfd(f"blk{i}", 4096 * (i + 1), fill=f"block {i}".encode()) for i in range(3)]
    entries = [CprFd(f"blk{i}", i, fd) for i, fd in enumerate(fds)]
    a, b = socket.socketpair()
    with a, b:
        cpr_state_save(a, entries)
        a.shutdown(socket.SHUT_WR)
        got = cpr_state_load(b)
    try:
        assert [(g.name, g.id) for g in got] == [(e.name, e.id) for e in entries]
        for g, e in zip(got, entries, strict=True):
            assert g.fd != e.fd
            assert os.fstat(g.fd).st_ino == os.fstat(e.fd).st_ino
            assert cpr_fd_check(g.fd, name=g.name)["size"] == 4096 * (e.id + 1)
            assert os.pread(g.fd, 7, 0) == f"block {e.id}".encode()
            assert not os.get_inheritable(g.fd)
    finally:
        for fd in fds + [g.fd for g in got]:
            os.close(fd)


SOURCE_CHILD = textwrap.dedent(
    """
    import json, mmap, os, socket, sys
    from labkit.vm.migration.channels import parse_uri
    from labkit.vm.migration.cpr import CprFd, cpr_state_save
    from labkit.vm.migration.cpr_transfer import cpr_transfer_output

    sizes = json.loads(sys.argv[2])
    fds, maps = [], []
    for i, size in enumerate(sizes):
        fd = os.memfd_create(f"ram{i}")
        os.ftruncate(fd, size)
        m = mmap.mmap(fd, size)
        for off in range(0, size, 4096):
            m[off : off + 8] = (i * 1000003 + off).to_bytes(8, "little")
        fds.append(fd)
        maps.append(m)
    # Registration order ram0, ram1, ... ; QEMU's list (and so the wire) is newest first.
    entries = [CprFd(f"ram{i}", 0, fd) for i, fd in reversed(list(enumerate(fds)))]
    sock = cpr_transfer_output(parse_uri("unix:" + sys.argv[1], "cpr"))
    cpr_state_save(sock, entries)
    sock.shutdown(socket.SHUT_WR)
    assert sock.recv(1) == b""  # the destination closed: the HUP QEMU waits for
    print(json.dumps({"inodes": {f"ram{i}": os.fstat(fd).st_ino for i, fd in enumerate(fds)},
                      "seen": bytes(maps[0][:16]).hex()}))
    """
)


def _run_source(path: str, sizes: list[int]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-c", SOURCE_CHILD, path, json.dumps(sizes)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )


def _check_destination(conn: socket.socket, sizes: list[int]) -> tuple[dict[str, int], list[CprFd]]:
    got = cpr_state_load(conn)
    assert [g.name for g in got] == [f"ram{i}" for i in reversed(range(len(sizes)))]
    inodes = {}
    for g in got:
        i = int(g.name[3:])
        assert cpr_fd_check(g.fd, name=g.name)["size"] == sizes[i]
        inodes[g.name] = os.fstat(g.fd).st_ino
        with mmap.mmap(g.fd, sizes[i]) as m:  # a new virtual address, the same pages
            for off in range(0, sizes[i], 4096):
                assert int.from_bytes(m[off : off + 8], "little") == i * 1000003 + off
            if i == 0:
                m[0:16] = b"from destination"
    return inodes, got


@pytest.mark.timeout(60)
def test_round_trip_between_processes_unix(no_fd_leak, tmp_path):
    sizes = [1 << 20, 64 * 1024, 4096]
    path = str(tmp_path / "cpr.sock")
    box: dict = {}

    def destination():
        try:
            box["conn"] = cpr_transfer_input(
                parse_channel(
                    {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": path}}
                ),
                timeout=30,
            )
        except BaseException as err:  # pragma: no cover - reported below
            box["err"] = err

    t = threading.Thread(target=destination)
    t.start()
    deadline = time.monotonic() + 20
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    child = _run_source(path, sizes)
    got: list[CprFd] = []
    try:
        t.join(30)
        assert "err" not in box, box.get("err")
        conn = box["conn"]
        assert not os.path.exists(path)  # the listener is gone once the one connection is accepted
        with conn:
            inodes, got = _check_destination(conn, sizes)
        out, err = child.communicate(timeout=30)  # closing conn let the source finish
        assert child.returncode == 0, err
        report = json.loads(out)
        assert report["inodes"] == inodes
        assert bytes.fromhex(report["seen"]) == b"from destination"
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
        for g in got:
            os.close(g.fd)


@pytest.mark.timeout(60)
def test_round_trip_between_processes_preopened_fd(no_fd_leak, tmp_path):
    """QEMU's qtest pre-creates the listening socket and passes ``addr.type=fd,addr.str=N``."""
    sizes = [8192, 4096]
    path = str(tmp_path / "cpr.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    fdno = listener.detach()
    child = _run_source(path, sizes)
    got: list[CprFd] = []
    try:
        conn = cpr_transfer_input(
            MigrationChannel("cpr", MigrationAddress("socket", "fd", str=str(fdno))), 30
        )
        with conn:
            inodes, got = _check_destination(conn, sizes)
        out, err = child.communicate(timeout=30)
        assert child.returncode == 0, err
        assert json.loads(out)["inodes"] == inodes
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
        for g in got:
            os.close(g.fd)
    with pytest.raises(OSError):
        os.fstat(fdno)  # the listener was consumed and closed, like QEMU's
    assert not os.path.exists(path)


# ------------------------------------------------------------------------------------------
# Refusals: clear message, no fd left behind


def stream_pieces(fds: list[int]) -> list[tuple[bytes, list[int]]]:
    pieces: list[tuple[bytes, list[int]]] = [(HEADER, [])]
    for i, fd in enumerate(fds):
        pieces += [(entry_bytes(f"ram{i}", 0), []), (b" ", [fd])]
    pieces.append((b"\x00", []))
    return pieces


@pytest.mark.timeout(30)
def test_bad_magic_and_version(no_fd_leak):
    with pytest.raises(CprError, match=r"^Not a migration stream \(bad magic 5145564d\)$"):
        load_segments([(bytes.fromhex("5145564d00000003"), [])])
    fd = memfd("x", 4096)
    with pytest.raises(CprError, match=r"^Unsupported migration stream version 2$"):
        load_segments([(HEADER[:4] + b"\x00\x00\x00\x02" + entry_bytes("x", 0), []), (b" ", [fd])])
    os.close(fd)


@pytest.mark.timeout(60)
def test_truncated_at_every_offset(no_fd_leak):
    fds = [memfd(f"ram{i}", 4096) for i in range(2)]
    pieces = stream_pieces(fds)
    full = b"".join(p for p, _ in pieces)
    for cut in range(len(full)):
        cut_pieces, pos = [], 0
        for data, pfds in pieces:
            if pos >= cut:
                break
            cut_pieces.append((data[: cut - pos], pfds if pos + len(data) <= cut else []))
            pos += len(data)
        with pytest.raises(CprError, match="truncated") as err:
            load_segments(cut_pieces)
        assert f"stream ended at offset {cut}" in str(err.value)
    got = load_segments(pieces)
    assert [g.name for g in got] == ["ram0", "ram1"]
    for fd in fds + [g.fd for g in got]:
        os.close(fd)


@pytest.mark.timeout(30)
def test_too_many_fds(no_fd_leak):
    fds = [memfd(f"ram{i}", 4096) for i in range(3)]
    with pytest.raises(CprError, match="too many file descriptors"):
        load_segments(stream_pieces(fds), max_fds=2)
    # A hostile sender packs several fds onto one byte: refused, and the extra ones are not leaked.
    with pytest.raises(CprError, match="too many file descriptors|MSG_CTRUNC"):
        load_segments([(HEADER + entry_bytes("a", 0), []), (b" ", fds)], max_fds=1)
    for fd in fds:
        os.close(fd)


@pytest.mark.timeout(30)
def test_name_checks(no_fd_leak):
    fd = memfd("x", 4096)
    long_name = "n" * 300
    with pytest.raises(CprError, match=r"fds\[0\] name too long \(301 bytes at offset 9, limit 256\)"):
        load_segments([(HEADER + entry_bytes(long_name, 0), []), (b" ", [fd])])
    with pytest.raises(CprError, match="namelen 0"):
        load_segments([(HEADER + b"\x01\x00\x00\x00\x00", [])])
    with pytest.raises(CprError, match="not one NUL-terminated string"):
        load_segments([(HEADER + b"\x01\x00\x00\x00\x02ab" + bytes(4), []), (b" ", [fd])])
    os.close(fd)


@pytest.mark.timeout(30)
def test_dummy_byte_without_fd_and_wrong_dummy_byte(no_fd_leak):
    fd = memfd("ram0", 4096)
    with pytest.raises(CprError, match=r"no file descriptor came with the dummy byte of fds\[1\]"):
        load_segments(
            [(HEADER + entry_bytes("ram0", 0), []), (b" ", [fd]), (entry_bytes("ram1", 0) + b" \x00", [])]
        )
    with pytest.raises(CprError, match=r"unexpected byte 0x41 at offset 22"):
        load_segments([(HEADER + entry_bytes("ram0", 0), []), (b"A", [fd]), (b"\x00", [])])
    os.close(fd)


@pytest.mark.timeout(30)
def test_fd_queue_like_qemu(no_fd_leak):
    """QEMU queues fds as they arrive and pops one per dummy byte, so an early fd still counts."""
    fd = memfd("ram0", 4096)
    got = load_segments([(HEADER, []), (entry_bytes("ram0", 0), [fd]), (b" \x00", [])])
    assert os.fstat(got[0].fd).st_ino == os.fstat(fd).st_ino
    # An fd no dummy byte claims is closed, as QEMU's qemu_fclose would.
    extra = load_segments([(HEADER, [fd]), (b"\x00", [])])
    assert extra == []
    os.close(got[0].fd)
    os.close(fd)


@pytest.mark.timeout(30)
def test_max_bytes(no_fd_leak):
    fd = memfd("x", 4096)
    with pytest.raises(CprError, match="larger than 16 bytes"):
        load_segments([(HEADER + entry_bytes("abcdefgh", 0), []), (b" ", [fd])], max_bytes=16)
    os.close(fd)


@pytest.mark.timeout(120)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tail=st.binary(max_size=64), nfds=st.integers(0, 3))
def test_garbage_never_leaks(tail, nfds):
    before = open_fds()
    fds = [memfd("g", 4096) for _ in range(nfds)]
    pieces = [(HEADER + tail, fds)] if tail else [(HEADER, []), (b"\x00", fds)]
    try:
        got = load_segments(pieces)
    except CprError:
        got = []
    for fd in fds + [g.fd for g in got]:
        os.close(fd)
    assert open_fds() == before


# ------------------------------------------------------------------------------------------
# cpr_fd_check


@pytest.mark.timeout(30)
def test_fd_check(no_fd_leak, tmp_path):
    """Only what an fd *is* is judged here (a memfd, or a file where allowed), never its size: QEMU takes an
    fd larger than the block, and grows or refuses a smaller one depending on the block (memory.py)."""
    fd = memfd("pc.ram", 8192)
    info = cpr_fd_check(fd, name="pc.ram")
    assert (info["kind"], info["size"], info["memfd_name"]) == ("memfd", 8192, "pc.ram")
    assert cpr_fd_check(fd)["inode"] == os.fstat(fd).st_ino
    r, w = os.pipe()
    with pytest.raises(CprError, match=r"is a pipe \(pipe:\[\d+\]\), expected a memfd"):
        cpr_fd_check(r)
    a, b = socket.socketpair()
    with pytest.raises(CprError, match=r"is a socket \(socket:\[\d+\]\), expected a memfd"):
        cpr_fd_check(a.fileno())
    path = tmp_path / "ram.img"
    path.write_bytes(bytes(8192))
    ffd = os.open(path, os.O_RDWR)
    with pytest.raises(
        CprError, match=r"^cpr fd \d+ for 'x' is a regular file \(.*ram.img\), expected a memfd$"
    ):
        cpr_fd_check(ffd, name="x")
    assert cpr_fd_check(ffd, allow_file=True)["size"] == 8192
    with pytest.raises(CprError, match="is a character device"):
        dev = os.open("/dev/null", os.O_RDONLY)
        try:
            cpr_fd_check(dev, allow_file=True)
        finally:
            os.close(dev)
    for x in (fd, r, w, ffd):
        os.close(x)
    a.close()
    b.close()
    with pytest.raises(CprError, match="is not an open file descriptor"):
        cpr_fd_check(fd)


# ------------------------------------------------------------------------------------------
# The cpr channel


def test_output_refuses_non_unix():
    tcp = MigrationChannel("cpr", MigrationAddress("socket", "inet", host="127.0.0.1", port="4444"))
    for ch in (tcp, MigrationChannel("cpr", MigrationAddress("file", filename="/tmp/x"))):
        with pytest.raises(ValueError, match=r"^bad cpr channel address; must be unix$"):
            cpr_transfer_output(ch)


def test_output_connect_failure_text(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CprError, match=r"^Failed to connect to 'cpr.sock': No such file or directory$"):
        cpr_transfer_output(MigrationAddress("socket", "unix", path="cpr.sock"))


def test_input_refuses_non_unix():
    for addr in (
        MigrationAddress("socket", "inet", host="127.0.0.1", port="0"),
        MigrationAddress("socket", "vsock", cid="3", port="1"),
        MigrationAddress("file", filename="/tmp/x"),
    ):
        with pytest.raises(ValueError, match=r"^bad cpr channel socket type; must be unix$"):
            cpr_transfer_input(addr, timeout=1)


@pytest.mark.timeout(30)
def test_input_timeout_cleans_up(no_fd_leak, tmp_path):
    path = tmp_path / "cpr.sock"
    with pytest.raises(CprError, match="timed out"):
        cpr_transfer_input(MigrationAddress("socket", "unix", path=str(path)), timeout=0.2)
    assert not path.exists()


@pytest.mark.timeout(30)
def test_save_to_vanished_destination(no_fd_leak):
    fd = memfd("x", 4096)
    a, b = socket.socketpair()
    b.close()
    with a, pytest.raises(CprError, match=r"^vmstate_save_state error -1$"):
        cpr_state_save(a, [CprFd("x", 0, fd)])
    os.close(fd)


# ------------------------------------------------------------------------------------------
# cpr-inspect


def test_inspect_decodes_fields():
    data = HEADER + entry_bytes("pc.ram", 0) + b" " + b"\x00"
    report = cpr_inspect(data, nfds=1)
    assert report["complete"] and report["error"] is None and report["fds_match"]
    assert [(f["offset"], f["size"], f["field"]) for f in report["fields"]] == [
        (0, 4, "magic"),
        (4, 4, "version"),
        (8, 1, "marker"),
        (9, 4, "fds[0].namelen"),
        (13, 7, "fds[0].name"),
        (20, 4, "fds[0].id"),
        (24, 1, "fds[0].fd"),
        (25, 1, "marker"),
    ]
    assert report["fds"] == [{"offset": 8, "name": "pc.ram", "id": 0, "fd_offset": 24}]
    assert report["fields"][0]["value"] == QEMU_CPR_FILE_MAGIC
    assert report["fields"][1]["value"] == QEMU_CPR_FILE_VERSION
    text = format_cpr_inspect(report)
    assert "'QCPR'" in text and "' ' + SCM_RIGHTS" in text and "end of the fd list" in text
    bad = cpr_inspect(data[:15])
    assert not bad["complete"] and "truncated" in bad["error"]


@pytest.mark.timeout(30)
def test_inspect_listen_end_to_end(no_fd_leak):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "cpr.sock")
        fd = memfd("pc.ram", 1 << 20)
        errors = []

        def source():
            try:
                deadline = time.monotonic() + 10
                while not os.path.exists(path) and time.monotonic() < deadline:
                    time.sleep(0.005)
                with cpr_transfer_output(MigrationAddress("socket", "unix", path=path)) as s:
                    cpr_state_save(s, [CprFd("pc.ram", 0, fd)])
                    s.shutdown(socket.SHUT_WR)
                    s.recv(1)
            except BaseException as err:  # pragma: no cover
                errors.append(err)

        t = threading.Thread(target=source)
        t.start()
        report = cpr_inspect_listen(path, timeout=10, file=None)
        t.join(10)
        assert not errors
        info = report["fd_info"][0]
        assert info["kind"] == "memfd" and info["memfd_name"] == "pc.ram"
        assert info["inode"] == os.fstat(fd).st_ino and info["size"] == 1 << 20
        text = format_cpr_inspect(report, report["fd_info"])
        assert "fd[0] 'pc.ram' id 0: memfd /memfd:pc.ram (deleted)" in text and "1 MiB" in text
        os.close(fd)


@pytest.mark.timeout(30)
def test_cpr_inspect_cli_times_out_cleanly(no_fd_leak, tmp_path, capsys):
    from labkit.vm.migration.cpr_inspect import main

    path = tmp_path / "cpr.sock"
    assert main([str(path), "--timeout", "0.2"]) == 1
    assert "timed out" in capsys.readouterr().err
    assert not path.exists()


# ------------------------------------------------------------------------------------------
# RAM blocks as the CPR state carries them (labkit.vm.memory), without a real QEMU: tests/test_cpr_interop.py
# holds the same blocks against qemu-system-x86_64 itself.

README_VM = ["-m", "64M", "-machine", "q35,aux-ram-share=on,memory-backend=ram0"]
README_VM += ["-object", "memory-backend-memfd,id=ram0,size=64M,share=on"]


def _ram(extra: list[str] = (), cpr_fds: dict[str, int] | None = None):
    from labkit.vm.memory import ram_blocks_create
    from labkit.vm.options import parse_args

    return ram_blocks_create(parse_args([*README_VM, *extra]), cpr_fds)


def _memfd_size(fd: int) -> int:
    return os.fstat(fd).st_size


@pytest.mark.timeout(30)
@pytest.mark.parametrize("extra", [[], ["-nodefaults"]], ids=["defaults", "nodefaults"])
def test_blocks_ram_list_order_and_memfd_sizes(no_fd_leak, extra):
    """ram_list is sorted by maximum length (ties in creation order); every memfd is as large as its block's
    maximum length, and the whole of it is mapped; ram_addr_t offsets are 256 KiB aligned and disjoint."""
    from labkit.vm.memory import IMPLICIT_BLOCKS, RAM_BLOCK_ALIGN

    ram = _ram(extra)
    try:
        blocks = list(ram)
        maxima = [b.max_length for b in blocks]
        assert maxima == sorted(maxima, reverse=True)
        created = [b.idstr for b in ram.created]
        for a, b in zip(blocks, blocks[1:], strict=False):
            if a.max_length == b.max_length:
                assert created.index(a.idstr) < created.index(b.idstr)
        wanted = [imp for imp in IMPLICIT_BLOCKS if not (extra and imp.default_device)]
        assert created == ["ram0", *[imp.idstr for imp in wanted]]
        assert ("0000:00:01.0/vga.vram" in created) == (not extra)
        spans = sorted((b.offset, b.offset + b.max_length) for b in blocks)
        assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:], strict=False))
        assert all(b.offset % RAM_BLOCK_ALIGN == 0 for b in blocks)
        for imp in wanted:
            b = ram.find(imp.idstr)
            assert (b.size, b.max_length, b.mr_name, b.readonly) == (
                imp.used,
                imp.max,
                imp.name,
                imp.readonly,
            )
        for b in blocks:
            assert _memfd_size(b.fd) == b.max_length == len(b.mm)
            assert len(b.array()) == b.size and len(b.view()) == b.size
        # CPR fds in registration (creation) order; cpr_state_save sends them newest first
        assert [n for n, _ in ram.cpr_fds()] == created
    finally:
        ram.close()


@pytest.mark.timeout(30)
def test_blocker_names_the_memory_region_not_the_pci_path(no_fd_leak):
    ram = _ram(["-machine", "aux-ram-share=off"])
    try:
        reasons = ram.cpr_blockers()
        assert any(r.startswith("Memory region vga.vram is not compatible with CPR.") for r in reasons)
        assert not any("0000:00:" in r for r in reasons)
        assert reasons[-1].startswith("Memory region /rom@etc/acpi/rsdp ")
    finally:
        ram.close()


def _cpr_fds_for(sizes: dict[str, int]) -> dict[str, int]:
    out = {}
    for name, size in sizes.items():
        out[name] = memfd(name, size)
    return out


@pytest.mark.timeout(30)
def test_adopted_fd_larger_than_the_block_is_taken(no_fd_leak):
    """An fd larger than its block is adopted as it is; only the block's maximum length is mapped."""
    fds = _cpr_fds_for({"ram0": 128 << 20, "/rom@etc/acpi/tables": 4 << 20})
    inodes = {n: os.fstat(fd).st_ino for n, fd in fds.items()}
    ram = _ram(["-nodefaults"], fds)
    try:
        for name in fds:
            b = ram.find(name)
            assert b.reused and os.fstat(b.fd).st_ino == inodes[name]
            assert len(b.mm) == b.max_length < _memfd_size(b.fd)
    finally:
        ram.close()


@pytest.mark.timeout(30)
def test_adopted_fd_too_small_grown_or_refused_as_qemu_does(no_fd_leak):
    """An implicit block grows a short memfd to its maximum length (and so the source's, the same inode);
    a memory-backend-memfd grows an empty one but refuses a short one, with qemu_ram_alloc_from_fd's text."""
    from labkit.vm.memory import RAMBlockError

    fds = _cpr_fds_for({"/rom@etc/acpi/tables": 128 << 10, "ram0": 0})
    keep = {n: os.dup(fd) for n, fd in fds.items()}  # the source's own fds, to see what the destination did
    try:
        ram = _ram(["-nodefaults"], fds)
        try:
            assert _memfd_size(keep["/rom@etc/acpi/tables"]) == 2 << 20
            assert _memfd_size(keep["ram0"]) == 64 << 20
            assert ram.find("/rom@etc/acpi/tables").reused and ram.find("ram0").reused
        finally:
            ram.close()
        short = {"ram0": memfd("ram0", 32 << 20)}
        with pytest.raises(RAMBlockError) as err:
            _ram(["-nodefaults"], short)
        assert str(err.value) == (
            "ram0 backing store size 0x2000000 is too small for 'size' option 0x4000000 plus 'offset' option 0x0"
        )
        assert err.value.idstr == "ram0"  # the block the caller must fix
    finally:
        for fd in keep.values():
            os.close(fd)
