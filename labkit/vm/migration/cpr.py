"""CPR state: how cpr-transfer hands guest RAM (as memfd file descriptors) to the new QEMU.

In cpr-transfer the old QEMU does not copy guest RAM at all.  Every RAM block lives in a memfd, and
before the main migration starts, old QEMU sends those *file descriptors* to new QEMU over a UNIX
socket, the "cpr" channel.  New QEMU maps the same memfds (same inode, new virtual addresses), so
the guest's memory is simply still there.

Wire format on the cpr channel (QEMU 10; all integers big-endian)::

    offset  size      field
    0       4         QEMU_CPR_FILE_MAGIC   51 43 50 52  ("QCPR")
    4       4         QEMU_CPR_FILE_VERSION 00 00 00 01
            --- vmstate "CprState" v1: one QLIST of "cpr fd" v1 elements ---
    8       1         01                    another element follows   (put_qlist)
    9       4         namelen               strlen(name) + 1          (VMSTATE_UINT32)
    13      namelen   name + NUL            e.g. "pc.ram\\0"           (VMSTATE_VBUFFER_ALLOC_UINT32)
    ..      4         id                    signed, usually 0         (VMSTATE_INT32)
    ..      1         20 (" ")              dummy byte; the fd rides on it as SCM_RIGHTS
                                            ancillary data            (VMSTATE_FD -> qemu_file_put_fd)
    ..      1         01                    next element ... and so on
    ..      1         00                    end of list

    e.g. one fd named "pc.ram", id 0:
    51 43 50 52 | 00 00 00 01 | 01 | 00 00 00 07 | 70 63 2e 72 61 6d 00 | 00 00 00 00 | 20 | 00
     magic        version       ^    namelen       p  c  .  r  a  m  \\0   id            ^fd  end

There is no length in front of the list: the reader keeps reading elements until it meets the 0
byte.  The list is sent head first and QEMU inserts new fds at the head (``cpr_save_fd`` uses
``QLIST_INSERT_HEAD``), so the order on the wire is the reverse of registration.

Why a dummy byte: Linux only delivers ancillary data together with at least one byte of real data,
so ``qemu_file_put_fd`` first flushes what is buffered (so the byte stream stays in order), then
sends the single byte ``" "`` with the fd attached.  The receiver (``qemu_fill_buffer``) queues every
fd that arrives, and ``qemu_file_get_fd`` reads one byte and pops the first queued fd.

After sending, the source half-closes the socket (``shutdown(SHUT_WR)``) and waits for the
destination to close its end (a HUP): that is the destination's signal "I am listening on the
main channel now".  That handshake is the caller's business; this module only moves the bytes.

Checked against qemu/qemu with the code search: migration/cpr.c (``cpr_save_fd``,
``vmstate_cpr_fd``/``vmstate_cpr_state``, ``cpr_state_save``/``cpr_state_load`` and their messages
"Not a migration stream (bad magic %x)", "Unsupported migration stream version %d"),
migration/cpr-transfer.c (``cpr_transfer_output``/``cpr_transfer_input``, "bad cpr channel
address; must be unix", "bad cpr channel socket type; must be unix", listen backlog 1),
migration/vmstate-types.c (``put_qlist``/``get_qlist``: any non-zero marker continues the list;
``put_fd``/``get_fd``) and migration/qemu-file.c (``qemu_file_put_fd`` sends ``" "`` after a flush;
``qemu_file_get_fd`` pops the fd queue; later QEMU also insists the byte is ``" "`` and that an fd came
with it ("no FD come with service byte"); 10.0.2 checks neither. labkit is that strict and says so
in its message, followed by the line 10.0.2 ends with for a broken fd list, "vmstate_load_state error -5").
"""

from __future__ import annotations

import array
import os
import socket
import stat
import struct
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from labkit.vm.migration.channels import MigrationAddress, MigrationChannel, unix_connect, unix_listen

__all__ = [
    "QEMU_CPR_FILE_MAGIC",
    "QEMU_CPR_FILE_VERSION",
    "CprFd",
    "CprError",
    "CprAddressError",
    "cpr_state_save",
    "cpr_state_load",
    "cpr_fd_check",
    "cpr_transfer_output",
    "cpr_transfer_input",
    "cpr_inspect",
    "cpr_inspect_listen",
    "format_cpr_inspect",
    "describe_fd",
]

QEMU_CPR_FILE_MAGIC = 0x51435052  # "QCPR"
QEMU_CPR_FILE_VERSION = 1
CPR_DUMMY_BYTE = b" "  # the data byte every fd rides on
IO_BUF_SIZE = 32768  # QEMUFile's buffer size; one recvmsg reads at most this much
SCM_MAX_FD = 253  # Linux limit of fds in one SCM_RIGHTS message


@dataclass
class CprFd:
    """One entry of QEMU's CPR fd list: the fd of ``name``/``id`` (a RAM block is ``(name, 0)``)."""

    name: str
    id: int
    fd: int


class CprError(Exception):
    """CPR state could not be saved/loaded; the message is what QEMU would print (and then exit).

    Where labkit's message says more than QEMU's, ``qemu_line`` is the last line QEMU 10.0.2 prints for
    the same bytes (for anything wrong inside the fd list: "vmstate_load_state error -5")."""

    qemu_line: str | None = None


VMSTATE_LOAD_ERROR = "vmstate_load_state error -5"  # QEMU 10.0.2's last line for a bad or short fd list


class CprLimitError(CprError):
    """One of labkit's own limits on what it reads (QEMU has none): no QEMU line to add."""


class CprAddressError(CprError, ValueError):
    """The cpr channel address is not one QEMU accepts (a ValueError too, like a bad QMP argument)."""


# --------------------------------------------------------------------------------------------
# Saving (source)


def _encode_name(name: str) -> bytes:
    raw = name.encode("utf-8", "surrogateescape")
    if b"\0" in raw:
        raise ValueError(f"cpr fd name {name!r} contains a NUL byte")
    return raw + b"\0"


def cpr_state_save(sock: socket.socket, fds: list[CprFd]) -> int:
    """Send MAGIC, VERSION and the CprState fd list on a connected cpr socket.

    ``fds`` is sent in the order given; pass QEMU's list order (newest registration first) to
    match QEMU byte for byte.  Returns the number of data bytes sent (fds are not counted).  The
    caller half-closes the socket afterwards, as ``cpr_state_save`` does.  A send failure is
    reported the way QEMU reports it: ``vmstate_save_state error -1``.
    """
    out = bytearray(struct.pack(">II", QEMU_CPR_FILE_MAGIC, QEMU_CPR_FILE_VERSION))
    sent = 0
    try:
        for entry in fds:
            name = _encode_name(entry.name)
            out += b"\x01" + struct.pack(">I", len(name)) + name + struct.pack(">i", entry.id)
            # qemu_file_put_fd: flush first so the fd's byte keeps its place in the stream ...
            sock.sendall(out, socket.MSG_NOSIGNAL)
            sent += len(out)
            out.clear()
            # ... then one dummy byte carrying the fd as SCM_RIGHTS ancillary data.
            rights = array.array("i", [entry.fd])
            n = sock.sendmsg(
                [CPR_DUMMY_BYTE], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)], socket.MSG_NOSIGNAL
            )
            if n != 1:
                raise OSError(0, "short write of the fd's dummy byte")
            sent += 1
        out += b"\x00"  # end of the QLIST
        sock.sendall(out, socket.MSG_NOSIGNAL)
        sent += len(out)
    except OSError as err:
        raise CprError("vmstate_save_state error -1") from err
    return sent


# --------------------------------------------------------------------------------------------
# Loading (destination)


class _StreamSource:
    """A QEMUFile-like reader over a socket: a byte buffer plus the queue of received fds.

    Every fd the kernel hands us is remembered in ``received`` so that an error anywhere can
    close all of them; ``queue`` is QEMU's ``f->fds`` (fds not yet claimed by a dummy byte).
    """

    def __init__(self, sock: socket.socket, max_fds: int, max_bytes: int) -> None:
        self.sock = sock
        self.max_fds = max_fds
        self.max_bytes = max_bytes
        self.buf = bytearray()
        self.pos = 0
        self.offset = 0  # stream offset of buf[pos]
        self.total = 0
        self.eof = False
        self.queue: deque[int] = deque()
        self.received: list[int] = []
        self.raw = bytearray()  # every data byte received, for cpr-inspect

    def _fill(self) -> None:
        if self.eof:
            return
        room = max(self.max_fds - len(self.received), 0) + 1  # +1: tell "too many" apart from truncation
        ancbuf = socket.CMSG_SPACE(4 * min(room, SCM_MAX_FD))
        try:
            data, ancdata, flags, _ = self.sock.recvmsg(IO_BUF_SIZE, ancbuf, socket.MSG_CMSG_CLOEXEC)
        except TimeoutError:
            raise CprError(f"timed out reading CPR state at offset {self.offset}") from None
        except OSError as err:
            raise CprError(f"error reading CPR state at offset {self.offset}: {err.strerror}") from None
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
                self.received.extend(fds)
                self.queue.extend(fds)
        if flags & socket.MSG_CTRUNC:
            raise CprLimitError(
                f"CPR state: ancillary data truncated (MSG_CTRUNC) near offset {self.offset + len(self.buf) - self.pos}: "
                "more file descriptors were sent than fit"
            )
        if len(self.received) > self.max_fds:
            raise CprLimitError(f"CPR state carries too many file descriptors (more than {self.max_fds})")
        if not data:
            self.eof = True
            return
        self.total += len(data)
        if self.total > self.max_bytes:
            raise CprLimitError(f"CPR state is larger than {self.max_bytes} bytes")
        self.raw += data
        self.buf += data

    def read(self, n: int, what: str) -> bytes:
        while len(self.buf) - self.pos < n and not self.eof:
            self._fill()
        have = len(self.buf) - self.pos
        if have < n:
            raise CprError(
                f"CPR state truncated: stream ended at offset {self.offset + have} while reading {what} "
                f"({n} bytes needed at offset {self.offset}, {have} available)"
            )
        out = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        self.offset += n
        if self.pos > IO_BUF_SIZE:
            del self.buf[: self.pos]
            self.pos = 0
        return out

    def rest(self) -> bytes:
        """What is left unread (after a short read: the bytes that were there)."""
        return bytes(self.buf[self.pos :])

    def take_fd(self, what: str) -> int | None:
        at = self.offset
        byte = self.read(1, f"the dummy byte of {what}")
        if byte != CPR_DUMMY_BYTE:
            raise CprError(
                f"CPR state: unexpected byte 0x{byte[0]:02x} at offset {at} where the dummy byte ' ' of {what} belongs"
                " (QEMU 10.0.2 does not look at the byte; later QEMU refuses it: 'cpr-in unexpected service byte')"
            )
        if not self.queue:
            raise CprError(
                f"CPR state: no file descriptor came with the dummy byte of {what} at offset {at} "
                "(QEMU 10.0.2 takes fd -1 and misreads the rest of the list; later QEMU refuses it: "
                "'cpr-in no FD come with service byte')"
            )
        return self.queue.popleft()

    def close_all(self) -> None:
        for fd in self.received:
            try:
                os.close(fd)
            except OSError:
                pass
        self.received.clear()
        self.queue.clear()


class _BytesSource:
    """The same reader over captured bytes (no fds): used by :func:`cpr_inspect`."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def read(self, n: int, what: str) -> bytes:
        have = len(self.data) - self.offset
        if have < n:
            raise CprError(
                f"CPR state truncated: stream ended at offset {len(self.data)} while reading {what} "
                f"({n} bytes needed at offset {self.offset}, {have} available)"
            )
        out = self.data[self.offset : self.offset + n]
        self.offset += n
        return out

    def rest(self) -> bytes:
        return self.data[self.offset :]

    def take_fd(self, what: str) -> int | None:
        at = self.offset
        byte = self.read(1, f"the dummy byte of {what}")
        if byte != CPR_DUMMY_BYTE:
            raise CprError(
                f"CPR state: unexpected byte 0x{byte[0]:02x} at offset {at} where the dummy byte ' ' of {what} belongs"
            )
        return None


Field = Callable[[int, int, str, Any], None]  # (offset, size, field name, value)


def _cpr_parse(
    src: _StreamSource | _BytesSource, *, max_name: int, on_field: Field | None = None
) -> list[CprFd]:
    """Decode MAGIC, VERSION and the CprState list from ``src`` (QEMU's ``cpr_state_load``)."""

    def note(offset: int, size: int, name: str, value: Any) -> None:
        if on_field is not None:
            on_field(offset, size, name, value)

    header = b""
    try:
        at = src.offset
        header = src.read(4, "the magic")
        (magic,) = struct.unpack(">I", header)
        note(at, 4, "magic", magic)
        if magic != QEMU_CPR_FILE_MAGIC:
            raise CprError(f"Not a migration stream (bad magic {magic:x})")
        at = src.offset
        header += src.read(4, "the version")
        (version,) = struct.unpack(">I", header[4:])
        note(at, 4, "version", version)
        if version != QEMU_CPR_FILE_VERSION:
            raise CprError(f"Unsupported migration stream version {version}")
    except CprLimitError:
        raise
    except CprError as e:
        if "truncated" in str(e):  # qemu_get_be32() reads zeros past the end: QEMU names the value it got
            full = (header + src.rest()).ljust(8, b"\0")
            magic, version = struct.unpack(">II", full[:8])
            e.qemu_line = (
                f"Not a migration stream (bad magic {magic:x})"
                if magic != QEMU_CPR_FILE_MAGIC
                else f"Unsupported migration stream version {version}"
            )
        raise
    try:
        return _cpr_parse_list(src, max_name, note)
    except CprLimitError:
        raise
    except CprError as e:
        e.qemu_line = VMSTATE_LOAD_ERROR
        raise


def _cpr_parse_list(
    src: _StreamSource | _BytesSource, max_name: int, note: Field
) -> list[CprFd]:
    """vmstate_cpr_state's one field: the QLIST of cpr fds."""
    out: list[CprFd] = []
    while True:
        i = len(out)
        at = src.offset
        marker = src.read(1, f"the list marker before fds[{i}]")[0]
        note(at, 1, "marker", marker)
        if marker == 0:  # get_qlist: a 0 byte ends the list; any other value means "an element"
            break
        what = f"fds[{i}]"
        at = src.offset
        (namelen,) = struct.unpack(">I", src.read(4, f"{what}.namelen"))
        note(at, 4, f"{what}.namelen", namelen)
        if namelen == 0:
            raise CprError(f"CPR state: {what} has namelen 0 at offset {at}; a name holds at least its NUL")
        if namelen > max_name:
            raise CprError(
                f"CPR state: {what} name too long ({namelen} bytes at offset {at}, limit {max_name})"
            )
        at = src.offset
        raw = src.read(namelen, f"{what}.name")
        if raw[-1:] != b"\0" or b"\0" in raw[:-1]:
            raise CprError(f"CPR state: {what}.name at offset {at} is not one NUL-terminated string: {raw!r}")
        name = raw[:-1].decode("utf-8", "surrogateescape")
        note(at, namelen, f"{what}.name", name)
        at = src.offset
        (ident,) = struct.unpack(">i", src.read(4, f"{what}.id"))
        note(at, 4, f"{what}.id", ident)
        at = src.offset
        fd = src.take_fd(f"{what} ({name!r})")
        note(at, 1, f"{what}.fd", fd)
        out.append(CprFd(name, ident, -1 if fd is None else fd))
    return out


def _load(
    sock: socket.socket, max_fds: int, max_name: int, max_bytes: int
) -> tuple[list[CprFd], _StreamSource]:
    src = _StreamSource(sock, max_fds, max_bytes)
    try:
        entries = _cpr_parse(src, max_name=max_name)
    except BaseException:
        src.close_all()
        raise
    # Fds that arrived without being claimed by a dummy byte: QEMU closes them with the QEMUFile.
    used = {e.fd for e in entries}
    for fd in src.queue:
        if fd not in used:
            os.close(fd)
    src.queue.clear()
    return entries, src


def cpr_state_load(
    sock: socket.socket, *, max_fds: int = 64, max_name: int = 256, max_bytes: int = 1 << 20
) -> list[CprFd]:
    """Read one CPR state from an accepted cpr socket; returns the fds in wire order.

    On any error every fd received so far is closed and :class:`CprError` is raised with a message
    in QEMU's words where QEMU has them.  The socket is left open: closing it is the destination's
    signal to the source (see the module docstring).  A socket timeout set by the caller applies.
    """
    entries, _ = _load(sock, max_fds, max_name, max_bytes)
    return entries


# --------------------------------------------------------------------------------------------
# Checking a received fd


def describe_fd(fd: int, pid: int | str = "self") -> dict[str, Any]:
    """What /proc says an fd is: target, kind (memfd|file|socket|pipe|anon|other), inode, size."""
    target = os.readlink(f"/proc/{pid}/fd/{fd}")
    st = os.stat(f"/proc/{pid}/fd/{fd}")
    if target.startswith("/memfd:"):
        kind = "memfd"
    elif stat.S_ISSOCK(st.st_mode):
        kind = "socket"
    elif stat.S_ISFIFO(st.st_mode):
        kind = "pipe"
    elif target.startswith("anon_inode:"):
        kind = "anon"
    elif stat.S_ISREG(st.st_mode):
        kind = "file"
    elif stat.S_ISCHR(st.st_mode):
        kind = "character device"
    elif stat.S_ISBLK(st.st_mode):
        kind = "block device"
    elif stat.S_ISDIR(st.st_mode):
        kind = "directory"
    else:
        kind = "other"
    info: dict[str, Any] = {"fd": fd, "target": target, "kind": kind, "inode": st.st_ino}
    info["size"] = st.st_size if stat.S_ISREG(st.st_mode) else None
    if kind == "memfd":
        info["memfd_name"] = target[len("/memfd:") :].removesuffix(" (deleted)")
    return info


def cpr_fd_check(fd: int, *, name: str | None = None, allow_file: bool = False) -> dict[str, Any]:
    """Refuse an fd that cannot be a RAM block: not a memfd (or, with ``allow_file``, a regular file).
    Returns what /proc says it is (:func:`describe_fd`).  Messages say what the fd really is.

    Its size is not judged here: QEMU accepts any fd at least as large as the block, and what it does with
    a smaller one depends on the block (labkit.vm.memory, as qemu_ram_alloc_from_fd)."""
    label = f"cpr fd {fd}" + (f" for {name!r}" if name is not None else "")
    try:
        info = describe_fd(fd)
    except OSError as err:
        raise CprError(f"{label} is not an open file descriptor: {err.strerror}") from None
    wanted = "a memfd or a regular file" if allow_file else "a memfd"
    if info["kind"] != "memfd" and not (allow_file and info["kind"] == "file"):
        what = {"file": "regular file", "anon": "anonymous inode"}.get(info["kind"], info["kind"])
        article = "an" if what[0] in "aeiou" else "a"
        raise CprError(f"{label} is {article} {what} ({info['target']}), expected {wanted}")
    return info


# --------------------------------------------------------------------------------------------
# The cpr channel (migration/cpr-transfer.c)


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


# --------------------------------------------------------------------------------------------
# Teaching: decode a captured stream (labkit cpr-inspect)

_FIELD_NOTES = {
    "magic": lambda v: f"0x{v:08x} ('QCPR')" if v == QEMU_CPR_FILE_MAGIC else f"0x{v:08x} (bad magic)",
    "version": lambda v: f"{v}",
    "marker": lambda v: "1: a CprFd follows" if v else "0: end of the fd list",
}


def cpr_inspect(data: bytes, nfds: int | None = None) -> dict[str, Any]:
    """Decode captured CPR state bytes field by field, for teaching.

    Returns ``{"length", "fields": [{"offset", "size", "field", "value", "hex"}...], "fds":
    [{"name", "id", "offset", "fd_offset"}...], "complete", "error", "trailing", "nfds",
    "fds_match"}``.  ``nfds`` is how many fds arrived with the bytes, if known.
    """
    fields: list[dict[str, Any]] = []

    def on_field(offset: int, size: int, name: str, value: Any) -> None:
        fields.append(
            {
                "offset": offset,
                "size": size,
                "field": name,
                "value": value,
                "hex": data[offset : offset + size].hex(" "),
            }
        )

    src = _BytesSource(bytes(data))
    error = None
    entries: list[CprFd] = []
    try:
        entries = _cpr_parse(src, max_name=1 << 20, on_field=on_field)
    except CprError as err:
        error = str(err)
    fds = []
    for f in fields:
        if f["field"].endswith(".namelen"):
            fds.append({"offset": f["offset"] - 1})
        elif f["field"].endswith(".name"):
            fds[-1]["name"] = f["value"]
        elif f["field"].endswith(".id"):
            fds[-1]["id"] = f["value"]
        elif f["field"].endswith(".fd"):
            fds[-1]["fd_offset"] = f["offset"]
    complete = error is None
    return {
        "length": len(data),
        "fields": fields,
        "fds": fds,
        "count": len(entries),
        "complete": complete,
        "error": error,
        "trailing": len(data) - src.offset if complete else 0,
        "nfds": nfds,
        "fds_match": None if nfds is None or not complete else nfds == len(entries),
    }


def _format_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << (shift - 4)) == 0:
            return f"{n / (1 << shift):g} {unit}"
    return f"{n} B"


def format_cpr_inspect(report: dict[str, Any], fd_info: list[dict[str, Any]] | None = None) -> str:
    """Render :func:`cpr_inspect`'s report (plus optional :func:`describe_fd` results) as text."""
    lines = [
        f"CPR state: {report['length']} bytes"
        + (f", {report['nfds']} fds" if report["nfds"] is not None else "")
    ]
    lines.append(f"{'offset':>6}  {'size':>4}  {'field':<18} {'bytes':<24} value")
    for f in report["fields"]:
        note = _FIELD_NOTES.get(f["field"])
        value = note(f["value"]) if note else repr(f["value"]) if isinstance(f["value"], str) else f["value"]
        if f["field"].endswith(".fd"):
            value = "' ' + SCM_RIGHTS" + ("" if f["value"] is None else f" -> fd {f['value']}")
        hexs = f["hex"] if len(f["hex"]) <= 24 else f["hex"][:20] + " ..."
        lines.append(f"{f['offset']:>6}  {f['size']:>4}  {f['field']:<18} {hexs:<24} {value}")
    if report["error"]:
        lines.append(f"error: {report['error']}")
    if report["trailing"]:
        lines.append(f"{report['trailing']} trailing bytes after the end of the list")
    for i, info in enumerate(fd_info or []):
        entry = report["fds"][i] if i < len(report["fds"]) else {}
        lines.append(
            f"fd[{i}] {entry.get('name', '?')!r} id {entry.get('id', '?')}: {info['kind']} {info['target']}, "
            f"inode {info['inode']}, size {_format_size(info['size'])}"
        )
    return "\n".join(lines)


def cpr_inspect_listen(
    path: str, *, timeout: float | None = None, file: TextIO | None = sys.stdout
) -> dict[str, Any]:
    """Listen on ``path`` like a destination QEMU, receive one CPR state, print what came.

    For each fd it prints what /proc says (memfd name, inode, size), then closes the fds and the
    connection (which also tells a waiting source "go ahead").  Returns the report with
    ``"fd_info"`` added.
    """
    conn = cpr_transfer_input(MigrationAddress("socket", "unix", path=path), timeout=timeout)
    try:
        conn.settimeout(timeout)
        entries, src = _load(conn, 64, 4096, 1 << 20)
    finally:
        conn.close()
    try:
        fd_info = [describe_fd(e.fd) for e in entries]
    finally:
        for e in entries:
            os.close(e.fd)
    report = cpr_inspect(bytes(src.raw), nfds=len(src.received))
    report["fd_info"] = fd_info
    if file is not None:
        print(format_cpr_inspect(report, fd_info), file=file)
    return report


def main(argv: list[str] | None = None) -> int:
    """``labkit cpr-inspect PATH [--timeout S]`` (also ``python -m labkit.vm.migration.cpr``).

    Point a source's cpr channel at PATH: the tool plays destination for the CPR state only,
    prints it, and closes the connection (so a real source then fails to connect its main channel).
    """
    import argparse

    parser = argparse.ArgumentParser(
        prog="cpr-inspect", description="Receive one CPR state on a unix socket and show what it holds."
    )
    parser.add_argument("path", help="unix socket path to listen on (the source's cpr channel path)")
    parser.add_argument("timeout_pos", nargs="?", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    args = parser.parse_args(argv)
    timeout = args.timeout if args.timeout is not None else args.timeout_pos
    try:
        cpr_inspect_listen(args.path, timeout=timeout)
    except CprError as err:
        print(f"cpr-inspect: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
