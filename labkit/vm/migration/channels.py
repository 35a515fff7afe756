"""QEMU's MigrationChannel: parse every way QEMU 10 accepts a migration address (opening one: qemu_sockets.py).

A migration has up to two *channels*: ``main`` (the migration stream) and, for cpr-transfer, ``cpr``
(the CPR state with its file descriptors, see ``cpr.py``).  QEMU accepts them in three spellings,
and labkit parses all three into the same :class:`MigrationChannel`, with QEMU's error texts:

* a URI, the historic form (``migrate_uri_parse`` in migration/migration.c, ``socket_parse`` and
  ``inet_parse`` in util/qemu-sockets.c, ``file_parse_offset`` in migration/file.c)::

      unix:/run/main.sock   tcp:127.0.0.1:4444   fd:5   vsock:3:4444   file:/tmp/vm,offset=0x1000
      exec:cat > /tmp/vm    rdma:host:port

* the QAPI ``MigrationChannel`` JSON object of QMP ``migrate``'s ``channels`` list (qapi/migration.json)::

      {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": "cpr.sock"}}

* the keyval spelling of the same object on the command line (``-incoming``; util/keyval.c with
  implied key ``channel-type``)::

      cpr,addr.transport=socket,addr.type=unix,addr.path=cpr.sock

``parse_incoming_option`` is QEMU's ``incoming_option_parse`` (system/vl.c): ``defer``, a URI (main) or a
channel object.  Keeping "the last ``-incoming`` per channel type wins" is the caller's job.

Checked against qemu/qemu: migration/migration.c (``migrate_is_uri``, ``migrate_uri_parse``,
``qmp_migrate`` channel checks of 10.0), util/qemu-sockets.c, migration/file.c,
qapi/qobject-input-visitor.c (error texts), util/keyval.c.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any

from labkit.errors import LabkitError

__all__ = [
    "MigrationAddress",
    "MigrationChannel",
    "MigrationChannelError",
    "parse_uri",
    "parse_channel",
    "parse_channels",
    "parse_incoming_option",
    "migrate_is_uri",
    "channel_to_json",
    "channel_to_uri",
    "channel_to_incoming_arg",
]

CHANNEL_TYPES = ("main", "cpr")  # QAPI enum MigrationChannelType (10.0)
TRANSPORTS = ("socket", "exec", "rdma", "file")  # QAPI enum MigrationAddressType
SOCKET_TYPES = ("inet", "unix", "vsock", "fd")  # QAPI enum SocketAddressType
DEFAULT_INET_HOST = "127.0.0.1"  # labkit policy: listeners never bind all interfaces by default


class MigrationChannelError(LabkitError, ValueError):
    """A migration address QEMU would refuse; ``str(err)`` is QEMU's error text (a ValueError too, like any
    bad QMP argument)."""


@dataclass
class MigrationAddress:
    """QAPI ``MigrationAddress`` flattened: only the members of ``transport`` (and ``type``) are set.

    ``port`` stays a string as in QAPI's InetSocketAddress (it may be a service name);
    ``str`` is the fd name/number of ``type=fd``; ``args`` the argv of ``transport=exec``.
    """

    transport: str
    type: str | None = None
    path: str | None = None
    host: str | None = None
    port: str | None = None
    str: str | None = None
    filename: builtins.str | None = None
    offset: int = 0
    cid: builtins.str | None = None
    args: list[builtins.str] | None = None
    options: dict[builtins.str, Any] = field(default_factory=dict)  # optional socket flags (ipv4, abstract, ...)

    @property
    def port_number(self) -> int:
        """The port as a number (service names resolved like getaddrinfo would)."""
        assert self.port is not None
        return int(self.port) if self.port.isdigit() else socket.getservbyname(self.port, "tcp")

    def describe(self) -> builtins.str:
        """A short human label, e.g. ``unix:/run/x.sock``."""
        return channel_to_uri(MigrationChannel("main", self)) or json.dumps(_address_to_json(self))


@dataclass
class MigrationChannel:
    """QAPI ``MigrationChannel``: which channel (main|cpr) and where it goes."""

    channel_type: str
    addr: MigrationAddress


# --------------------------------------------------------------------------------------------
# URIs (migrate_uri_parse)


def migrate_is_uri(value: str) -> bool:
    """QEMU's ``migrate_is_uri``: letters only, then a colon (so JSON/keyval are not URIs)."""
    head, colon, _ = value.partition(":")
    return bool(colon) and all(c.isascii() and c.isalpha() for c in head)


def parse_uri(uri: str, channel_type: str = "main") -> MigrationChannel:
    """Parse a migration URI like QEMU's ``migrate_uri_parse`` (which always yields a main channel)."""
    if uri.startswith("exec:"):
        addr = MigrationAddress("exec", args=["/bin/sh", "-c", uri[len("exec:") :]])
    elif uri.startswith("rdma:"):
        host, port, opts = _inet_parse(uri[len("rdma:") :])
        addr = MigrationAddress("rdma", host=host, port=port, options=opts)
    elif uri.startswith(("tcp:", "unix:", "vsock:", "fd:")):
        addr = _socket_parse(uri)
    elif uri.startswith("file:"):
        filename, offset = _file_parse_offset(uri[len("file:") :])
        addr = MigrationAddress("file", filename=filename, offset=offset)
    else:
        raise MigrationChannelError(f"unknown migration protocol: {uri}")
    return MigrationChannel(channel_type, addr)


def _socket_parse(uri: str) -> MigrationAddress:
    """util/qemu-sockets.c ``socket_parse``."""
    if uri.startswith("unix:"):
        if not uri[5:]:
            raise MigrationChannelError("invalid Unix socket address")
        return MigrationAddress("socket", "unix", path=uri[5:])
    if uri.startswith("fd:"):
        if not uri[3:]:
            raise MigrationChannelError("invalid file descriptor address")
        return MigrationAddress("socket", "fd", str=uri[3:])
    if uri.startswith("vsock:"):
        rest = uri[len("vsock:") :]
        m = re.match(r"([0-9]{1,32}):([0-9]{1,32})", rest)
        if not m:
            raise MigrationChannelError(f"error parsing address '{rest}'")
        if m.end() != len(rest):
            raise MigrationChannelError(f"trailing characters in address '{rest}'")
        return MigrationAddress("socket", "vsock", cid=m.group(1), port=m.group(2))
    rest = uri[len("tcp:") :] if uri.startswith("tcp:") else uri
    host, port, opts = _inet_parse(rest)
    return MigrationAddress("socket", "inet", host=host, port=port, options=opts)


def _inet_parse(s: str) -> tuple[str, str, dict[str, Any]]:
    """util/qemu-sockets.c ``inet_parse``: ``[host]:port[,opts]``; the sscanf widths are QEMU's."""
    if s.startswith(":"):
        m = re.match(r":([^,]{1,32})", s)
        if not m:
            raise MigrationChannelError(f"error parsing port in address '{s}'")
        host, port = "", m.group(1)
    elif s.startswith("["):
        m = re.match(r"\[([^\]]{1,64})\]:([^,]{1,32})", s)
        if not m:
            raise MigrationChannelError(f"error parsing IPv6 address '{s}'")
        host, port = m.group(1), m.group(2)
    else:
        m = re.match(r"([^:]{1,64}):([^,]{1,32})", s)
        if not m:
            raise MigrationChannelError(f"error parsing address '{s}'")
        host, port = m.group(1), m.group(2)
    opts: dict[str, Any] = {}
    for item in s[m.end() :].split(",")[1:]:
        key, eq, value = item.partition("=")
        if key == "to":
            if not value.isdigit():
                raise MigrationChannelError("error parsing to= argument")
            opts["to"] = int(value)
        elif key in ("ipv4", "ipv6", "keep-alive", "mptcp", "numeric"):
            opts[key] = (value or "on") == "on"
    return host, port, opts


_SIZE_SUFFIX = {"": 0, "B": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}


def _qemu_strtosz(text: str) -> int:
    """A faithful subset of QEMU's ``qemu_strtosz``: decimal/hex number, optional B/K/M/G/T/P/E suffix."""
    m = re.fullmatch(r"\s*(0[xX][0-9a-fA-F]+|[0-9]+(?:\.[0-9]+)?)([bBkKmMgGtTpPeE]?)", text)
    if not m:
        raise ValueError(os.strerror(22))  # EINVAL "Invalid argument"
    number, suffix = m.group(1), m.group(2).upper()
    if number[:2].lower() == "0x":
        if "." in number:
            raise ValueError(os.strerror(22))
        value = int(number, 16) << _SIZE_SUFFIX[suffix]
    else:
        whole, _, frac = number.partition(".")
        if frac and _SIZE_SUFFIX[suffix] == 0:  # fractional bytes make no sense
            raise ValueError(os.strerror(22))
        value = int(whole) << _SIZE_SUFFIX[suffix]
        if frac:
            value += int(float("0." + frac) * (1 << _SIZE_SUFFIX[suffix]))
    if value >= 1 << 64:
        raise ValueError(os.strerror(34))  # ERANGE "Numerical result out of range"
    return value


def _file_parse_offset(filespec: str) -> tuple[str, int]:
    """migration/file.c ``file_parse_offset``: strip ``,offset=SIZE`` from the file name."""
    name, found, option = filespec.partition(",offset=")
    if not found:
        return filespec, 0
    try:
        return name, _qemu_strtosz(option)
    except ValueError as err:
        raise MigrationChannelError(f"file URI has bad offset {option}: {err}") from None


# --------------------------------------------------------------------------------------------
# QAPI objects (the qobject input visitor's checks and texts)


class _Visitor:
    """Just enough of QEMU's qobject input visitor to give its error messages.

    ``keyval`` is True for command-line keyval input, where every scalar is a string.
    """

    def __init__(self, keyval: bool) -> None:
        self.keyval = keyval

    @staticmethod
    def name(prefix: str, member: str) -> str:
        return f"{prefix}.{member}" if prefix else member

    def start_struct(self, obj: Any, full: str) -> dict[str, Any]:
        if not isinstance(obj, dict):
            raise MigrationChannelError(
                f"Invalid parameter type for '{full or '<anonymous>'}', expected: object"
            )
        return dict(obj)  # a copy: members are popped as they are visited

    def get(self, d: dict[str, Any], prefix: str, member: str, optional: bool = False) -> Any:
        full = self.name(prefix, member)
        if member not in d:
            if optional:
                return None
            raise MigrationChannelError(f"Parameter '{full}' is missing")
        return d.pop(member)

    def check_scalar_keyval(self, value: Any, full: str) -> None:
        if self.keyval and isinstance(value, (dict, list)):
            raise MigrationChannelError(f"Parameters '{full}.*' are unexpected")

    def type_str(self, d: dict[str, Any], prefix: str, member: str, optional: bool = False) -> str | None:
        full = self.name(prefix, member)
        value = self.get(d, prefix, member, optional)
        if value is None and optional:
            return None
        self.check_scalar_keyval(value, full)
        if not isinstance(value, str):
            raise MigrationChannelError(f"Invalid parameter type for '{full}', expected: string")
        return value

    def type_enum(self, d: dict[str, Any], prefix: str, member: str, values: tuple[str, ...]) -> str:
        full = self.name(prefix, member)
        value = self.type_str(d, prefix, member)
        assert value is not None
        if value not in values:
            raise MigrationChannelError(f"Parameter '{full}' does not accept value '{value}'")
        return value

    def type_uint64(self, d: dict[str, Any], prefix: str, member: str) -> int:
        full = self.name(prefix, member)
        value = self.get(d, prefix, member)
        if self.keyval:
            self.check_scalar_keyval(value, full)
            try:
                number = int(value, 0)
            except ValueError:
                raise MigrationChannelError(f"Parameter '{full}' expects integer") from None
            if not 0 <= number < 1 << 64:
                raise MigrationChannelError(f"Parameter '{full}' expects integer")
            return number
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 64:
            raise MigrationChannelError(f"Parameter '{full}' expects uint64")
        return value

    def type_bool(self, d: dict[str, Any], prefix: str, member: str) -> bool | None:
        full = self.name(prefix, member)
        value = self.get(d, prefix, member, optional=True)
        if value is None:
            return None
        if self.keyval:
            self.check_scalar_keyval(value, full)
            if value not in ("on", "off"):
                raise MigrationChannelError(f"Parameter '{full}' expects 'on' or 'off'")
            return bool(value == "on")
        if not isinstance(value, bool):
            raise MigrationChannelError(f"Invalid parameter type for '{full}', expected: boolean")
        return value

    def type_str_list(self, d: dict[str, Any], prefix: str, member: str) -> list[str]:
        full = self.name(prefix, member)
        value = self.get(d, prefix, member)
        if not isinstance(value, list):
            raise MigrationChannelError(f"Invalid parameter type for '{full}', expected: array")
        out = []
        for i, item in enumerate(value):
            item_name = f"{full}.{i}" if self.keyval else f"{full}[{i}]"
            if not isinstance(item, str):
                raise MigrationChannelError(f"Invalid parameter type for '{item_name}', expected: string")
            out.append(item)
        return out

    @staticmethod
    def check_struct(d: dict[str, Any], prefix: str) -> None:
        for key in d:
            raise MigrationChannelError(f"Parameter '{_Visitor.name(prefix, key)}' is unexpected")


def _visit_inet(v: _Visitor, d: dict[str, Any], prefix: str, addr: MigrationAddress) -> None:
    addr.host = v.type_str(d, prefix, "host")
    addr.port = v.type_str(d, prefix, "port")
    for flag in ("numeric", "ipv4", "ipv6", "keep-alive", "mptcp"):
        value = v.type_bool(d, prefix, flag)
        if value is not None:
            addr.options[flag] = value
    if "to" in d:
        addr.options["to"] = v.type_uint64(d, prefix, "to")


def _visit_address(v: _Visitor, obj: Any, prefix: str) -> MigrationAddress:
    d = v.start_struct(obj, prefix)
    transport = v.type_enum(d, prefix, "transport", TRANSPORTS)
    addr = MigrationAddress(transport)
    if transport == "socket":
        addr.type = v.type_enum(d, prefix, "type", SOCKET_TYPES)
        if addr.type == "unix":
            addr.path = v.type_str(d, prefix, "path")
            for flag in ("abstract", "tight"):
                value = v.type_bool(d, prefix, flag)
                if value is not None:
                    addr.options[flag] = value
        elif addr.type == "inet":
            _visit_inet(v, d, prefix, addr)
        elif addr.type == "vsock":
            addr.cid = v.type_str(d, prefix, "cid")
            addr.port = v.type_str(d, prefix, "port")
        else:
            addr.str = v.type_str(d, prefix, "str")
    elif transport == "exec":
        addr.args = v.type_str_list(d, prefix, "args")
    elif transport == "rdma":
        _visit_inet(v, d, prefix, addr)
    else:
        addr.filename = v.type_str(d, prefix, "filename")
        addr.offset = v.type_uint64(d, prefix, "offset")
    v.check_struct(d, prefix)
    return addr


def _visit_channel(v: _Visitor, obj: Any, prefix: str) -> MigrationChannel:
    d = v.start_struct(obj, prefix)
    channel_type = v.type_enum(d, prefix, "channel-type", CHANNEL_TYPES)
    if "addr" not in d:
        raise MigrationChannelError(f"Parameter '{v.name(prefix, 'addr')}' is missing")
    addr = _visit_address(v, d.pop("addr"), v.name(prefix, "addr"))
    v.check_struct(d, prefix)
    return MigrationChannel(channel_type, addr)


def parse_channel(obj: Any, *, prefix: str = "") -> MigrationChannel:
    """Parse one QAPI ``MigrationChannel`` (already decoded JSON), with the QMP visitor's texts.

    ``prefix`` names the object in messages, e.g. ``channels[1]`` for QMP ``migrate``.
    """
    return _visit_channel(_Visitor(keyval=False), obj, prefix)


def parse_channels(channels: Any, *, single_main: bool = False) -> dict[str, MigrationChannel]:
    """QMP ``migrate``'s ``channels`` argument -> ``{"main": ..., "cpr": ...}``, with QEMU 10's checks.

    ``single_main=True`` applies ``migrate-incoming``'s rule instead ("only one entry, for type
    'main'").  QEMU 10.0.2 crashes on a list without main; labkit answers QEMU's intended text.
    The cpr-transfer rule "missing 'cpr' migration channel" depends on the mode: the caller checks it.
    """
    if not isinstance(channels, list):
        raise MigrationChannelError("Invalid parameter type for 'channels', expected: array")
    if single_main and len(channels) > 1:
        raise MigrationChannelError("Channel list must have only one entry, for type 'main'")
    found: dict[str, MigrationChannel] = {}
    for i, obj in enumerate(channels):
        channel = parse_channel(obj, prefix=f"channels[{i}]")
        if channel.channel_type in found:
            raise MigrationChannelError(f"Channel list has more than one {channel.channel_type} entry")
        found[channel.channel_type] = channel
    if "main" not in found:
        raise MigrationChannelError("Channel list has no main entry")
    return found


# --------------------------------------------------------------------------------------------
# -incoming (incoming_option_parse, keyval)


def _keyval_parse(params: str, implied_key: str | None) -> dict[str, Any]:
    """util/keyval.c ``keyval_parse``: ``[implied,]a.b=v,c=w`` with ``,,`` escaping a comma."""
    root: dict[str, Any] = {}
    s = 0
    n = len(params)
    while s < n:
        end_key = s
        while end_key < n and params[end_key] not in "=,":
            end_key += 1
        if implied_key and end_key > s and (end_key == n or params[end_key] != "="):
            key, pos = implied_key, s  # the value starts right here
        else:
            key = params[s:end_key]
            for i, frag in enumerate(key.split(".")):
                if not (re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", frag) or (i and frag.isdigit())):
                    raise MigrationChannelError(f"Invalid parameter '{key}'")
            if end_key >= n or params[end_key] != "=":
                raise MigrationChannelError(f"Expected '=' after parameter '{key}'")
            pos = end_key + 1
        implied_key = None
        value = []
        while pos < n:
            if params[pos] == ",":
                if pos + 1 < n and params[pos + 1] == ",":
                    value.append(",")
                    pos += 2
                    continue
                pos += 1
                break
            value.append(params[pos])
            pos += 1
        s = pos
        cur = root
        frags = key.split(".")
        for i, frag in enumerate(frags[:-1]):
            nxt = cur.setdefault(frag, {})
            if not isinstance(nxt, dict):
                raise MigrationChannelError(f"Parameters '{'.'.join(frags[: i + 1])}.*' used inconsistently")
            cur = nxt
        if isinstance(cur.get(frags[-1]), dict):
            raise MigrationChannelError(f"Parameters '{key}.*' used inconsistently")
        cur[frags[-1]] = "".join(value)
    parsed: dict[str, Any] = _keyval_listify(root, "")
    return parsed


def _keyval_listify(d: dict[str, Any], key: str) -> Any:
    """Turn dicts whose keys are all indexes (``args.0``, ``args.1``) into lists, as keyval does."""
    for k, v in list(d.items()):
        if isinstance(v, dict):
            d[k] = _keyval_listify(v, f"{key}{k}.")
    indexes = [k for k in d if k.isdigit()]
    if not indexes:
        return d
    if len(indexes) != len(d):
        raise MigrationChannelError(f"Parameters '{key}*' used inconsistently")
    out = []
    for i in range(max(int(k) for k in indexes) + 1):
        if str(i) not in d:
            raise MigrationChannelError(f"Parameter '{key}{i}' missing")
        out.append(d[str(i)])
    return out


def parse_incoming_option(value: str) -> tuple[str, MigrationChannel | None]:
    """One ``-incoming`` value -> (channel type, channel), like vl.c ``incoming_option_parse``.

    ``defer`` gives ``("main", None)``; a URI is a main channel; anything else is a
    ``MigrationChannel`` in JSON (starts with ``{``) or keyval form with implied key ``channel-type``.
    """
    if value == "defer":
        return "main", None
    if migrate_is_uri(value):
        return "main", parse_uri(value)
    if value.startswith("{"):
        try:
            obj = json.loads(value)
        except json.JSONDecodeError as err:
            raise MigrationChannelError(f"JSON parse error, {err.msg}") from None
        channel = _visit_channel(_Visitor(keyval=False), obj, "")
    else:
        channel = _visit_channel(_Visitor(keyval=True), _keyval_parse(value, "channel-type"), "")
    return channel.channel_type, channel


# --------------------------------------------------------------------------------------------
# Rendering


def _address_to_json(addr: MigrationAddress) -> dict[str, Any]:
    out: dict[str, Any] = {"transport": addr.transport}
    if addr.transport == "socket":
        out["type"] = addr.type
        if addr.type == "unix":
            out["path"] = addr.path
        elif addr.type == "inet":
            out.update(host=addr.host, port=addr.port)
        elif addr.type == "vsock":
            out.update(cid=addr.cid, port=addr.port)
        else:
            out["str"] = addr.str
        out.update(addr.options)
    elif addr.transport == "exec":
        out["args"] = list(addr.args or [])
    elif addr.transport == "rdma":
        out.update(host=addr.host, port=addr.port, **addr.options)
    else:
        out.update(filename=addr.filename, offset=addr.offset)
    return out


def channel_to_json(ch: MigrationChannel) -> dict[str, Any]:
    """The QAPI JSON object of a channel, as QMP ``migrate``'s ``channels`` wants it."""
    return {"channel-type": ch.channel_type, "addr": _address_to_json(ch.addr)}


def _host_port(host: str | None, port: str | None) -> str:
    host = host or ""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def channel_to_uri(ch: MigrationChannel) -> str | None:
    """The URI spelling of a channel's address, or None when a URI cannot say it."""
    a = ch.addr
    if a.transport == "socket":
        if a.options:
            return None
        if a.type == "unix":
            return f"unix:{a.path}"
        if a.type == "inet":
            return f"tcp:{_host_port(a.host, a.port)}"
        if a.type == "vsock":
            return f"vsock:{a.cid}:{a.port}"
        return f"fd:{a.str}"
    if a.transport == "file":
        if a.filename is None or ",offset=" in a.filename:
            return None
        return f"file:{a.filename}" + (f",offset={a.offset}" if a.offset else "")
    if a.transport == "exec":
        args = a.args or []
        if len(args) == 3 and args[:2] == ["/bin/sh", "-c"]:
            return f"exec:{args[2]}"
        return None
    if a.options:
        return None
    return f"rdma:{_host_port(a.host, a.port)}"


def channel_to_incoming_arg(ch: MigrationChannel) -> str:
    """The ``-incoming`` argument for a channel: a URI for main when possible, else JSON."""
    if ch.channel_type == "main":
        uri = channel_to_uri(ch)
        if uri is not None:
            return uri
    return json.dumps(channel_to_json(ch), separators=(",", ":"))
