"""MigrationChannel parsing in all of QEMU's spellings, QEMU's error texts, and opening channels."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading

import pytest

from labkit.vm.migration.channels import (
    MigrationAddress,
    MigrationChannel,
    MigrationChannelError,
    channel_to_incoming_arg,
    channel_to_json,
    channel_to_uri,
    migrate_is_uri,
    parse_channel,
    parse_channels,
    parse_incoming_option,
    parse_uri,
)
from labkit.vm.migration.qemu_sockets import migration_connect, migration_listen, open_incoming_file

# ------------------------------------------------------------------------------------------
# URIs


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("unix:/run/main.sock", MigrationAddress("socket", "unix", path="/run/main.sock")),
        ("unix:rel:ative", MigrationAddress("socket", "unix", path="rel:ative")),
        ("tcp:127.0.0.1:4444", MigrationAddress("socket", "inet", host="127.0.0.1", port="4444")),
        ("tcp:localhost:0", MigrationAddress("socket", "inet", host="localhost", port="0")),
        ("tcp::4444", MigrationAddress("socket", "inet", host="", port="4444")),
        ("tcp:[::1]:4444", MigrationAddress("socket", "inet", host="::1", port="4444")),
        (
            "tcp:0:4444,ipv4,to=4450",
            MigrationAddress("socket", "inet", host="0", port="4444", options={"ipv4": True, "to": 4450}),
        ),
        ("fd:5", MigrationAddress("socket", "fd", str="5")),
        ("fd:migfd", MigrationAddress("socket", "fd", str="migfd")),
        ("vsock:3:4444", MigrationAddress("socket", "vsock", cid="3", port="4444")),
        ("file:/tmp/vm.img", MigrationAddress("file", filename="/tmp/vm.img", offset=0)),
        ("file:/tmp/vm.img,offset=4096", MigrationAddress("file", filename="/tmp/vm.img", offset=4096)),
        ("file:/tmp/vm.img,offset=0x1000", MigrationAddress("file", filename="/tmp/vm.img", offset=4096)),
        ("file:/tmp/vm.img,offset=2M", MigrationAddress("file", filename="/tmp/vm.img", offset=2 << 20)),
        ("exec:cat > /tmp/x", MigrationAddress("exec", args=["/bin/sh", "-c", "cat > /tmp/x"])),
        ("rdma:10.0.0.1:4444", MigrationAddress("rdma", host="10.0.0.1", port="4444")),
    ],
)
def test_parse_uri_forms(uri, expected):
    ch = parse_uri(uri)
    assert ch == MigrationChannel("main", expected)


def test_parse_uri_channel_type_and_port_number():
    assert parse_uri("unix:/x", "cpr").channel_type == "cpr"
    assert parse_uri("tcp:127.0.0.1:4444").addr.port_number == 4444


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("bogus:/x", "unknown migration protocol: bogus:/x"),
        ("unix:", "invalid Unix socket address"),
        ("fd:", "invalid file descriptor address"),
        ("tcp:localhost", "error parsing address 'localhost'"),
        ("tcp:localhost:", "error parsing address 'localhost:'"),
        ("tcp::", "error parsing port in address ':'"),
        ("tcp:[::1]", "error parsing IPv6 address '[::1]'"),
        ("tcp:h:1,to=x", "error parsing to= argument"),
        ("vsock:3", "error parsing address '3'"),
        ("vsock:3:4x", "trailing characters in address '3:4x'"),
        ("file:/x,offset=abc", "file URI has bad offset abc: Invalid argument"),
        ("file:/x,offset=99999E", "file URI has bad offset 99999E: Numerical result out of range"),
    ],
)
def test_parse_uri_errors(uri, message):
    with pytest.raises(MigrationChannelError) as err:
        parse_uri(uri)
    assert str(err.value) == message
    assert isinstance(err.value, ValueError)


def test_migrate_is_uri():
    assert migrate_is_uri("unix:/x") and migrate_is_uri("bogus:x")
    assert not migrate_is_uri("cpr,addr.transport=socket,addr.path=/a:b")
    assert not migrate_is_uri('{"channel-type": "main"}')
    assert not migrate_is_uri("defer")


# ------------------------------------------------------------------------------------------
# QAPI JSON


CPR_JSON = {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": "cpr.sock"}}


def test_parse_channel_json_forms():
    assert parse_channel(CPR_JSON) == MigrationChannel(
        "cpr", MigrationAddress("socket", "unix", path="cpr.sock")
    )
    inet = {
        "channel-type": "main",
        "addr": {"transport": "socket", "type": "inet", "host": "::1", "port": "1"},
    }
    assert parse_channel(inet).addr == MigrationAddress("socket", "inet", host="::1", port="1")
    f = {"channel-type": "main", "addr": {"transport": "file", "filename": "/tmp/f", "offset": 512}}
    assert parse_channel(f).addr == MigrationAddress("file", filename="/tmp/f", offset=512)
    e = {"channel-type": "main", "addr": {"transport": "exec", "args": ["cat"]}}
    assert parse_channel(e).addr.args == ["cat"]
    fd = {"channel-type": "cpr", "addr": {"transport": "socket", "type": "fd", "str": "7"}}
    assert parse_channel(fd).addr == MigrationAddress("socket", "fd", str="7")


def _with(addr_changes: dict, drop: tuple[str, ...] = (), top: dict | None = None) -> dict:
    obj = json.loads(json.dumps(CPR_JSON))
    obj["addr"].update(addr_changes)
    for k in drop:
        obj["addr"].pop(k)
    obj.update(top or {})
    return obj


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"addr": CPR_JSON["addr"]}, "Parameter 'channel-type' is missing"),
        ({"channel-type": "cpr"}, "Parameter 'addr' is missing"),
        (_with({}, top={"channel-type": "bogus"}), "Parameter 'channel-type' does not accept value 'bogus'"),
        (_with({}, top={"channel-type": 1}), "Invalid parameter type for 'channel-type', expected: string"),
        (_with({}, top={"addr": "unix:/x"}), "Invalid parameter type for 'addr', expected: object"),
        (_with({}, drop=("transport",)), "Parameter 'addr.transport' is missing"),
        (_with({"transport": "pigeon"}), "Parameter 'addr.transport' does not accept value 'pigeon'"),
        (_with({"type": "udp"}), "Parameter 'addr.type' does not accept value 'udp'"),
        (_with({}, drop=("path",)), "Parameter 'addr.path' is missing"),
        (_with({"path": 5}), "Invalid parameter type for 'addr.path', expected: string"),
        (_with({"colour": "red"}), "Parameter 'addr.colour' is unexpected"),
        (_with({}, top={"extra": 1}), "Parameter 'extra' is unexpected"),
        (_with({"abstract": "yes"}), "Invalid parameter type for 'addr.abstract', expected: boolean"),
        (
            {"channel-type": "main", "addr": {"transport": "file", "filename": "/f"}},
            "Parameter 'addr.offset' is missing",
        ),
        (
            {"channel-type": "main", "addr": {"transport": "file", "filename": "/f", "offset": -1}},
            "Parameter 'addr.offset' expects uint64",
        ),
        (
            {"channel-type": "main", "addr": {"transport": "exec", "args": "cat"}},
            "Invalid parameter type for 'addr.args', expected: array",
        ),
        ([], "Invalid parameter type for '<anonymous>', expected: object"),
    ],
)
def test_parse_channel_errors(obj, message):
    with pytest.raises(MigrationChannelError) as err:
        parse_channel(obj)
    assert str(err.value) == message


def test_parse_channel_prefix_names_list_elements():
    with pytest.raises(MigrationChannelError, match=r"^Parameter 'channels\[1\].addr.path' is missing$"):
        parse_channels([{**CPR_JSON, "channel-type": "main"}, _with({}, drop=("path",))])


MAIN_JSON = {"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": "main.sock"}}


def test_parse_channels_qemu10_checks():
    found = parse_channels([MAIN_JSON, CPR_JSON])
    assert set(found) == {"main", "cpr"} and found["main"].addr.path == "main.sock"
    assert set(parse_channels([MAIN_JSON])) == {"main"}
    with pytest.raises(MigrationChannelError, match=r"^Channel list has more than one cpr entry$"):
        parse_channels([MAIN_JSON, CPR_JSON, CPR_JSON])
    with pytest.raises(MigrationChannelError, match=r"^Channel list has more than one main entry$"):
        parse_channels([MAIN_JSON, MAIN_JSON])
    with pytest.raises(MigrationChannelError, match=r"^Channel list has no main entry$"):
        parse_channels([CPR_JSON])  # QEMU 10.0.2 crashed here
    with pytest.raises(MigrationChannelError, match=r"^Channel list has no main entry$"):
        parse_channels([])
    with pytest.raises(
        MigrationChannelError, match=r"^Channel list must have only one entry, for type 'main'$"
    ):
        parse_channels([MAIN_JSON, CPR_JSON], single_main=True)


# ------------------------------------------------------------------------------------------
# -incoming


def test_incoming_defer_uri_json_keyval():
    assert parse_incoming_option("defer") == ("main", None)
    assert parse_incoming_option("unix:main.sock") == ("main", parse_uri("unix:main.sock"))
    kind, ch = parse_incoming_option(json.dumps(CPR_JSON))
    assert kind == "cpr" and ch == parse_channel(CPR_JSON)
    kind, ch = parse_incoming_option("cpr,addr.transport=socket,addr.type=unix,addr.path=cpr.sock")
    assert kind == "cpr" and ch == parse_channel(CPR_JSON)
    # QEMU's qtest form: a pre-opened listening fd
    kind, ch = parse_incoming_option("cpr,addr.transport=socket,addr.type=fd,addr.str=9")
    assert ch.addr == MigrationAddress("socket", "fd", str="9")
    kind, ch = parse_incoming_option("channel-type=main,addr.transport=socket,addr.type=unix,addr.path=a,,b")
    assert kind == "main" and ch.addr.path == "a,b"
    _, ch = parse_incoming_option("main,addr.transport=file,addr.filename=/f,addr.offset=0x10")
    assert ch.addr == MigrationAddress("file", filename="/f", offset=16)
    _, ch = parse_incoming_option("main,addr.transport=exec,addr.args.0=cat,addr.args.1=-u")
    assert ch.addr.args == ["cat", "-u"]
    _, ch = parse_incoming_option("main,addr.transport=socket,addr.type=unix,addr.path=p,addr.abstract=on")
    assert ch.addr.options == {"abstract": True}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("bogus:x", "unknown migration protocol: bogus:x"),
        ("cpr,addr.transport=socket,addr.type=unix", "Parameter 'addr.path' is missing"),
        ("nope,addr.transport=socket", "Parameter 'channel-type' does not accept value 'nope'"),
        ("cpr,addr.transport", "Expected '=' after parameter 'addr.transport'"),
        ("cpr,addr..x=1", "Invalid parameter 'addr..x'"),
        ("cpr,addr=x,addr.transport=socket", "Parameters 'addr.*' used inconsistently"),
        ("cpr,addr.transport=socket,addr.type=unix,addr.path.x=1", "Parameters 'addr.path.*' are unexpected"),
        (
            "main,addr.transport=file,addr.filename=/f,addr.offset=ten",
            "Parameter 'addr.offset' expects integer",
        ),
        (
            "main,addr.transport=socket,addr.type=unix,addr.path=p,addr.abstract=yes",
            "Parameter 'addr.abstract' expects 'on' or 'off'",
        ),
        ("main,addr.transport=exec,addr.args.1=x", "Parameter 'addr.args.0' missing"),
        ('{"channel-type": "cpr",', "JSON parse error, Expecting property name enclosed in double quotes"),
    ],
)
def test_incoming_errors(value, message):
    with pytest.raises(MigrationChannelError) as err:
        parse_incoming_option(value)
    assert str(err.value) == message


# ------------------------------------------------------------------------------------------
# Rendering round trips


ROUND_TRIP_URIS = [
    "unix:/run/m.sock",
    "tcp:127.0.0.1:4444",
    "tcp:[::1]:4444",
    "fd:5",
    "vsock:3:4",
    "file:/tmp/f",
    "file:/tmp/f,offset=4096",
    "exec:cat > /x",
    "rdma:h:1",
]


@pytest.mark.parametrize("uri", ROUND_TRIP_URIS)
def test_render_round_trips(uri):
    ch = parse_uri(uri)
    assert channel_to_uri(ch) == uri
    assert parse_channel(channel_to_json(ch)) == ch
    assert parse_incoming_option(channel_to_incoming_arg(ch)) == ("main", ch)
    cpr = MigrationChannel("cpr", ch.addr)
    arg = channel_to_incoming_arg(cpr)
    assert arg.startswith("{") and parse_incoming_option(arg) == ("cpr", cpr)


def test_channel_to_uri_none_when_not_expressible():
    assert channel_to_uri(MigrationChannel("main", MigrationAddress("exec", args=["cat"]))) is None
    assert channel_to_json(parse_uri("file:/f")) == {
        "channel-type": "main",
        "addr": {"transport": "file", "filename": "/f", "offset": 0},
    }


# ------------------------------------------------------------------------------------------
# Opening channels (real sockets and files)


@pytest.mark.timeout(30)
def test_unix_listen_connect(tmp_path):
    path = tmp_path / "main.sock"
    path.write_text("stale")  # QEMU removes a stale socket file before binding
    ch = parse_uri(f"unix:{path}")
    listener = migration_listen(ch)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with listener:
        src = migration_connect(ch, timeout=5)
        conn, _ = listener.accept()
        with src, conn:
            src.sendall(b"QEVM")
            assert conn.recv(4) == b"QEVM"


@pytest.mark.timeout(30)
def test_inet_listen_defaults_to_loopback_and_connects():
    ch = parse_uri("tcp::0")
    listener = migration_listen(ch)
    with listener:
        host, port = listener.getsockname()
        assert host == "127.0.0.1" and port > 0
        dst = MigrationChannel("main", MigrationAddress("socket", "inet", host="127.0.0.1", port=str(port)))
        src = migration_connect(dst, timeout=5)
        conn, _ = listener.accept()
        with src, conn:
            src.sendall(b"x")
            assert conn.recv(1) == b"x"


@pytest.mark.timeout(30)
def test_connect_failure_texts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        MigrationChannelError, match=r"^Failed to connect to 'main.sock': No such file or directory$"
    ):
        migration_connect(parse_uri("unix:main.sock"), timeout=5)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(
        MigrationChannelError, match=rf"^Failed to connect to '127.0.0.1:{port}': Connection refused$"
    ):
        migration_connect(parse_uri(f"tcp:127.0.0.1:{port}"), timeout=5)
    with pytest.raises(MigrationChannelError, match=r"^UNIX socket path '.*' is too long$"):
        migration_connect(parse_uri("unix:" + "x" * 200), timeout=5)


@pytest.mark.timeout(30)
def test_file_channel_offset(tmp_path):
    path = tmp_path / "vm.img"
    path.write_bytes(b"HEADER--" + b"old tail that goes away")
    ch = parse_uri(f"file:{path},offset=8")
    assert migration_listen(ch) is None
    with migration_connect(ch, timeout=None) as f:
        f.write(b"stream")
    assert path.read_bytes() == b"HEADER--stream"
    with open_incoming_file(ch) as f:
        assert f.read() == b"stream"
    with pytest.raises(
        MigrationChannelError, match=r"^Unable to open .*/missing: No such file or directory$"
    ):
        open_incoming_file(parse_uri(f"file:{tmp_path}/missing"))
    new = tmp_path / "new.img"
    with migration_connect(parse_uri(f"file:{new}"), timeout=None) as f:
        f.write(b"x")
    assert stat.S_IMODE(os.stat(new).st_mode) == 0o600


@pytest.mark.timeout(30)
def test_fd_listen(tmp_path):
    path = str(tmp_path / "s")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    fdno = s.detach()
    listener = migration_listen(MigrationChannel("main", MigrationAddress("socket", "fd", str=str(fdno))))
    with listener:
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)

        def client():
            with socket.socket(socket.AF_UNIX) as c:
                c.connect(path)

        t = threading.Thread(target=client)
        t.start()
        conn, _ = listener.accept()
        conn.close()
        t.join()
    r, w = os.pipe()
    with pytest.raises(MigrationChannelError, match=rf"^File descriptor '{r}' is not a socket$"):
        migration_listen(MigrationChannel("main", MigrationAddress("socket", "fd", str=str(r))))
    os.close(r)
    os.close(w)
    with pytest.raises(MigrationChannelError, match=r"^Unable to parse FD number name: Invalid argument$"):
        migration_listen(MigrationChannel("main", MigrationAddress("socket", "fd", str="name")))


def test_unsupported_transports():
    with pytest.raises(MigrationChannelError, match="does not support the exec"):
        migration_listen(parse_uri("exec:cat"))
    with pytest.raises(MigrationChannelError, match="does not support the socket type vsock"):
        migration_connect(parse_uri("vsock:3:4"), timeout=1)
