"""Hostile input to a real destination VM process: crafted CPR state on its cpr socket, crafted main streams on
its main socket, and a real migration's stream cut short.

Every refusal must come from the `labkit-vm` process itself, the way QEMU refuses: one line on its output and
exit status 1, nothing mapped that was not checked first, and the source of a real migration recoverable.
"""

from __future__ import annotations

import array
import contextlib
import functools
import io
import os
import socket
import struct
import time
from dataclasses import replace

import pytest
from faults import StreamRelay, fd_census, unix_socket_listening
from helpers import wait_for

from labkit.host.hardware import VMConfig
from labkit.host.machine import Machine
from labkit.host.runners import spawn
from labkit.qemu_syntax import GuestConfig, MiB
from labkit.vm.migration.stream import (
    QEMUFileOut,
    qemu_save_device_state,
    qemu_savevm_state_end,
    qemu_savevm_state_header,
    ram_save_iterate_end,
    ram_save_pages,
    ram_save_setup,
)
from labkit.vm.migration.vmstate import VMStateDescription, VMStateField

pytestmark = pytest.mark.timeout(45)

RAM = 32 * MiB
CONFIG = VMConfig(name="dst", ram=RAM)
MAGIC = b"QCPR"


def refused(m: Machine) -> str:
    """The process exited 1 after printing one line, or labkit's detail and then QEMU 10.0.2's own last
    line for the same input (as QEMU prints error_report lines before its fatal one); returns them."""
    rc = m.wait(20)
    lines = [ln for ln in m.log().splitlines() if ln.strip()]
    assert rc == 1, (rc, lines)
    assert len(lines) in (1, 2) and all(ln.startswith("labkit-vm: ") for ln in lines), lines
    return "\n".join(lines)


# -- CPR state --------------------------------------------------------------------------------------------
def entry(name: bytes, ident: int = 0, namelen: int | None = None) -> bytes:
    """One CprFd element up to (not including) its dummy byte."""
    n = len(name) if namelen is None else namelen
    return b"\x01" + struct.pack(">I", n) + name + struct.pack(">i", ident)


def header(version: int = 1) -> bytes:
    return MAGIC + struct.pack(">I", version)


@functools.cache
def reference_blocks() -> tuple[tuple[str, int], ...]:
    """(name, memfd size) of every RAM block a VM of CONFIG has, asked of a real one (once)."""
    with spawn(CONFIG) as m:
        return tuple((b["name"], b["max-size"]) for b in m.cmd("x-labkit-ram-blocks"))


def block_fds() -> list[tuple[str, int]]:
    """The memfds a source of CONFIG sends: every RAM block, newest first, at its size."""
    out = []
    for name, size in reversed(reference_blocks()):
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        out.append((name, fd))
    return out


@pytest.fixture
def cpr_dest(tmp_path):
    """A real destination started with a cpr -incoming; yields (machine, connected cpr socket)."""
    cpr = str(tmp_path / "cpr.sock")
    cfg = replace(CONFIG).with_incoming(
        f"unix:{tmp_path}/main.sock",
        {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": cpr}},
    )
    m = spawn(cfg, connect=False)
    sock = socket.socket(socket.AF_UNIX)
    try:
        # bind(), chmod(), listen(): the file exists a moment before it is 0600 and listening (reported)
        wait_for(lambda: unix_socket_listening(cpr), "the cpr socket")
        sock.connect(cpr)
        yield m, sock
    finally:
        sock.close()
        m.kill()


def send(sock: socket.socket, data: bytes, fds: list[int] = ()) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], anc)


def send_state(sock: socket.socket, items: list[tuple[bytes, int | None]], tail: bytes = b"\x00") -> None:
    """MAGIC, VERSION, then each (entry bytes, fd or None): the fd rides on the dummy byte."""
    send(sock, header())
    for raw, fd in items:
        send(sock, raw)
        send(sock, b" ", [fd] if fd is not None else [])
    if tail:
        send(sock, tail)
    sock.shutdown(socket.SHUT_WR)


# the bytes, what labkit's message says, and the last line QEMU 10.0.2 printed for the same bytes here
BYTES_CASES = {
    "bad-magic": (b"XXXX\x00\x00\x00\x01\x00", "Not a migration stream (bad magic 58585858)"),
    "bad-version": (header(7) + b"\x00", "Unsupported migration stream version 7"),
    "empty": (b"", "CPR state truncated: stream ended at offset 0"),
    "truncated-header": (b"QCP", "CPR state truncated: stream ended at offset 3"),
    "truncated-version": (header()[:6], "CPR state truncated: stream ended at offset 6"),
    "truncated-name": (header() + b"\x01\x00\x00\x00\x05ra", "CPR state truncated"),
    "overlong-name": (header() + entry(b"x" * 300 + b"\0"), "name too long (301 bytes"),
    "huge-namelen": (header() + entry(b"", namelen=0xFFFFFFFF), "name too long (4294967295 bytes"),
    "name-not-terminated": (header() + entry(b"ram0"), "is not one NUL-terminated string"),
    "no-fd-on-dummy-byte": (header() + entry(b"ram0\0") + b" \x00", "no file descriptor came with"),
    "wrong-dummy-byte": (header() + entry(b"ram0\0") + b"X", "unexpected byte 0x58"),
}


VMSTATE_LOAD_ERROR = "vmstate_load_state error -5"  # anything wrong in the fd list, QEMU 10.0.2
QEMU_LAST_LINE = {
    "bad-magic": "Not a migration stream (bad magic 58585858)",
    "bad-version": "Unsupported migration stream version 7",
    "empty": "Not a migration stream (bad magic 0)",  # qemu_get_be32() reads zeros past the end
    "truncated-header": "Not a migration stream (bad magic 51435000)",
    "truncated-version": "Unsupported migration stream version 0",
}


@pytest.mark.parametrize("case", list(BYTES_CASES))
def test_cpr_state_bytes_refused(cpr_dest, case):
    m, sock = cpr_dest
    data, text = BYTES_CASES[case]
    if data:
        sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
    lines = refused(m)
    assert text in lines, lines
    assert lines.splitlines()[-1] == f"labkit-vm: {QEMU_LAST_LINE.get(case, VMSTATE_LOAD_ERROR)}", lines


def test_cpr_state_too_many_fds(cpr_dest):
    m, sock = cpr_dest
    fds = [os.memfd_create(f"x{i}", os.MFD_CLOEXEC) for i in range(66)]
    try:
        with contextlib.suppress(OSError):  # the destination may hang up before we are done
            send_state(sock, [(entry(f"x{i}".encode() + b"\0"), fd) for i, fd in enumerate(fds)])
    finally:
        for fd in fds:
            os.close(fd)
    assert "too many file descriptors (more than 64)" in refused(m)


def test_cpr_state_duplicate_name(cpr_dest):
    m, sock = cpr_dest
    a, b = os.memfd_create("ram0"), os.memfd_create("ram0")
    try:
        send_state(sock, [(entry(b"ram0\0"), a), (entry(b"ram0\0"), b)])
    finally:
        os.close(a)
        os.close(b)
    assert "unexpected cpr fd 'ram0' id 0 (duplicate or non-zero id)" in refused(m)


def _wrong_fd(kind: str, tmp_path) -> tuple[int, list[int]]:
    """An fd of the given kind to pass off as ram0's memfd, plus every fd to close afterwards."""
    if kind == "pipe":
        r, w = os.pipe()
        return r, [r, w]
    if kind == "socket":
        a, b = socket.socketpair()
        fa, fb = a.detach(), b.detach()
        return fa, [fa, fb]
    if kind == "regular file":
        fd = os.open(tmp_path / "ram0", os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, RAM)
        return fd, [fd]
    fd = os.memfd_create("ram0", os.MFD_CLOEXEC)  # a memfd of the wrong size
    os.ftruncate(fd, RAM // 2)
    return fd, [fd]


@pytest.mark.parametrize("kind", ["pipe", "socket", "regular file", "wrong size"])
def test_cpr_fd_of_the_wrong_kind_refused_before_mapping(cpr_dest, tmp_path, kind):
    m, sock = cpr_dest
    bad, to_close = _wrong_fd(kind, tmp_path)
    good = block_fds()
    try:
        items = [(entry(n.encode() + b"\0"), fd) for n, fd in good if n != "ram0"]
        items.insert(0, (entry(b"ram0\0"), bad))
        send_state(sock, items)
    finally:
        for fd in to_close + [fd for _, fd in good]:
            os.close(fd)
    line = refused(m)
    if kind == "wrong size":  # a memfd smaller than its memory-backend-memfd: QEMU 10.0.2's text
        assert line == (
            f"labkit-vm: ram0 backing store size {RAM // 2:#x} is too small for 'size' option {RAM:#x} "
            "plus 'offset' option 0x0"
        )
    else:
        assert line.startswith("labkit-vm: cpr fd for RAM block ram0: "), line
        assert f" is a {kind} " in line or f" is an {kind} " in line, line


def test_cpr_state_well_formed_is_accepted(cpr_dest):
    """The control: the same crafted bytes with real memfds of the right sizes are accepted and mapped."""
    m, sock = cpr_dest
    good = block_fds()
    try:
        send_state(sock, [(entry(n.encode() + b"\0"), fd) for n, fd in good])
    finally:
        for _, fd in good:
            os.close(fd)
    m.connect()
    blocks = {b["name"]: b["reused"] for b in m.cmd("x-labkit-ram-blocks")}
    assert all(blocks.values()) and set(blocks) == {n for n, _ in good}
    assert m.cmd("query-status")["status"] == "inmigrate"


# -- main stream ------------------------------------------------------------------------------------------
@pytest.fixture
def main_dest(tmp_path):
    """A real destination listening on main; yields (machine, its RAM blocks, a connected socket)."""
    path = str(tmp_path / "main.sock")
    m = spawn(CONFIG.with_incoming(f"unix:{path}"))
    sock = socket.socket(socket.AF_UNIX)
    try:
        blocks = [(b["name"], b["size"]) for b in m.cmd("x-labkit-ram-blocks")]
        assert os.stat(path).st_mode & 0o777 == 0o600
        sock.connect(path)
        yield m, blocks, sock
    finally:
        sock.close()
        m.kill()


def stream(build) -> bytes:
    buf = io.BytesIO()
    f = QEMUFileOut(buf)
    build(f)
    f.flush()
    return buf.getvalue()


def _setup(blocks):
    def build(f):
        qemu_savevm_state_header(f)
        ram_save_setup(f, blocks)

    return build


def _with(blocks, *more):
    def build(f):
        _setup(blocks)(f)
        for step in more:
            step(f)

    return build


def _device(name: str, payload: bytes, version: int = 1):
    """A FULL section named ``name`` whose fields are ``payload`` (one buffer field, as a vmsd would give)."""
    vmsd = VMStateDescription(name, version, (VMStateField("data", "buffer", len(payload)),))
    return lambda f: qemu_save_device_state(f, name, 0, vmsd, {"data": payload})


def _pages(block: str, first: int, n: int):
    def step(f):
        ram_save_pages(f, block, first, memoryview(bytes(range(256)) * 16 * n), detect_zero=False)
        ram_save_iterate_end(f)

    return step


def _raw(data: bytes):
    def step(f):
        f.flush()
        f.put_bytes(data)

    return step


def _record(block: str, offset: int, flags: int = 0x08) -> bytes:
    """One page record's header naming its block (the page data or fill byte not included)."""
    name = block.encode()
    return struct.pack(">Q", offset | flags) + bytes([len(name)]) + name


MAIN_CASES = {
    "bad-magic": (lambda b: b"QEVX\x00\x00\x00\x03", "Not a migration stream"),
    "bad-version": (lambda b: b"QEVM\x00\x00\x00\x09", "Unsupported migration stream version"),
    "empty": (lambda b: b"", "Not a migration stream"),  # qemu_get_be32() reads zeros past the end
    "no-configuration": (lambda b: b"QEVM\x00\x00\x00\x03\x00", "Configuration section missing"),
    "truncated-after-setup": (lambda b: stream(_setup(b)), "Input stream ended unexpectedly"),
    "truncated-mid-page": (
        lambda b: stream(_with(b, _pages("ram0", 10, 4)))[:-100],
        "Input stream ended unexpectedly",
    ),
    "unknown-device-section": (
        lambda b: stream(_with(b, _device("nosuchdev", b"{}"))),
        "Unknown savevm section or instance 'nosuchdev' 0",
    ),
    "first-qemu-section-not-modelled": (  # what a real QEMU source sends after timer (see stream-inspect)
        lambda b: stream(_with(b, _device("cpu_common", bytes(8)))),
        "Unknown savevm section or instance 'cpu_common' 0",
    ),
    "garbage-device-state": (  # globalstate's size field says 0: no NUL-terminated run state
        lambda b: stream(_with(b, _device("globalstate", bytes(104)))),
        "error while loading state for instance 0x0 of device 'globalstate'",
    ),
    "device-section-too-short": (
        lambda b: stream(_with(b, _device("cpu", b"\xff\xfe short", version=12), _raw(bytes(100)))),
        "Missing section footer for cpu",
    ),
    "device-version-too-new": (
        lambda b: stream(_with(b, _device("timer", bytes(24), version=3))),
        "timer: incoming version_id 3 is too new (max 2)",
    ),
    "page-beyond-ram": (
        lambda b: stream(_with(b, _raw(b"\x02\x00\x00\x00\x01" + _record("ram0", RAM)))),
        f"Illegal RAM offset {RAM:x}",
    ),
    "zero-page-beyond-ram": (
        lambda b: stream(_with(b, _raw(b"\x02\x00\x00\x00\x01" + _record("ram0", RAM, 0x02) + b"\0"))),
        f"Illegal RAM offset {RAM:x}",
    ),
    "other-machine-type": (
        lambda b: b"QEVM\x00\x00\x00\x03\x07\x00\x00\x00\x0bpc-i440fx-9",
        "Machine type received is 'pc-i440fx-9' and local is 'pc-q35-10.0'",
    ),
    "unknown-ram-block": (
        lambda b: stream(_setup([("bogus", 4096)])),
        'Unknown ramblock "bogus", cannot accept migration',
    ),
    "ram-block-length-mismatch": (
        lambda b: stream(_setup([(n, s * 2) if n == "ram0" else (n, s) for n, s in b])),
        "Length mismatch: ram0",
    ),
    "unknown-section-type": (lambda b: stream(_with(b, _raw(b"\x42"))), "Unknown savevm section type 66"),
    "unknown-section-id": (
        lambda b: stream(_with(b, _raw(b"\x02\x00\x00\x00\x63"))),
        "Unknown savevm section 99",
    ),
    "too-many-ram-blocks": (
        lambda b: (
            b"QEVM\x00\x00\x00\x03\x07\x00\x00\x00\x0bpc-q35-10.0\x01\x00\x00\x00\x00\x03ram\x00\x00\x00\x00\x00\x00\x00\x04"
            + struct.pack(">Q", (1 << 62) | 0x04)
            + b"".join(bytes([5]) + f"b{i:04d}".encode() + struct.pack(">Q", 4096) for i in range(4097))
        ),
        "Too many RAM blocks (more than 4096)",
    ),
}


# QEMU 10.0.2's last line for the same fault: qemu_loadvm_state()'s errno, worded by strerror; the detail
# (the text above) comes on the line before, as QEMU's error_report() puts it there
MAIN_LAST_LINE = {
    "bad-version": "Operation not supported",
    "truncated-after-setup": "Input/output error",
    "truncated-mid-page": "Input/output error",
}


@pytest.mark.parametrize("case", list(MAIN_CASES))
def test_main_stream_refused(main_dest, case):
    m, blocks, sock = main_dest
    make, text = MAIN_CASES[case]
    with contextlib.suppress(OSError):  # the destination may stop reading as soon as it has seen enough
        sock.sendall(make(blocks))
        sock.shutdown(socket.SHUT_WR)
    detail, last = refused(m).split("\n")
    assert text in detail, detail
    assert last == f"labkit-vm: load of migration failed: {MAIN_LAST_LINE.get(case, 'Invalid argument')}"


def test_main_stream_well_formed_is_accepted(main_dest):
    """The control: the same builders, used right, give a stream the destination loads and runs."""
    m, blocks, sock = main_dest

    def build(f):
        _setup(blocks)(f)
        _pages("ram0", 0, 1)(f)
        qemu_savevm_state_end(f)

    sock.sendall(stream(build))
    sock.shutdown(socket.SHUT_WR)
    wait_for(lambda: m.cmd("query-migrate")["status"] == "completed", "the load to complete")
    assert m.cmd("query-status")["status"] in ("running", "paused")


# -- a real migration's stream, cut ----------------------------------------------------------------------
@pytest.mark.parametrize("cut", [4, 8 + 5, 256 * 1024 + 7])
def test_real_stream_cut_short(tmp_path, cut):
    """The destination refuses the cut stream (exit 1, QEMU's two lines); the source fails and runs on, memory intact."""
    front, back = str(tmp_path / "main.sock"), str(tmp_path / "dst.sock")
    src = spawn(VMConfig(name="src", ram=RAM, guest=GuestConfig(dirty_rate=16 * MiB)))
    dst = spawn(CONFIG.with_incoming(f"unix:{back}"))
    relay = StreamRelay(front, back, limit=cut, then="cut")
    try:
        src.cmd("query-status")
        before = fd_census(src.pid)
        src.cmd("migrate", {"uri": f"unix:{front}"})
        line = refused(dst)
        # cut inside the header, the version reads as 0 (qemu_get_be32() past the end); later, the channel ended
        errtext = "Operation not supported" if cut < 8 else "Input/output error"
        assert line.endswith(f"\nlabkit-vm: load of migration failed: {errtext}"), line
        info = wait_for(
            lambda: (i := src.cmd("query-migrate"))["status"] in ("failed", "completed") and i, "the source"
        )
        assert info["status"] == "failed" and info["error-desc"], info
        assert src.cmd("query-status")["status"] == "running"
        assert src.cmd("x-labkit-verify")["ok"]
        assert fd_census(src.pid) == before
    finally:
        relay.close()
        dst.kill()
        src.shutdown()


def test_quit_while_a_stalled_stream_loads(main_dest):
    """A client that sends a header and then nothing keeps the load waiting (as in QEMU); `quit` still ends the
    process at once, with status 0 and no "load failed" line: an exit asked for is not a failure."""
    m, blocks, sock = main_dest
    sock.sendall(stream(_setup(blocks)))
    wait_for(lambda: m.cmd("query-migrate")["status"] == "active", "the load to start")
    t0 = time.monotonic()
    assert m.shutdown() == 0
    assert time.monotonic() - t0 < 10
