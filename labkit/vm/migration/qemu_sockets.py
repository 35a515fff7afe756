"""Opening a migration channel, either side (QEMU's util/qemu-sockets.c, migration/socket.c and file.c):
connect or listen on unix, inet and fd sockets, open a file at its offset, with QEMU's error texts.

Apart from channels.py, which only parses and renders addresses, because this is the part that touches the
system: the cpr channel (cpr_transfer.py) and the main channel (precopy.py) both open theirs here.
"""

from __future__ import annotations

import contextlib
import errno
import io
import ipaddress
import os
import re
import socket
import stat
from typing import Any

from labkit.vm.migration.channels import (
    DEFAULT_INET_HOST,
    MigrationAddress,
    MigrationChannel,
    MigrationChannelError,
)


def _unix_sockaddr_check(path: str) -> None:
    if len(os.fsencode(path)) >= 108:  # sizeof(sun_path) incl. NUL
        raise MigrationChannelError(f"UNIX socket path '{path}' is too long")


def _unsupported(addr: MigrationAddress) -> MigrationChannelError:
    what = addr.transport if addr.transport != "socket" else f"socket type {addr.type}"
    return MigrationChannelError(f"labkit does not support the {what} migration transport")


def migration_connect(ch: MigrationChannel, timeout: float | None) -> socket.socket | io.RawIOBase:
    """Source side of a main channel: connect a unix/inet socket, or open a file for writing.

    Error texts follow util/qemu-sockets.c (``Failed to connect to '%s'``) and migration/file.c.
    """
    a = ch.addr
    if a.transport == "socket" and a.type == "unix":
        assert a.path is not None
        _unix_sockaddr_check(a.path)
        try:
            return unix_connect(a.path, timeout)
        except OSError as err:
            raise MigrationChannelError(
                f"Failed to connect to '{a.path}': {os.strerror(err.errno or 110)}"
            ) from None
    if a.transport == "socket" and a.type == "inet":
        try:
            sock = socket.create_connection((a.host or DEFAULT_INET_HOST, a.port_number), timeout=timeout)
        except OSError as err:
            reason = os.strerror(err.errno) if err.errno else str(err)
            raise MigrationChannelError(f"Failed to connect to '{a.host}:{a.port}': {reason}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    if a.transport == "socket" and a.type == "fd":
        return _socket_from_fd_str(a.str or "")
    if a.transport == "file":
        assert a.filename is not None
        try:
            fd = os.open(a.filename, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise MigrationChannelError(f"Unable to open {a.filename}: {os.strerror(err.errno or errno.EIO)}") from None
        # migration/file.c: keep what precedes the offset, drop anything after it, write from there.
        try:
            os.ftruncate(fd, a.offset)
        except OSError as err:
            os.close(fd)
            raise MigrationChannelError(
                f"failed to truncate migration file to offset {a.offset:x}: {os.strerror(err.errno or errno.EIO)}"
            ) from None
        os.lseek(fd, a.offset, os.SEEK_SET)
        return io.FileIO(fd, "wb", closefd=True)
    raise _unsupported(a)


def _socket_from_fd_str(fdstr: str) -> socket.socket:
    """util/qemu-sockets.c ``socket_get_fd`` without a monitor: the string must be an fd number."""
    if not re.fullmatch(r"-?[0-9]+", fdstr):
        raise MigrationChannelError(f"Unable to parse FD number {fdstr}: {os.strerror(22)}")
    fd = int(fdstr)
    try:
        mode = os.fstat(fd).st_mode
    except OSError as err:
        raise MigrationChannelError(
            f"File descriptor '{fdstr}' is not valid: {err.strerror}"
        ) from None
    if not stat.S_ISSOCK(mode):
        raise MigrationChannelError(f"File descriptor '{fdstr}' is not a socket")
    return socket.socket(fileno=fd)


def unix_connect(path: str, timeout: float | None) -> socket.socket:
    """A connected unix stream socket (blocking once connected); OSError as connect(2) gives it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    sock.settimeout(None)
    return sock


def unix_listen(path: str, backlog: int = 1) -> socket.socket:
    """A listening unix socket at `path`, mode 0600, that appears only once it listens.

    The socket is bound under a temporary name beside `path`, made 0600 before it can be reached, put to
    listen, then renamed into place: a client that sees the path can connect at once (no window between
    bind and listen where it would be refused), and never through a wider mode. A stale socket file at
    `path` is replaced, as QEMU's unix_listen_saddr removes it.
    """
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}.tmp")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.fchmod(sock.fileno(), 0o600)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        sock.bind(tmp)
        os.chmod(tmp, 0o600)
        sock.listen(backlog)
        os.replace(tmp, path)
    except OSError:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return sock


def migration_listen(ch: MigrationChannel) -> socket.socket | None:
    """Destination side of a main channel: a listening unix (mode 0600) or inet socket.

    Inet listeners bind only the host given (127.0.0.1 when empty); a port of 0 is bound as given
    (whether that is allowed is the caller's policy).  ``file`` returns None: the stream is read on
    demand with :func:`open_incoming_file`.
    """
    a = ch.addr
    if a.transport == "file":
        return None
    if a.transport == "socket" and a.type == "unix":
        assert a.path is not None
        _unix_sockaddr_check(a.path)
        try:
            return unix_listen(a.path)
        except OSError as err:
            raise MigrationChannelError(
                f"Failed to bind socket to {a.path}: {os.strerror(err.errno or 22)}"
            ) from None
    if a.transport == "socket" and a.type == "inet":
        host = a.host or DEFAULT_INET_HOST
        try:
            family = (
                socket.AF_INET6
                if isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
                else socket.AF_INET
            )
        except ValueError:
            family = socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, a.port_number))
            sock.listen(1)
        except OSError as err:
            sock.close()
            raise MigrationChannelError(f"Failed to bind socket: {os.strerror(err.errno or 22)}") from None
        return sock
    if a.transport == "socket" and a.type == "fd":
        sock = _socket_from_fd_str(a.str or "")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.listen(1)
        return sock
    raise _unsupported(a)


def open_incoming_file(ch: MigrationChannel) -> io.RawIOBase:
    """Open a ``file`` channel for reading, positioned at its offset (migration/file.c)."""
    a = ch.addr
    if a.transport != "file" or a.filename is None:
        raise MigrationChannelError("open_incoming_file needs a channel of transport file")
    try:
        f = io.FileIO(a.filename, "rb")
    except OSError as err:
        raise MigrationChannelError(f"Unable to open {a.filename}: {os.strerror(err.errno or errno.EIO)}") from None
    f.seek(a.offset)
    return f


def socket_address(sock: socket.socket, channel: MigrationChannel) -> dict[str, Any]:
    """A listening socket's address as QMP's SocketAddress (socket_sockaddr_to_address): what QEMU lists
    under the destination's socket-address, with the port the kernel chose for port 0. A unix socket is
    named by the path asked for (labkit binds a temporary name and renames it into place)."""
    if sock.family == socket.AF_UNIX:
        name = channel.addr.path or sock.getsockname()
        return {"path": name.decode() if isinstance(name, bytes) else name, "type": "unix"}
    host, port = sock.getsockname()[:2]
    family = "ipv4" if sock.family == socket.AF_INET else "ipv6"
    return {"host": host, "port": str(port), family: True, "type": "inet"}
