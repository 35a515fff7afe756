"""The cpr channel (QEMU's migration/cpr-transfer.c), both sides: the source connects it, sends the RAM fds and
waits for the hang-up; the destination listens on it before anything else exists, accepts once, and closes
it to say "I listen on main now".

Apart from cpr.py, which only encodes and decodes CPR state, so the wire format can be read (and inspected)
without the sockets and the hand-shake around it. CprTransferMigration is a mixin of migration.MigrationState.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat

from labkit.vm.migration.channels import MigrationAddress, MigrationChannel
from labkit.vm.migration.cpr import CprAddressError, CprError, CprFd, cpr_state_save
from labkit.vm.migration.qemu_sockets import unix_connect, unix_listen
from labkit.vm.migration.state import MigrationStateBase


def _addr(channel: MigrationChannel | MigrationAddress) -> MigrationAddress:
    return channel.addr if isinstance(channel, MigrationChannel) else channel


def cpr_transfer_output(
    channel: MigrationChannel | MigrationAddress, timeout: float | None = None
) -> socket.socket:
    """Source side: connect to the destination's cpr socket (only ``socket``/``unix`` is allowed)."""
    a = _addr(channel)
    if a.transport != "socket" or a.type != "unix" or not a.path:
        raise CprAddressError("bad cpr channel address; must be unix")
    if len(os.fsencode(a.path)) >= 108:
        raise CprError(f"UNIX socket path '{a.path}' is too long")
    try:
        sock = unix_connect(a.path, timeout)
    except OSError as err:
        reason = os.strerror(err.errno) if err.errno else "Connection timed out"
        raise CprError(f"Failed to connect to '{a.path}': {reason}") from None
    return sock


def _listen_cleanup(listener: socket.socket, path: str | None) -> None:
    """Close a listening socket and remove its socket file, as QEMU's socket_listen_cleanup does.

    The path is passed in: the socket was bound under a temporary name and renamed (channels.unix_listen),
    so getsockname() no longer names the file; a pre-opened listener (type=fd) is still asked."""
    if path is None:
        try:
            name = listener.getsockname()
            path = name if isinstance(name, str) and name else None
        except OSError:
            path = None
    listener.close()
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _cpr_listener(a: MigrationAddress) -> socket.socket:
    if a.type == "unix":
        assert a.path is not None
        if len(os.fsencode(a.path)) >= 108:
            raise CprError(f"UNIX socket path '{a.path}' is too long")
        try:
            return unix_listen(a.path)  # 0600, and listening before the path appears
        except OSError as err:
            raise CprError(f"Failed to bind socket to {a.path}: {err.strerror}") from None
    # type=fd: a listening socket the parent pre-opened and passed by number (QEMU's qtest does this).
    fdstr = a.str or ""
    if not fdstr.lstrip("-").isdigit():
        raise CprError(f"Unable to parse FD number {fdstr}: Invalid argument")
    try:
        st = os.fstat(int(fdstr))
    except OSError as err:
        raise CprError(f"File descriptor '{fdstr}' is not valid: {err.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise CprError(f"File descriptor '{fdstr}' is not a socket")
    listener = socket.socket(fileno=int(fdstr))
    if not listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        listener.listen(1)
    return listener


def cpr_transfer_input(
    channel: MigrationChannel | MigrationAddress, timeout: float | None = None
) -> socket.socket:
    """Destination side: listen on the cpr channel (unix path, mode 0600, or a pre-opened listening
    fd), accept exactly one connection and close the listener.  QEMU blocks here forever before its
    monitor exists; ``timeout`` (seconds) is labkit's escape hatch."""
    a = _addr(channel)
    if a.transport != "socket" or a.type not in ("unix", "fd"):
        raise CprAddressError("bad cpr channel socket type; must be unix")
    listener = _cpr_listener(a)
    try:
        listener.settimeout(timeout)
        conn, _ = listener.accept()
    except TimeoutError:
        where = a.path if a.type == "unix" else f"fd {a.str}"
        raise CprError(
            f"timed out after {timeout} s waiting for the source on the cpr channel {where}"
        ) from None
    finally:
        _listen_cleanup(listener, a.path if a.type == "unix" else None)
    conn.settimeout(None)
    return conn


class CprTransferMigration(MigrationStateBase):
    """cpr-transfer's first phase on both sides: the source sends the RAM fds and waits for the hang-up; the
    destination, which loaded them at start-up, hangs up once it listens on main."""

    # -- source ---------------------------------------------------------------------------------------------
    def cpr_state_save(self, channel: MigrationChannel) -> None:
        """cpr_state_save(): connect the cpr channel, send every RAM fd, half-close to await the hang-up."""
        sock = cpr_transfer_output(channel)
        self.cpr_out = sock
        self.checkpoint("labkit-cpr-connected")  # labkit's marks for the sequence diagram (labkit.measure.plots)
        # cpr_save_fd() inserts at the head of its list: the block registered last goes first on the wire
        fds = [CprFd(name, 0, fd) for name, fd in reversed(self.vm.ram.cpr_fds())]
        self.bytes_cpr = cpr_state_save(sock, fds)
        self.checkpoint("labkit-cpr-fds-sent")
        sock.shutdown(socket.SHUT_WR)
        self.checkpoint("labkit-cpr-shut-wr")

    def _cpr_hup(self) -> None:
        """The destination closed the cpr channel (it listens on main now, or it died): finish."""
        self.checkpoint("labkit-cpr-hup")
        self.close_cpr_out()
        if self.status == "setup":
            self.qmp_migrate_finish()

    def close_cpr_out(self) -> None:
        if self.cpr_out is not None:
            with contextlib.suppress(ValueError, OSError):
                if self.vm.loop is not None:
                    self.vm.loop.remove_reader(self.cpr_out.fileno())
            self.cpr_out.close()
            self.cpr_out = None

    # -- destination ----------------------------------------------------------------------------------------
    def incoming_cpr(self, sock: socket.socket, marks: tuple[tuple[str, int], ...] = ()) -> None:
        """CPR state was loaded at start-up: remember the socket; closing it tells the source we listen.
        `marks` are the start-up's own checkpoints (no Migration existed yet to record them)."""
        self.cpr_in = sock
        self.incoming_mode = "cpr-transfer"
        self.checkpoints += list(marks)

    def cpr_state_close(self) -> None:
        if isinstance(self.cpr_in, socket.socket) and self.cpr_in.fileno() >= 0:
            self.checkpoint("labkit-cpr-closed")  # the hang-up the source waits for
        if self.cpr_in is not None:
            self.cpr_in.close()
            self.cpr_in = None
