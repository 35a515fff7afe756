"""CPR state (QEMU's migration/cpr.c): how cpr-transfer hands guest RAM (as memfd file descriptors) to the new QEMU.

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
main channel now".  That handshake, and opening the cpr channel, are cpr_transfer.py's; this module only
moves the bytes (``labkit cpr-inspect`` decodes them: cpr_inspect.py).

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
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from labkit.errors import LabkitError

__all__ = [
    "QEMU_CPR_FILE_MAGIC",
    "QEMU_CPR_FILE_VERSION",
    "CprFd",
    "CprError",
    "CprAddressError",
    "cpr_state_save",
    "cpr_state_load",
    "cpr_fd_check",
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


class CprError(LabkitError):
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


def cpr_fd_name(name: str) -> bytes:
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
            name = cpr_fd_name(entry.name)
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


class BytesSource:
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


def cpr_state_parse(
    src: _StreamSource | BytesSource, *, max_name: int, on_field: Field | None = None
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
        return cpr_parse_list(src, max_name, note)
    except CprLimitError:
        raise
    except CprError as e:
        e.qemu_line = VMSTATE_LOAD_ERROR
        raise


def cpr_parse_list(
    src: _StreamSource | BytesSource, max_name: int, note: Field
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


def cpr_state_receive(
    sock: socket.socket, max_fds: int, max_name: int, max_bytes: int
) -> tuple[list[CprFd], _StreamSource]:
    src = _StreamSource(sock, max_fds, max_bytes)
    try:
        entries = cpr_state_parse(src, max_name=max_name)
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
    entries, _ = cpr_state_receive(sock, max_fds, max_name, max_bytes)
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
