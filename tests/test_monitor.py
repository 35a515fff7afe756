"""The QMP server against raw sockets and real QMP clients (qemu.qmp, its legacy client, qmp-shell).

The Monitor runs on its own asyncio loop in a background thread, as it would run on the VM
process's main loop; tests talk to it over a real unix socket.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from labkit.vm.monitor.monitor import Monitor
from labkit.vm.qapi.error import QMPErrorResponse
from labkit.vm.qobject.json_streamer import MAX_MESSAGE_SIZE

pytestmark = pytest.mark.timeout(60)

GREETING = (
    b'{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "labkit-vm"}, '
    b'"capabilities": ["oob"]}}\n'
)


def register_samples(mon: Monitor) -> None:
    """Sample commands, only for tests: the VM process registers its own."""

    def add(args):
        return {"sum": args["a"] + args["b"]}

    async def slow_echo(args):
        await asyncio.sleep(args.get("delay", 0))
        return args.get("value")

    def fail(args):
        raise QMPErrorResponse(args.get("desc", "it failed"), args.get("cls", "GenericError"))

    def crash(args):
        raise RuntimeError("boom")

    def unsendable(args):
        return {"x": object()}

    mon.register("add", add, {"a": "int", "b": "int"})
    mon.register("echo", lambda args: args.get("value"), {"*value": "any"})
    mon.register("slow-echo", slow_echo, {"*value": "any", "*delay": "number"})
    mon.register("nothing", lambda args: None)
    mon.register("fail", fail, {"*desc": "str", "*cls": "str"})
    mon.register("crash", crash)
    mon.register("unsendable", unsendable)
    mon.register(
        "set-params",
        lambda args: args,
        {
            "*mode": ["normal", "cpr-reboot", "cpr-transfer"],
            "*downtime-limit": "int",
            "*ratio": "number",
            "*flag": "bool",
            "*name": "str",
            "*opts": "dict",
            "*items": "list",
            "*max-bandwidth": "size",
        },
    )


class MonitorThread:
    """A Monitor served on an event loop in a background thread."""

    def __init__(self, path: str, monitor: Monitor | None = None):
        self.path = path
        self.monitor = monitor or Monitor()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="monitor-loop", daemon=True)
        self.thread.start()
        self.run(self.monitor.serve_unix(path))

    def run(self, coro, timeout: float = 10):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.run(self.monitor.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class RawClient:
    """A QMP client that is nothing but a socket, to check bytes on the wire."""

    def __init__(self, path: str, timeout: float = 10):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.rfile = self.sock.makefile("rb")

    def readline(self) -> bytes:
        line = self.rfile.readline()
        if not line:
            raise EOFError("server closed the connection")
        assert line.endswith(b"\n")
        return line

    def recv(self) -> dict:
        return json.loads(self.readline())

    def send(self, data: bytes | dict) -> None:
        if isinstance(data, dict):
            data = json.dumps(data).encode()
        self.sock.sendall(data)

    def cmd(self, data: bytes | dict) -> dict:
        self.send(data)
        return self.recv()

    def negotiate(self) -> None:
        assert self.readline() == GREETING
        assert self.cmd({"execute": "qmp_capabilities"}) == {"return": {}}

    def has_data(self, wait: float) -> bool:
        return bool(select.select([self.sock], [], [], wait)[0])

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "qmp.sock")


@pytest.fixture
def server(sock_path):
    mt = MonitorThread(sock_path)
    register_samples(mt.monitor)
    yield mt
    mt.stop()


@pytest.fixture
def client(server):
    c = RawClient(server.path)
    c.negotiate()
    yield c
    c.close()


# --- greeting and negotiation -----------------------------------------------------------------
def test_greeting_bytes_and_socket_mode(server):
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(server.path).st_mode)
    c = RawClient(server.path)
    assert c.readline() == GREETING
    c.close()


def test_negotiation(server):
    c = RawClient(server.path)
    c.readline()
    expect = {
        "class": "CommandNotFound",
        "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
    }
    assert c.cmd({"execute": "query-version"}) == {"error": expect}
    assert c.cmd({"execute": "no-such-command", "id": 7}) == {"error": expect, "id": 7}
    # checks that come before the command lookup still give their own errors
    assert c.cmd({"execute": "query-version", "x": 1}) == {
        "error": {"class": "GenericError", "desc": "QMP input member 'x' is unexpected"}
    }
    assert c.cmd({"exec-oob": "query-version"}) == {
        "error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}
    }
    assert c.cmd({"execute": "qmp_capabilities", "arguments": {"enable": ["foo"]}}) == {
        "error": {"class": "GenericError", "desc": "Parameter 'null' does not accept value 'foo'"}
    }
    assert c.cmd({"execute": "qmp_capabilities", "arguments": {"enable": [1]}}) == {
        "error": {"class": "GenericError", "desc": "Invalid parameter type for 'enable[0]', expected: string"}
    }
    assert c.cmd({"execute": "qmp_capabilities", "id": "neg"}) == {"return": {}, "id": "neg"}
    assert c.cmd({"execute": "qmp_capabilities"}) == {
        "error": {
            "class": "CommandNotFound",
            "desc": "Capabilities negotiation is already complete, command ignored",
        }
    }
    assert c.cmd({"execute": "query-version"}) == {
        "return": {"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": "labkit-vm"}
    }
    c.close()


def test_oob_enabled_is_refused_politely(server):
    c = RawClient(server.path)
    c.readline()
    assert c.cmd({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}) == {"return": {}}
    assert c.cmd({"exec-oob": "query-version", "id": 1}) == {
        "error": {"class": "GenericError", "desc": "The command query-version does not support OOB"},
        "id": 1,
    }
    assert c.cmd({"exec-oob": "query-version", "execute": "query-version"})["error"]["desc"].startswith(
        "QMP input member '"
    )
    assert "return" in c.cmd({"execute": "query-version"})
    c.close()


def test_reply_bytes_match_qemu_member_order(client):
    client.send(b'{"execute": "query-version", "id": "a"}')
    assert client.readline() == (
        b'{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "labkit-vm"}, "id": "a"}\n'
    )
    client.send(b'{"execute": "nope", "id": "b"}')
    assert client.readline() == (
        b'{"id": "b", "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}\n'
    )


@pytest.mark.parametrize(
    "id_",
    ["libvirt-1", 0, -5, 1.5, None, True, [1, "two", {"three": 3}], {"nested": {"deep": [None]}}, "ü€😀"],
)
def test_id_echoed(client, id_):
    assert client.cmd({"execute": "echo", "arguments": {"value": 1}, "id": id_}) == {"return": 1, "id": id_}
    assert client.cmd({"execute": "nope", "id": id_})["id"] == id_
    assert client.cmd({"execute": "echo", "bogus": 1, "id": id_})["id"] == id_


def test_no_id_no_id_member(client):
    assert client.cmd({"execute": "echo"}) == {"return": {}}
    assert client.cmd({"execute": "nothing"}) == {"return": {}}


def test_query_commands(client):
    names = [c["name"] for c in client.cmd({"execute": "query-commands"})["return"]]
    assert set(names) >= {"qmp_capabilities", "query-version", "query-commands", "add", "set-params"}
    assert names[0] == "set-params"  # QEMU prepends: last registered first


# --- error texts --------------------------------------------------------------------------------
def _err(desc: str, cls: str = "GenericError") -> dict:
    return {"error": {"class": cls, "desc": desc}}


ERROR_CASES = [
    (b"[1]", _err("QMP input must be a JSON object")),
    (b'"hello"', _err("QMP input must be a JSON object")),
    (b'{"arguments": {}}', _err("QMP input lacks member 'execute'")),
    (b'{"execute": 1}', _err("QMP input member 'execute' must be a string")),
    (b'{"execute": "add", "arguments": [1]}', _err("QMP input member 'arguments' must be an object")),
    (b'{"execute": "add", "bogus": 1}', _err("QMP input member 'bogus' is unexpected")),
    (b'{"execute": "nope"}', _err("The command nope has not been found", "CommandNotFound")),
    (b'{"execute": "add", "arguments": {"a": 1}}', _err("Parameter 'b' is missing")),
    (
        b'{"execute": "add", "arguments": {"a": "1", "b": 2}}',
        _err("Invalid parameter type for 'a', expected: integer"),
    ),
    (
        b'{"execute": "add", "arguments": {"a": 1.0, "b": 2}}',
        _err("Invalid parameter type for 'a', expected: integer"),
    ),
    (
        b'{"execute": "add", "arguments": {"a": 9223372036854775808, "b": 2}}',
        _err("Invalid parameter type for 'a', expected: integer"),
    ),
    (
        b'{"execute": "add", "arguments": {"a": 1' + b"0" * 5000 + b', "b": 2}}',
        _err("Invalid parameter type for 'a', expected: integer"),
    ),
    (
        b'{"execute": "add", "arguments": {"a": true, "b": 2}}',
        _err("Invalid parameter type for 'a', expected: integer"),
    ),
    (b'{"execute": "add", "arguments": {"a": 1, "b": 2, "c": 3}}', _err("Parameter 'c' is unexpected")),
    (b'{"execute": "query-version", "arguments": {"x": 1}}', _err("Parameter 'x' is unexpected")),
    (
        b'{"execute": "set-params", "arguments": {"mode": "cpr-bogus"}}',
        _err("Parameter 'mode' does not accept value 'cpr-bogus'"),
    ),
    (
        b'{"execute": "set-params", "arguments": {"mode": 1}}',
        _err("Invalid parameter type for 'mode', expected: string"),
    ),
    (
        b'{"execute": "set-params", "arguments": {"name": null}}',
        _err("Invalid parameter type for 'name', expected: string"),
    ),
    (
        b'{"execute": "set-params", "arguments": {"flag": 1}}',
        _err("Invalid parameter type for 'flag', expected: boolean"),
    ),
    (
        b'{"execute": "set-params", "arguments": {"ratio": "x"}}',
        _err("Invalid parameter type for 'ratio', expected: number"),
    ),
    (
        b'{"execute": "set-params", "arguments": {"opts": []}}',
        _err("Invalid parameter type for 'opts', expected: object"),
    ),
    (
        b'{"execute": "set-params", "arguments": {"items": {}}}',
        _err("Invalid parameter type for 'items', expected: array"),
    ),
    (
        b'{"execute": "set-params", "arguments": {"max-bandwidth": 1e3}}',
        _err("Parameter 'max-bandwidth' expects uint64"),
    ),
    (b'{"execute": foo}', _err("JSON parse error, invalid keyword 'foo'")),
    (b'{"execute" "x"}', _err("JSON parse error, missing : in object pair")),
    (b'{"a": 1, "a": 2}', _err("JSON parse error, duplicate key")),
    (b'{"a": 1 "b": 2}', _err("JSON parse error, expected separator in dict")),
    (b"[1 2]", _err("JSON parse error, expected separator in list")),
    (b'{"execute": "x",}', _err("JSON parse error, expecting value")),
    (b"{1: 2}", _err("JSON parse error, key is not a string in object")),
    (b'"\\x"', _err("JSON parse error, invalid escape sequence in string")),
    (b'"\\uD800"', _err("JSON parse error, \\uD800 is not a valid Unicode character")),
    (b'"\\uZZZZ"', _err("JSON parse error, \\uZZZZ is not a valid Unicode character")),
    (b'"\xc3\x28"', _err("JSON parse error, invalid UTF-8 sequence in string")),
    (b"@", _err("JSON parse error, stray '@'")),
    (b"01", _err("JSON parse error, stray '01'")),
    (b'{"execute": "fail"}', _err("it failed")),
    (
        b'{"execute": "fail", "arguments": {"desc": "no", "cls": "DeviceNotActive"}}',
        _err("no", "DeviceNotActive"),
    ),
    (b'{"execute": "crash"}', _err("boom")),
    (b'{"execute": "unsendable"}', _err("cannot send a object over QMP")),
]


@pytest.mark.parametrize("raw,expected", ERROR_CASES, ids=[c[0][:40].decode("latin-1") for c in ERROR_CASES])
def test_error_texts(client, raw, expected):
    assert client.cmd(raw) == expected
    # the connection stays usable after every error
    assert client.cmd({"execute": "add", "arguments": {"a": 2, "b": 3}, "id": 1}) == {
        "return": {"sum": 5},
        "id": 1,
    }


def test_argument_values_reach_handler(client):
    args = {
        "mode": "cpr-transfer",
        "downtime-limit": -(2**63),
        "ratio": 3,
        "flag": False,
        "name": "ü\u0000x",
        "opts": {"k": [1, {}]},
        "items": [],
        "max-bandwidth": -1,
    }
    ret = client.cmd({"execute": "set-params", "arguments": args})["return"]
    assert ret == {**args, "ratio": 3.0, "max-bandwidth": 2**64 - 1}


def test_numbers_like_qemu(client):
    # integers beyond uint64 become doubles (strtod); doubles are written with %.17g
    assert client.cmd(b'{"execute": "echo", "arguments": {"value": 123456789012345678901234567890}}') == {
        "return": 1.2345678901234568e29
    }
    client.send(b'{"execute": "echo", "arguments": {"value": [0.1, 1.0, -0, 18446744073709551615, 1e999]}}')
    assert client.readline() == b'{"return": [0.10000000000000001, 1, 0, 18446744073709551615, null]}\n'


def test_single_quotes_and_escapes_like_qemu(client):
    client.send(b"{'execute': 'echo', 'arguments': {'value': '\\u00e9\\\"\\'\\n\\ud83d\\ude00\x7f'}}")
    assert client.readline() == b'{"return": "\\u00E9\\"\'\\n\\uD83D\\uDE00\\u007F"}\n'


# --- framing ------------------------------------------------------------------------------------
def test_back_to_back_messages_without_newlines(client):
    msgs = b"".join(
        json.dumps({"execute": "add", "arguments": {"a": i, "b": 1}, "id": i}).encode() for i in range(50)
    )
    client.send(msgs)
    for i in range(50):
        assert client.recv() == {"return": {"sum": i + 1}, "id": i}


def test_message_split_across_many_small_writes(client):
    msg = b'{"execute": "echo", "arguments": {"value": "split \\u00e9 \xc3\xa9"}, "id": "s"}'
    for b in msg[:-1]:
        client.send(bytes([b]))
    assert not client.has_data(0.2)  # nothing is answered before the object is complete
    client.send(msg[-1:])
    assert client.recv() == {"return": "split é é", "id": "s"}
    # a number at the end of the input waits for the byte that ends it
    client.send(b"12")
    assert not client.has_data(0.2)
    client.send(b"3 ")
    assert client.recv() == _err("QMP input must be a JSON object")


def test_parse_error_recovery_like_qemu_10(client):
    # QEMU 10.0 reports the stray character, skips to the next structural character, and
    # each unbalanced closing brace then is a message of its own
    client.send(b'{"execute": @}{"execute": "echo", "id": 2}')
    assert client.recv() == _err("JSON parse error, stray '@'")
    assert client.recv() == _err("JSON parse error, expecting value")
    assert client.recv() == {"return": {}, "id": 2}


def test_nesting_limit(client):
    client.send(b"[" * 1024 + b"]" * 1024)
    assert client.recv() == _err("QMP input must be a JSON object")
    client.send(b"[" * 1025 + b'\xff{"execute": "echo", "id": 3}')
    assert client.recv() == _err("JSON nesting depth limit exceeded")
    assert client.recv() == _err("JSON parse error, stray '\ufffd'")
    assert client.recv() == {"return": {}, "id": 3}
    deep = b"[" * 1023 + b"]" * 1023  # too deep for Python's json module, fine for QEMU's parser
    client.send(b'{"execute": "echo", "id": ' + deep + b"}")
    assert client.readline() == b'{"return": {}, "id": ' + deep.replace(b"][", b"], [") + b"}\n"


def test_oversized_message_is_refused_and_discarded(client):
    head = b'{"execute": "echo", "arguments": {"value": "'
    client.send(head)
    chunk = b"x" * 65536
    for _ in range(2 * MAX_MESSAGE_SIZE // len(chunk)):
        client.send(chunk)
    client.send(b'"}, "id": "big"}{"execute": "echo", "id": "after"}')
    assert client.recv() == _err("JSON token size limit exceeded")
    assert client.recv() == {"return": {}, "id": "after"}
    # a message just under the limit still works
    value = "y" * (MAX_MESSAGE_SIZE - 200)
    assert client.cmd({"execute": "echo", "arguments": {"value": value}}) == {"return": value}


def test_half_closed_client_gets_its_answers(server):
    c = RawClient(server.path)
    c.negotiate()
    c.send(b'{"execute": "echo", "id": 1}{"execute": "echo", "id": 2}')
    c.sock.shutdown(socket.SHUT_WR)
    assert [c.recv()["id"], c.recv()["id"]] == [1, 2]
    assert c.rfile.readline() == b""
    c.close()


def test_async_handler_and_pipelining(client):
    client.send(
        b'{"execute": "slow-echo", "arguments": {"value": "first", "delay": 0.05}, "id": 1}'
        b'{"execute": "echo", "arguments": {"value": "second"}, "id": 2}'
    )
    assert client.recv() == {"return": "first", "id": 1}
    assert client.recv() == {"return": "second", "id": 2}


# --- connections --------------------------------------------------------------------------------
def test_reconnect(server):
    for _ in range(3):
        c = RawClient(server.path)
        assert c.readline() == GREETING
        assert c.cmd({"execute": "query-version"})["error"]["class"] == "CommandNotFound"
        assert c.cmd({"execute": "qmp_capabilities"}) == {"return": {}}
        c.close()
    c = RawClient(server.path)  # leaving abruptly mid-message is fine too
    c.readline()
    c.send(b'{"execute": "qmp_capa')
    c.close()
    c = RawClient(server.path)
    c.negotiate()
    c.close()


def test_second_client_waits_for_the_first(server):
    a = RawClient(server.path)
    a.negotiate()
    b = RawClient(server.path)  # the kernel accepts the connection, QEMU does not serve it yet
    assert not b.has_data(0.3)
    assert a.cmd({"execute": "query-version"})["return"]["qemu"]["major"] == 10
    a.close()
    assert b.readline() == GREETING
    assert b.cmd({"execute": "qmp_capabilities"}) == {"return": {}}
    b.close()


def test_close_unlinks_socket_and_drops_client(sock_path):
    mt = MonitorThread(sock_path)
    c = RawClient(sock_path)
    c.negotiate()
    mt.stop()
    assert not os.path.exists(sock_path)
    assert c.rfile.readline() == b""
    c.close()


def test_stale_socket_is_replaced(sock_path):
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(sock_path)
    stale.close()
    mt = MonitorThread(sock_path)
    c = RawClient(sock_path)
    c.negotiate()
    c.close()
    mt.stop()


# --- events -------------------------------------------------------------------------------------
def test_event_format_and_negotiation_gate(server):
    seen = []
    server.monitor.add_event_listener(seen.append)
    c = RawClient(server.path)
    c.readline()
    server.monitor.emit_event("BEFORE_NEGOTIATION")  # only negotiated clients get events
    assert c.cmd({"execute": "qmp_capabilities"}) == {"return": {}}
    t0 = time.time()
    server.monitor.emit_event("STOP")
    server.monitor.emit_event("MIGRATION", {"status": "completed"})
    stop, mig = c.recv(), c.recv()
    assert list(stop) == ["timestamp", "event"] and stop["event"] == "STOP"
    assert list(mig) == ["timestamp", "event", "data"] and mig["data"] == {"status": "completed"}
    assert set(stop["timestamp"]) == {"seconds", "microseconds"}
    assert 0 <= stop["timestamp"]["microseconds"] < 1_000_000
    assert abs(stop["timestamp"]["seconds"] + stop["timestamp"]["microseconds"] / 1e6 - t0) < 60
    assert [e["event"] for e in seen] == ["BEFORE_NEGOTIATION", "STOP", "MIGRATION"]
    assert seen[2] == mig
    c.close()


def test_events_from_many_threads_keep_one_order(client, server):
    seen = []
    server.monitor.add_event_listener(seen.append)

    def emitter(t):
        for i in range(200):
            server.monitor.emit_event("TICK", {"thread": t, "seq": i})

    threads = [threading.Thread(target=emitter, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    got = [client.recv() for _ in range(800)]
    assert got == seen
    stamps = [(e["timestamp"]["seconds"], e["timestamp"]["microseconds"]) for e in got]
    assert stamps == sorted(stamps)
    for t in range(4):
        assert [e["data"]["seq"] for e in got if e["data"]["thread"] == t] == list(range(200))


def test_event_from_handler_on_loop_thread_precedes_reply(client, server):
    server.monitor.register("emit-now", lambda args: server.monitor.emit_event("NOW", {"x": 1}))
    assert client.cmd({"execute": "emit-now", "id": 1})["event"] == "NOW"
    assert client.recv() == {"return": {}, "id": 1}


def test_client_that_does_not_read_events_is_dropped(server):
    slow = RawClient(server.path)
    slow.negotiate()
    payload = {"blob": "z" * 4096}
    for _ in range(2000):  # ~8 MiB, more than the kernel buffer plus EVENT_BUFFER_LIMIT
        server.monitor.emit_event("BIG", payload)
    # the monitor is not blocked and serves the next client
    nxt = RawClient(server.path)
    assert nxt.readline() == GREETING
    with pytest.raises((EOFError, ConnectionError)):
        while True:
            slow.recv()
    slow.close()
    nxt.close()


def test_qemu_qmp_async_client_and_events(server):
    from qemu.qmp import ExecuteError, QMPClient

    async def main():
        qmp = QMPClient("labkit-test")
        await qmp.connect(server.path)
        assert await qmp.execute("query-version") == {
            "qemu": {"major": 10, "minor": 0, "micro": 2},
            "package": "labkit-vm",
        }
        assert await qmp.execute("add", {"a": 40, "b": 2}) == {"sum": 42}
        with pytest.raises(ExecuteError) as exc:
            await qmp.execute("set-params", {"mode": "cpr-bogus"})
        assert exc.value.error_class == "GenericError"
        assert exc.value.error.error.desc == "Parameter 'mode' does not accept value 'cpr-bogus'"
        threading.Thread(target=lambda: server.monitor.emit_event("MIGRATION", {"status": "setup"})).start()
        async for ev in qmp.events:
            assert ev["event"] == "MIGRATION" and ev["data"] == {"status": "setup"}
            assert isinstance(ev["timestamp"]["seconds"], int)
            break
        await qmp.disconnect()

    # in its own thread: asyncio.run() would reset the main thread's loop that the legacy client reuses
    errors: list[BaseException] = []

    def runner():
        try:
            asyncio.run(asyncio.wait_for(main(), 20))
        except BaseException as e:
            errors.append(e)

    th = threading.Thread(target=runner)
    th.start()
    th.join(30)
    if errors:
        raise errors[0]


def test_qemu_qmp_legacy_client(server):
    from qemu.qmp.legacy import QEMUMonitorProtocol

    qmp = QEMUMonitorProtocol(server.path)
    try:
        greeting = qmp.connect()
        assert greeting["QMP"]["capabilities"] == ["oob"]
        assert qmp.cmd("query-version")["qemu"]["micro"] == 2  # 0.0.6: cmd() returns the result
        assert qmp.cmd("add", a=1, b=2) == {"sum": 3}
        assert qmp.cmd_obj({"execute": "nope"})["error"]["class"] == "CommandNotFound"
        server.monitor.emit_event("STOP")
        ev = qmp.pull_event(wait=10)
        assert ev["event"] == "STOP" and "data" not in ev
    finally:
        qmp.close()


@pytest.mark.skipif(shutil.which("qmp-shell") is None, reason="qmp-shell not installed")
def test_qmp_shell(server):
    out = subprocess.run(
        [shutil.which("qmp-shell"), server.path],
        input="query-version\nadd a=20 b=22\nadd a=x b=1\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert '"major": 10' in out.stdout and '"package": "labkit-vm"' in out.stdout
    assert '"sum": 42' in out.stdout
    assert "Invalid parameter type for 'a', expected: integer" in out.stdout


def test_monitor_in_subprocess_serves_legacy_client(tmp_path):
    """The way the VM process uses it: its own main-thread loop, events from another thread."""
    path = str(tmp_path / "sub.sock")
    code = f"""
import asyncio, threading
from labkit.vm.monitor.monitor import Monitor
async def main():
    mon = Monitor(package="sub")
    done = asyncio.Event()
    mon.register("quit", lambda a: done.set())
    mon.register("kick", lambda a: threading.Thread(target=mon.emit_event, args=("RESUME",)).start())
    await mon.serve_unix({path!r})
    print("ready", flush=True)
    await done.wait()
    await asyncio.sleep(0.05)
    await mon.close()
asyncio.run(main())
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), *sys.path]))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "ready"
        from qemu.qmp.legacy import QEMUMonitorProtocol

        qmp = QEMUMonitorProtocol(path)
        qmp.connect()
        assert qmp.cmd("query-version")["package"] == "sub"
        qmp.cmd("kick")
        assert qmp.pull_event(wait=10)["event"] == "RESUME"
        qmp.cmd("quit")
        qmp.close()
        assert proc.wait(20) == 0
        assert not os.path.exists(path)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
