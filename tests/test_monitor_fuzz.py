"""Fuzz the QMP server: whatever bytes arrive, every answer is a QMP reply or a closed connection.

Each hypothesis example writes a batch of generated messages (bad JSON, wrong types, huge numbers,
unknown commands, deep nesting, cut-off messages, floods) back to back, then a 0xFF byte (which
qmp-spec recommends for resynchronising QEMU's parser) and a sentinel command, and reads every
line up to the sentinel's answer. More than 10,000 messages are sent in total.
"""

from __future__ import annotations

import json
import re
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_monitor import MonitorThread, RawClient, register_samples

pytestmark = pytest.mark.timeout(120)

COMMANDS = ["add", "echo", "set-params", "fail", "crash", "nothing", "query-version", "query-commands"]
PARAMS = [
    "a",
    "b",
    "value",
    "mode",
    "downtime-limit",
    "ratio",
    "flag",
    "name",
    "opts",
    "items",
    "max-bandwidth",
]
MIN_MESSAGES = 10_000

huge_ints = st.one_of(
    st.integers(),
    st.integers(min_value=2**63 - 3, max_value=2**64 + 3),
    st.integers(min_value=-(2**63) - 3, max_value=-(2**63) + 3),
    st.integers(min_value=1, max_value=400).map(lambda n: int("9" * n)),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    huge_ints,
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=6,
)


@st.composite
def qmp_messages(draw) -> bytes:
    msg: dict = {}
    if draw(st.integers(0, 9)):
        msg[draw(st.sampled_from(["execute", "execute", "execute", "exec-oob"]))] = draw(
            st.one_of(st.sampled_from(COMMANDS), st.text(max_size=10), json_values)
        )
    if draw(st.booleans()):
        msg["arguments"] = draw(
            st.one_of(
                st.dictionaries(
                    st.one_of(st.sampled_from(PARAMS), st.text(max_size=6)), json_values, max_size=4
                ),
                json_values,
            )
        )
    if draw(st.booleans()):
        msg["id"] = draw(json_values)
    if not draw(st.integers(0, 7)):
        msg[draw(st.text(max_size=6))] = draw(json_values)
    return json.dumps(msg).encode()


def _deep(n: int, closed: bool) -> bytes:
    return b"[" * n + (b"]" * n if closed else b"")


messages = st.one_of(
    qmp_messages(),
    qmp_messages(),
    qmp_messages(),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=40),  # bad JSON, invalid UTF-8, control characters
    st.text(alphabet="{}[]:,\"'\\ tfnul0123456789.eE+-x", max_size=30).map(str.encode),
    st.builds(_deep, st.integers(1020, 1100), st.booleans()),
    qmp_messages().flatmap(lambda m: st.integers(0, len(m)).map(lambda k: m[:k])),  # cut-off
    st.builds(
        lambda n: b'{"execute": "add", "arguments": {"a": ' + b"9" * n + b', "b": 1}}', st.integers(15, 5000)
    ),
)


def _mutate(rnd, pool: list[bytes]) -> bytes:
    """A cheap random variation of a generated message (hypothesis drives ``rnd``)."""
    m = rnd.choice(pool)
    kind = rnd.randrange(7)
    if kind == 0 and m:
        return m[: rnd.randrange(len(m))]  # cut off
    if kind == 1 and m:
        i = rnd.randrange(len(m))
        return m[:i] + bytes([rnd.randrange(256)]) + m[i + 1 :]  # one bad byte
    if kind == 2:
        i = rnd.randrange(len(m) + 1)
        return m[:i] + rnd.choice([b"{", b"}", b"[", b"]", b",", b":", b'"', b"\\", b"'"]) + m[i:]
    if kind == 3:
        return m + rnd.choice(pool)  # two messages glued together
    if kind == 4:
        n = rnd.choice([1, 2, 10, 500, 1023, 1024, 1025, 1100])
        return b"[" * n + m + b"]" * n
    if kind == 5:
        return re.sub(rb"[0-9]+", lambda d: d.group() * rnd.randrange(1, 40), m)  # huge numbers
    return m


@st.composite
def batches(draw) -> list[bytes]:
    batch = draw(st.lists(messages, min_size=20, max_size=40))
    rnd = draw(st.randoms(use_true_random=False))
    batch += [_mutate(rnd, batch) for _ in range(80)]
    if not draw(st.integers(0, 4)):  # a flood of valid commands in one write
        batch.append(b'{"execute": "add", "arguments": {"a": 1, "b": 2}}' * draw(st.integers(100, 400)))
    return batch


def _check_reply(line: bytes) -> dict:
    msg = json.loads(line)
    assert isinstance(msg, dict)
    assert set(msg) - {"id"} in ({"return"}, {"error"}, {"QMP"}), msg
    if "error" in msg:
        assert set(msg["error"]) == {"class", "desc"} and isinstance(msg["error"]["desc"], str), msg
        assert msg["error"]["class"] in ("GenericError", "CommandNotFound"), msg
    return msg


class FuzzClient:
    def __init__(self, path: str):
        self.path = path
        self.client: RawClient | None = None
        self.sentinel = 0

    def _connect(self) -> RawClient:
        if self.client is None:
            self.client = RawClient(self.path, timeout=30)
            _check_reply(self.client.readline())
        return self.client

    def run(self, batch: list[bytes]) -> None:
        c = self._connect()
        self.sentinel += 1
        sid = f"sentinel-{self.sentinel}"
        try:
            c.send(b"".join(batch) + b'\xff{"execute": "query-version", "id": "' + sid.encode() + b'"}')
            while True:
                msg = _check_reply(c.readline())
                if msg.get("id") == sid:
                    return
        except (EOFError, ConnectionError):  # a closed connection is an allowed answer
            self.close()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


def test_fuzz_monitor(tmp_path):
    path = str(tmp_path / "fuzz.sock")
    mt = MonitorThread(path)
    register_samples(mt.monitor)
    fuzz = FuzzClient(path)
    sent = 0

    @settings(
        max_examples=100,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(batches())
    def one_batch(batch):
        nonlocal sent
        fuzz.run(batch)
        sent += sum(max(1, m.count(b'{"execute": "add"')) for m in batch)

    try:
        one_batch()
        fuzz.close()
        assert sent >= MIN_MESSAGES, sent
        assert mt.thread.is_alive()
        # the server still answers, on a fresh connection
        c = RawClient(path)
        c.negotiate()
        assert c.cmd({"execute": "query-version"})["return"]["qemu"]["major"] == 10
        c.close()
    finally:
        fuzz.close()
        mt.stop()


def test_fuzz_partial_lines_and_slow_writes(tmp_path):
    """The same stream cut at every boundary gives the same answers as in one piece."""
    path = str(tmp_path / "split.sock")
    mt = MonitorThread(path)
    register_samples(mt.monitor)
    stream = (
        b'{"execute": "qmp_capabilities"}{"execute": "add", "arguments": {"a": 1, "b": 2}, "id": 1}'
        b'[1, 2 {"execute": "echo", "arguments": {"value": "\\u00e9\xc3\xa9\\ud83d\\ude00"}, "id": 2}@'
        b'{"execute": "add", "arguments": {"a": 123456789012345678901234567890, "b": 1}, "id": 3} 12 '
        b'{"execute": "nope", "id": 4}{"execute": "echo", "id": "end"}'
    )

    def answers(chunks: list[bytes]) -> list[bytes]:
        c = RawClient(path)
        c.readline()
        for chunk in chunks:
            c.sock.sendall(chunk)
        out = []
        while True:
            line = c.readline()
            out.append(line)
            if b'"end"' in line:
                c.close()
                return out

    try:
        whole = answers([stream])
        assert len(whole) >= 7
        for cut in range(1, len(stream), 7):
            assert answers([stream[:cut], stream[cut:]]) == whole
        assert answers([bytes([b]) for b in stream]) == whole
    finally:
        mt.stop()


def test_fuzz_garbage_then_clean_disconnect(tmp_path):
    """Leaving in the middle of anything never wedges the server for the next client."""
    path = str(tmp_path / "bye.sock")
    mt = MonitorThread(path)
    try:
        for junk in (
            b"[" * 5000,
            b'{"execute": "qmp_capabilities"',
            b'"unterminated',
            b"\xff" * 100,
            b"9" * 100000,
        ):
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.sendall(junk)
            s.close()
        c = RawClient(path)
        c.negotiate()
        c.close()
    finally:
        mt.stop()
