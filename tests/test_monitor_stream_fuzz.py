"""Stream-level fuzzing of a running VM's monitor: the monitor never stops reading.

The message fuzzer (test_monitor_fuzz.py) sends messages; this one sends *streams*: deep nesting, huge
tokens, invalid UTF-8, control bytes, and valid commands interleaved with junk, megabytes at a time, to a
real labkit-vm whose guest is running. After every stream:

* a valid command is answered within a bound, and so is every valid command that followed a resync byte;
* the VM's memory stays bounded (its anonymous RSS; guest RAM lives in a memfd and is not counted);
* the guest keeps running (its heartbeat advances) and its memory verifies.

A client that never reads its replies must not block its sender either (QEMU 10 keeps reading such a client;
the emulator does too, and drops it past a bounded backlog). Where QEMU 10 is installed, the same junk
stream is sent to real QEMU's monitor and both drain rates are printed, side by side; they are figures for
the reader, never asserted.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from labkit.host.hardware import VMConfig
from labkit.host.machine import Machine
from labkit.host.runners.emulated import EmulatedRunner
from labkit.host.runners.qemu import qemu_missing
from labkit.qemu_syntax import GuestConfig

pytestmark = pytest.mark.timeout(300)
ANSWER_BOUND = 30.0  # seconds for the sentinel's answer after a stream: a hang, not a slow answer, fails
RSS_GROWTH_BOUND = 96 << 20  # anonymous memory the VM may gain over the whole run


# ------------------------------------------------------------------------------------------ strategies
def _cmd(i: int) -> bytes:
    return b'{"execute": "query-status", "id": "v%d"}' % i


deep_nesting = st.builds(
    lambda n, opener, closed: opener * n + (b"]" if opener == b"[" else b"}") * (n if closed else 0),
    st.integers(500, 20_000),
    st.sampled_from([b"[", b"{", b'{"a":[']),
    st.booleans(),
)
huge_tokens = st.builds(
    lambda n, kind: {
        "string": b'"' + b"x" * n + b'"',
        "open-string": b'"' + b"y" * n,
        "number": b"9" * n,
        "keyword": b"t" * n,
        "in-command": b'{"execute": "query-status", "arguments": {"a": "' + b"z" * n + b'"}}',
    }[kind],
    st.integers(1000, 3 << 20),
    st.sampled_from(["string", "open-string", "number", "keyword", "in-command"]),
)
invalid_utf8 = st.builds(
    lambda body, n: (b'{"execute": "' + body + b'"}') * n,
    st.binary(min_size=1, max_size=16).map(lambda b: bytes(0x80 | (c & 0x7F) for c in b)),
    st.integers(1, 200),
)
control_bytes = st.builds(
    lambda b, n: b * n, st.binary(min_size=1, max_size=8).map(lambda b: bytes(c % 0x20 for c in b)),
    st.integers(1, 500),
)
megabytes = st.builds(
    lambda n, kind: {"token": b"q" * n, "string": b'"' + b"m" * n + b'"', "number": b"7" * n}[kind],
    st.integers(1 << 20, 3 << 20),
    st.sampled_from(["token", "string", "number"]),
)
junk = st.one_of(deep_nesting, huge_tokens, invalid_utf8, control_bytes, st.binary(max_size=4096))


@st.composite
def streams(draw) -> tuple[bytes, list[str]]:
    """Junk with valid commands interleaved; each valid command follows a 0xFF resync byte, so QEMU (and the
    emulator) must answer it whatever came before."""
    parts, ids = [draw(megabytes)], []  # megabytes in every stream, whatever hypothesis shrinks to
    for i in range(draw(st.integers(1, 6))):
        parts.append(draw(junk))
        if draw(st.booleans()):
            parts.append(b"\xff" + _cmd(i))
            ids.append(f"v{i}")
    return b"".join(parts), ids


# ------------------------------------------------------------------------------------------ the client
class StreamClient:
    """A raw QMP client that writes a whole stream while a thread reads every reply, as a sane client does."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(ANSWER_BOUND)
        self.sock.connect(path)
        self.replies: queue.Queue = queue.Queue()
        self.rfile = self.sock.makefile("rb")
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        assert "QMP" in self.get()
        self.send(b'{"execute": "qmp_capabilities"}')
        assert self.get() == {"return": {}}
        self.sentinel = 0

    def _read(self) -> None:
        try:
            for line in self.rfile:
                self.replies.put(json.loads(line))
        except (OSError, ValueError) as e:
            self.replies.put(e)
        self.replies.put(EOFError("closed"))

    def get(self) -> dict:
        msg = self.replies.get(timeout=ANSWER_BOUND)
        if isinstance(msg, BaseException):
            raise msg
        assert isinstance(msg, dict) and set(msg) - {"id"} in ({"return"}, {"error"}, {"QMP"}), msg
        return msg

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def until(self, wanted: list[str]) -> dict[str, dict]:
        """Read replies until every id in `wanted` has been answered; returns them by id."""
        got: dict[str, dict] = {}
        while not set(wanted) <= set(got):
            msg = self.get()
            if isinstance(msg.get("id"), str):
                got[msg["id"]] = msg
        return got

    def command(self, execute: str, arguments: dict | None = None) -> dict:
        self.sentinel += 1
        sid = f"s{self.sentinel}"
        msg = {"execute": execute, "id": sid, **({"arguments": arguments} if arguments else {})}
        self.send(b"\xff" + json.dumps(msg).encode())
        return self.until([sid])[sid]

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.reader.join(10)
        self.rfile.close()
        self.sock.close()


def _rss_anon(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) << 10
    raise AssertionError("no RssAnon")


@pytest.fixture
def vm():
    cfg = VMConfig(name="fuzzed", ram=64 << 20, guest=GuestConfig(dirty_rate=16 << 20))
    m = Machine(cfg, EmulatedRunner()).launch(connect=False)
    try:
        yield m
    finally:
        m.kill()


def _guest_ok(c: StreamClient, last_seq: int) -> int:
    stats = c.command("x-labkit-guest-stats")["return"]
    seq = stats["heartbeat-seq"]
    assert seq > last_seq, "the guest stopped beating"
    verify = c.command("x-labkit-verify")["return"]
    assert verify["ok"], verify
    return seq


def _wait_socket(path: str, m: Machine) -> None:
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        assert m.alive() and time.monotonic() < deadline, m.log()
        time.sleep(0.01)


def test_stream_fuzz_monitor_keeps_reading(vm):
    _wait_socket(vm.qmp_path, vm)
    c = StreamClient(vm.qmp_path)
    seq = _guest_ok(c, -1)
    rss0 = _rss_anon(vm.pid)
    total = [0]

    @settings(
        max_examples=int(os.environ.get("LABKIT_STREAM_EXAMPLES", "25")),
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )
    @given(streams())
    def one_stream(stream_and_ids):
        nonlocal seq
        stream, ids = stream_and_ids
        c.send(stream)
        total[0] += len(stream)
        c.until(ids)  # every valid command after a resync byte is answered
        assert c.command("query-status")["return"]["status"] == "running"
        seq = _guest_ok(c, seq)
        assert _rss_anon(vm.pid) - rss0 < RSS_GROWTH_BOUND

    try:
        one_stream()
    finally:
        c.close()
    print(f"\nstream fuzz: {total[0] / 2**20:.1f} MiB of junk; VM anonymous RSS grew "
          f"{(_rss_anon(vm.pid) - rss0) / 2**20:.1f} MiB")  # fmt: skip


def _send_without_reading(path: str, data: bytes) -> tuple[int, str]:
    """Write `data` and read nothing back; returns (bytes written, how it ended)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(ANSWER_BOUND)  # a send blocked this long means the monitor stopped reading
    s.connect(path)
    sent = 0
    try:
        while sent < len(data):
            sent += s.send(data[sent : sent + (64 << 10)])
        return sent, "all written"
    except (BrokenPipeError, ConnectionResetError):
        return sent, "dropped"
    finally:
        s.close()


@pytest.mark.parametrize(
    "junk,ending",
    [
        (b"x" * (8 << 20), {"all written"}),  # one 8 MiB token of junk: no replies, all read
        (b'"' + b"s" * (8 << 20), {"all written"}),  # a string that never ends
        (b"[" * (1 << 20), {"all written"}),  # nesting errors, about one reply per 1025 bytes
        (b"\x01" * (8 << 20), {"all written", "dropped"}),  # a reply per byte: dropped past the backlog
        (b"{}" * (4 << 20), {"all written", "dropped"}),
    ],
    ids=["token", "open-string", "nesting", "control-bytes", "empty-objects"],
)
def test_client_that_never_reads_never_blocks_its_sender(vm, junk, ending):
    _wait_socket(vm.qmp_path, vm)
    rss0 = _rss_anon(vm.pid)
    sent, how = _send_without_reading(vm.qmp_path, junk)
    assert how in ending, (how, sent)
    c = StreamClient(vm.qmp_path)  # the next client is served, and the guest is fine
    try:
        _guest_ok(c, -1)
    finally:
        c.close()
    assert _rss_anon(vm.pid) - rss0 < RSS_GROWTH_BOUND


# ------------------------------------------------------------------------------------------ drain rates
DRAIN_STREAM = (
    b"[" * 40_000 + b"\xff" + b'"' + b"x" * 300_000 + b'"' + b"\x01\x02\x03" * 2_000
    + b'{"execute": "\xc3\x28"}' * 2_000 + b"9" * 100_000 + b"{}" * 5_000
)  # fmt: skip


def _drain_rate(path: str) -> float:
    """MB/s at which a monitor consumes DRAIN_STREAM, up to the answer to a command sent after it."""
    c = StreamClient(path)
    try:
        t0 = time.monotonic()
        c.send(DRAIN_STREAM)
        c.command("query-status")
        return len(DRAIN_STREAM) / (time.monotonic() - t0) / 1e6
    finally:
        c.close()


@pytest.mark.qemu
def test_drain_rate_against_real_qemu(vm, tmp_path):
    _wait_socket(vm.qmp_path, vm)
    emu = _drain_rate(vm.qmp_path)
    missing = qemu_missing()
    if missing:
        print(f"\ndrain rate: labkit-vm {emu:.3f} MB/s; QEMU absent ({missing})")
        pytest.skip(missing)
    path = str(tmp_path / "qemu-qmp.sock")
    argv = ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
            "-qmp", f"unix:{path},server=on,wait=off"]  # fmt: skip
    q = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(path):
            assert q.poll() is None and time.monotonic() < deadline, q.stderr.read()
            time.sleep(0.01)
        real = _drain_rate(path)
    finally:
        q.kill()
        q.wait()
        q.stderr.close()
    print(
        f"\ndrain rate of {len(DRAIN_STREAM) / 1e6:.2f} MB of junk, answered after: labkit-vm {emu:.3f} MB/s, "
        f"QEMU 10 {real:.3f} MB/s (labkit-vm/QEMU = {emu / real:.2f})"
    )
