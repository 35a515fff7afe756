"""The QMP server inside each emulated VM process, built to behave like QEMU 10.0's monitor.

A real QMP client (qemu.qmp's ``QMPClient``, its legacy ``QEMUMonitorProtocol``, ``qmp-shell``)
should not be able to tell this server from QEMU on the commands it has, so the pieces below are
small Python ports of the QEMU code a learner can read side by side:

==========================  ==========================================================
this module                 QEMU 10.0
==========================  ==========================================================
``JSONLexer``               qobject/json-lexer.c   (the same state table, error recovery)
``JSONMessageParser``       qobject/json-streamer.c (brace counting, size/nesting limits)
``json_parser_parse``       qobject/json-parser.c  (error texts, QNum int64/uint64/double)
``qobject_to_json``         qobject/json-writer.c  (``"%.17g"``, ``\\uXXXX`` escapes)
``qdict_order``             qobject/qdict.c        (tdb_hash buckets decide member order)
``visit_args``              qapi/qobject-input-visitor.c (``Parameter 'x' is missing`` ...)
``Monitor._qmp_dispatch``   qapi/qmp-dispatch.c    (``QMP input member 'x' is unexpected``)
``_QMPSession``             monitor/qmp.c          (greeting, negotiation, request queue)
==========================  ==========================================================

Deliberate differences from QEMU (all in the direction of "never hurts a client"):

* A message larger than ``MAX_MESSAGE_SIZE`` (1 MiB; QEMU allows 64 MiB) is answered with QEMU's
  ``JSON token size limit exceeded`` and the rest of that object is *discarded* (braces are still
  counted, nothing is buffered, a lexical error such as a 0xFF byte ends it) instead of being
  re-lexed as new messages. The connection stays open.
* Non-finite floats returned by a handler are written as ``null`` (QEMU would write ``inf``).
* When a client half-closes its socket, requests already received are still answered.
* With several unexpected arguments, the one reported first follows QDict order (QEMU: GHashTable).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import math
import os
import re
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_MESSAGE_SIZE",
    "MAX_NESTING",
    "EVENT_BUFFER_LIMIT",
    "QMPError",
    "Monitor",
    "JSONLexer",
    "JSONMessageParser",
    "json_parser_parse",
    "qobject_to_json",
    "qdict_order",
]

log = logging.getLogger(__name__)

MAX_MESSAGE_SIZE = 1 << 20  # bytes of tokens in one message (QEMU's MAX_TOKEN_SIZE is 64 MiB)
MAX_TOKEN_COUNT = 2 << 20  # json-streamer.c
MAX_NESTING = 1 << 10  # json-streamer.c
EVENT_BUFFER_LIMIT = 4 << 20  # unsent bytes allowed to a client before it is dropped
WRITE_HIGH_WATER = 256 << 10  # replies wait (and reading stops) above this many unsent bytes
STALL_GRACE = 1.0  # seconds a client gets to read replies past the high-water mark before input is read on
LISTEN_BACKLOG = 16
INT64_MIN, INT64_MAX, UINT64_MAX = -(1 << 63), (1 << 63) - 1, (1 << 64) - 1


class QMPError(Exception):
    """A command failure answered as {"error": {"class": cls, "desc": desc}}."""

    def __init__(self, desc: str, cls: str = "GenericError"):
        super().__init__(desc)
        self.desc = desc
        self.cls = cls


# --------------------------------------------------------------------------------------------
# qobject/json-lexer.c: the same state machine, byte for byte.
# --------------------------------------------------------------------------------------------
(
    JSON_ERROR,
    IN_RECOVERY,
    IN_DQ_STRING_ESCAPE,
    IN_DQ_STRING,
    IN_SQ_STRING_ESCAPE,
    IN_SQ_STRING,
    IN_ZERO,
    IN_EXP_DIGITS,
    IN_EXP_SIGN,
    IN_EXP_E,
    IN_MANTISSA,
    IN_MANTISSA_DIGITS,
    IN_DIGITS,
    IN_SIGN,
    IN_KEYWORD,
    IN_START,
) = range(16)
JSON_MIN = 16
(
    JSON_LCURLY,
    JSON_RCURLY,
    JSON_LSQUARE,
    JSON_RSQUARE,
    JSON_COLON,
    JSON_COMMA,
    JSON_INTEGER,
    JSON_FLOAT,
    JSON_KEYWORD,
    JSON_STRING,
) = range(JSON_MIN, JSON_MIN + 10)
LOOKAHEAD = 0x80  # the transition does not consume the character


def _build_lexer_table() -> list[list[int]]:
    t = [[JSON_ERROR] * 256 for _ in range(IN_START + 1)]

    def put(state: int, chars: bytes | range, nxt: int) -> None:
        for c in chars:
            t[state][c] = nxt

    def terminal(state: int, token: int) -> None:
        put(state, range(256), token | LOOKAHEAD)

    put(IN_RECOVERY, range(0x00, 0x20), IN_START | LOOKAHEAD)
    put(IN_RECOVERY, range(0x20, 0xFE), IN_RECOVERY)
    put(IN_RECOVERY, b"\xfe\xff", IN_START | LOOKAHEAD)
    put(IN_RECOVERY, b"\t", IN_RECOVERY)
    put(IN_RECOVERY, b"[]{}:,", IN_START | LOOKAHEAD)
    for esc, body, quote in (
        (IN_DQ_STRING_ESCAPE, IN_DQ_STRING, b'"'),
        (IN_SQ_STRING_ESCAPE, IN_SQ_STRING, b"'"),
    ):
        put(esc, range(0x20, 0xFE), body)
        put(body, range(0x20, 0xFE), body)
        put(body, b"\\", esc)
        put(body, quote, JSON_STRING)
    terminal(IN_ZERO, JSON_INTEGER)
    put(IN_ZERO, b"0123456789", JSON_ERROR)
    put(IN_ZERO, b".", IN_MANTISSA)
    terminal(IN_EXP_DIGITS, JSON_FLOAT)
    put(IN_EXP_DIGITS, b"0123456789", IN_EXP_DIGITS)
    put(IN_EXP_SIGN, b"0123456789", IN_EXP_DIGITS)
    put(IN_EXP_E, b"-+", IN_EXP_SIGN)
    put(IN_EXP_E, b"0123456789", IN_EXP_DIGITS)
    terminal(IN_MANTISSA_DIGITS, JSON_FLOAT)
    put(IN_MANTISSA_DIGITS, b"0123456789", IN_MANTISSA_DIGITS)
    put(IN_MANTISSA_DIGITS, b"eE", IN_EXP_E)
    put(IN_MANTISSA, b"0123456789", IN_MANTISSA_DIGITS)
    terminal(IN_DIGITS, JSON_INTEGER)
    put(IN_DIGITS, b"0123456789", IN_DIGITS)
    put(IN_DIGITS, b"eE", IN_EXP_E)
    put(IN_DIGITS, b".", IN_MANTISSA)
    put(IN_SIGN, b"0", IN_ZERO)
    put(IN_SIGN, b"123456789", IN_DIGITS)
    terminal(IN_KEYWORD, JSON_KEYWORD)
    put(IN_KEYWORD, b"abcdefghijklmnopqrstuvwxyz", IN_KEYWORD)
    put(IN_START, b'"', IN_DQ_STRING)
    put(IN_START, b"'", IN_SQ_STRING)
    put(IN_START, b"0", IN_ZERO)
    put(IN_START, b"123456789", IN_DIGITS)
    put(IN_START, b"-", IN_SIGN)
    for ch, tok in zip(
        b"{}[]:,", (JSON_LCURLY, JSON_RCURLY, JSON_LSQUARE, JSON_RSQUARE, JSON_COLON, JSON_COMMA), strict=True
    ):
        t[IN_START][ch] = tok
    put(IN_START, b"abcdefghijklmnopqrstuvwxyz", IN_KEYWORD)
    put(IN_START, b" \t\r\n", IN_START)
    return t


_LEXER_TABLE = _build_lexer_table()
# States that loop on themselves: skip such runs with one regex match instead of byte by byte.
_LEXER_SKIP = {
    IN_START: re.compile(rb"[ \t\r\n]*").match,
    IN_RECOVERY: re.compile(rb"[^\x00-\x08\x0a-\x1f\xfe\xff\[\]{}:,]*").match,
    IN_DQ_STRING: re.compile(rb'[^\x00-\x1f"\\\xfe\xff]*').match,
    IN_SQ_STRING: re.compile(rb"[^\x00-\x1f'\\\xfe\xff]*").match,
    IN_DIGITS: re.compile(rb"[0-9]*").match,
    IN_MANTISSA_DIGITS: re.compile(rb"[0-9]*").match,
    IN_EXP_DIGITS: re.compile(rb"[0-9]*").match,
    IN_KEYWORD: re.compile(rb"[a-z]*").match,
}


class JSONLexer:
    """json_lexer_feed(): turns a byte stream into tokens for a ``JSONMessageParser``.

    Input may arrive in arbitrary pieces; a token cut by a read boundary waits for the rest.
    Only the current, unfinished token is kept, and not even that while its message is being
    discarded for being too large.
    """

    def __init__(self, parser: JSONMessageParser):
        self.parser = parser
        self.state = IN_START
        self._buf = bytearray()  # the unfinished token

    def feed(self, data: bytes) -> None:
        buf = self._buf
        i, tok = len(buf), 0  # resume after the unfinished token: its bytes are already lexed
        buf += data
        n = len(buf)
        state = self.state
        table, skip, emit = _LEXER_TABLE, _LEXER_SKIP, self.parser.process_token
        while i < n:
            run = skip.get(state)
            if run is not None:
                i = run(buf, i).end()
                if state == IN_START or state == IN_RECOVERY:
                    tok = i
                if i >= n:
                    break
            nxt = table[state][buf[i]]
            if nxt & LOOKAHEAD:
                nxt &= ~LOOKAHEAD
            else:
                i += 1
            if nxt >= JSON_MIN:
                emit(nxt, bytes(buf[tok:i]))
                tok, state = i, IN_START
            elif nxt == IN_START or nxt == IN_RECOVERY:
                tok, state = i, nxt
            elif nxt == JSON_ERROR:
                emit(JSON_ERROR, bytes(buf[tok:i]))
                tok, state = i, IN_RECOVERY
            else:
                state = nxt
        self.state = state
        del buf[:tok]
        if buf:
            self.parser.check_partial(len(buf))
            if self.parser.discarding:
                buf.clear()  # text of a discarded token is never looked at


# --------------------------------------------------------------------------------------------
# qobject/json-streamer.c (QEMU 10.0): split the token stream into messages.
# --------------------------------------------------------------------------------------------
class JSONMessageParser:
    """Collects tokens until braces and brackets balance, then parses them as one message.

    ``emit(obj, None)`` is called for each parsed value, ``emit(None, desc)`` for each error,
    exactly where QEMU 10.0 would call handle_qmp_command().
    """

    def __init__(self, emit: Callable[[Any, str | None], None]):
        self.emit = emit
        self.brace_count = 0
        self.bracket_count = 0
        self.tokens: list[tuple[int, bytes]] = []
        self.token_size = 0
        self.discarding = False  # labkit: eating the rest of an oversized message

    def _reset(self) -> None:
        self.brace_count = self.bracket_count = 0
        self.tokens = []
        self.token_size = 0

    def check_partial(self, partial_len: int) -> None:
        """Refuse a message as soon as it outgrows the limit, even in the middle of a token."""
        if not self.discarding and self.token_size + partial_len + 1 > MAX_MESSAGE_SIZE:
            self._overflow()

    def _overflow(self) -> None:
        self.tokens = []
        self.token_size = 0
        self.discarding = True
        self.emit(None, "JSON token size limit exceeded")

    def process_token(self, type_: int, text: bytes) -> None:
        if type_ == JSON_LCURLY:
            self.brace_count += 1
        elif type_ == JSON_RCURLY:
            self.brace_count -= 1
        elif type_ == JSON_LSQUARE:
            self.bracket_count += 1
        elif type_ == JSON_RSQUARE:
            self.bracket_count -= 1
        if self.discarding:
            # A lexical error (e.g. the 0xFF byte qmp-spec suggests for resynchronising) also ends it.
            if type_ == JSON_ERROR or (self.brace_count <= 0 and self.bracket_count <= 0):
                self.discarding = False
                self._reset()
            return
        if type_ == JSON_ERROR:
            self._reset()
            self.emit(None, f"JSON parse error, stray '{_lossy(text)}'")
            return
        # Security consideration: limit memory per object and the recursion depth.
        if self.token_size + len(text) + 1 > MAX_MESSAGE_SIZE:
            self._overflow()
            if self.brace_count <= 0 and self.bracket_count <= 0:
                self.discarding = False
                self._reset()
            return
        if len(self.tokens) + 1 > MAX_TOKEN_COUNT:
            self._reset()
            self.emit(None, "JSON token count limit exceeded")
            return
        if self.bracket_count + self.brace_count > MAX_NESTING:
            self._reset()
            self.emit(None, "JSON nesting depth limit exceeded")
            return
        self.tokens.append((type_, text))
        self.token_size += len(text)
        if (
            (self.brace_count > 0 or self.bracket_count > 0)
            and self.brace_count >= 0
            and self.bracket_count >= 0
        ):
            return
        tokens = self.tokens
        self._reset()
        try:
            obj = json_parser_parse(tokens)
        except _ParseError as e:
            self.emit(None, "JSON parse error, " + str(e))
        else:
            self.emit(obj, None)


# --------------------------------------------------------------------------------------------
# qobject/json-parser.c and util/unicode.c
# --------------------------------------------------------------------------------------------
class _ParseError(Exception):
    pass


_MIN_CP = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)
_NONCHAR_RE = re.compile(
    "[\ufdd0-\ufdef" + "".join(chr(p << 16 | 0xFFFE) + chr(p << 16 | 0xFFFF) for p in range(17)) + "]"
)


def _valid_codepoint(cp: int) -> bool:
    return (
        0 <= cp <= 0x10FFFF
        and not (0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE)
        and not 0xD800 <= cp <= 0xDFFF
    )


def _mod_utf8_codepoint(b: bytes, i: int) -> tuple[int, int]:
    """mod_utf8_codepoint(): decode one modified-UTF-8 sequence at b[i]; (-1, end) if invalid."""
    byte = b[i]
    p = i + 1
    if byte < 0x80:
        return byte, p
    if byte >= 0xFE or not byte & 0x40:
        return -1, p
    length, mask = 0, 0x80
    while byte & mask:
        length += 1
        mask >>= 1
    cp = byte & (mask - 1)
    for _ in range(1, length):
        nb = b[p] if p < len(b) else 0
        if nb & 0xC0 != 0x80:
            return -1, p
        p += 1
        cp = cp << 6 | nb & 0x3F
    if not _valid_codepoint(cp) or (cp < _MIN_CP[length - 2] and not (cp == 0 and length == 2)):
        cp = -1
    return cp, p


def _lossy(b: bytes) -> str:
    """Bytes of a C string as QEMU's JSON writer would show them (invalid sequences -> U+FFFD)."""
    b = b.split(b"\0", 1)[0]
    try:
        s = b.decode("utf-8")
        if not _NONCHAR_RE.search(s):
            return s
    except UnicodeDecodeError:
        pass
    out, i = [], 0
    while i < len(b):
        cp, i = _mod_utf8_codepoint(b, i)
        out.append(chr(cp) if cp >= 0 else "\ufffd")
    return "".join(out)


def _cvt4hex(s: bytes, i: int) -> int:
    seg = s[i : i + 4]
    if len(seg) < 4 or not all(c in b"0123456789abcdefABCDEF" for c in seg):
        return -1
    return int(seg, 16)


_SIMPLE_ESCAPES = {ord(k): v for k, v in zip("\"'\\/bfnrt", "\"'\\/\b\f\n\r\t", strict=True)}


def _parse_string(token: bytes) -> str:
    quote = token[:1]
    body = token[1:-1]
    out: list[str] = []
    i, n = 0, len(body)
    while i < n:
        if body[i] != 0x5C:  # a run of raw (modified) UTF-8
            j = body.find(b"\\", i)
            j = n if j < 0 else j
            raw = body[i:j].replace(b"\xc0\x80", b"\0")
            try:
                s = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise _ParseError("invalid UTF-8 sequence in string") from None
            if _NONCHAR_RE.search(s):
                raise _ParseError("invalid UTF-8 sequence in string")
            out.append(s)
            i = j
            continue
        beg = i
        esc = body[i + 1]
        i += 2
        simple = _SIMPLE_ESCAPES.get(esc)
        if simple is not None:
            out.append(simple)
        elif esc == 0x75:  # \uXXXX, maybe a surrogate pair
            cp = _cvt4hex(body, i)
            i += 4
            if 0xD800 <= cp <= 0xDBFF and body[i : i + 2] == b"\\u":
                cp = 0x10000 + ((cp & 0x3FF) << 10)
                trailing = _cvt4hex(body, i + 2)
                if 0xDC00 <= trailing <= 0xDFFF:
                    cp |= trailing & 0x3FF
                    i += 6
                else:
                    cp = -1
            if not _valid_codepoint(cp):
                raise _ParseError(f"{_lossy((body + quote)[beg:i])} is not a valid Unicode character")
            out.append(chr(cp))
        else:
            raise _ParseError("invalid escape sequence in string")
    return "".join(out)


def _parse_literal(type_: int, text: bytes) -> Any:
    if type_ == JSON_STRING:
        return _parse_string(text)
    if type_ == JSON_INTEGER and len(text) <= 21:
        # QNUM_I64 if possible, else QNUM_U64, else a double (like strtod)
        v = int(text)
        if INT64_MIN <= v <= UINT64_MAX:
            return v
    return float(text)


def json_parser_parse(tokens: Sequence[tuple[int, bytes]]) -> Any:
    """json_parser_parse(): QEMU's recursive descent, unrolled so 1024 levels need no recursion.

    Raises _ParseError with QEMU's text (without the "JSON parse error, " prefix).
    """
    pos, n = 0, len(tokens)
    # frame: [container, is_object, pending key (None while the key itself is being parsed)]
    stack: list[list[Any]] = []
    while True:
        if pos >= n:
            raise _ParseError("premature EOI")
        type_, text = tokens[pos]
        if type_ == JSON_LCURLY or type_ == JSON_LSQUARE:
            pos += 1
            if pos >= n:
                raise _ParseError("premature EOI")
            if tokens[pos][0] == (JSON_RCURLY if type_ == JSON_LCURLY else JSON_RSQUARE):
                pos += 1
                value: Any = {} if type_ == JSON_LCURLY else []
            else:
                stack.append([{} if type_ == JSON_LCURLY else [], type_ == JSON_LCURLY, None])
                continue
        elif type_ in (JSON_INTEGER, JSON_FLOAT, JSON_STRING):
            pos += 1
            value = _parse_literal(type_, text)
        elif type_ == JSON_KEYWORD:
            pos += 1
            if text == b"true":
                value = True
            elif text == b"false":
                value = False
            elif text == b"null":
                value = None
            else:
                raise _ParseError(f"invalid keyword '{_lossy(text)}'")
        else:
            raise _ParseError("expecting value")
        # hand the finished value to the containers that are waiting for it
        while True:
            if not stack:
                return value
            frame = stack[-1]
            if frame[1]:
                if frame[2] is None:
                    if type(value) is not str:
                        raise _ParseError("key is not a string in object")
                    frame[2] = value
                    if pos >= n:
                        raise _ParseError("premature EOI")
                    if tokens[pos][0] != JSON_COLON:
                        raise _ParseError("missing : in object pair")
                    pos += 1
                    break
                if frame[2] in frame[0]:
                    raise _ParseError("duplicate key")
                frame[0][frame[2]] = value
                frame[2] = None
                if pos >= n:
                    raise _ParseError("premature EOI")
                sep = tokens[pos][0]
                pos += 1
                if sep == JSON_RCURLY:
                    value = stack.pop()[0]
                    continue
                if sep != JSON_COMMA:
                    raise _ParseError("expected separator in dict")
                break
            frame[0].append(value)
            if pos >= n:
                raise _ParseError("premature EOI")
            sep = tokens[pos][0]
            pos += 1
            if sep == JSON_RSQUARE:
                value = stack.pop()[0]
                continue
            if sep != JSON_COMMA:
                raise _ParseError("expected separator in list")
            break


# --------------------------------------------------------------------------------------------
# qobject/qdict.c member order and qobject/json-writer.c
# --------------------------------------------------------------------------------------------
QDICT_BUCKET_MAX = 512


@functools.lru_cache(maxsize=8192)
def _qdict_bucket(key: str) -> int:
    """tdb_hash(key) % QDICT_BUCKET_MAX, over the key's modified UTF-8 bytes."""
    name = key.encode("utf-8", "surrogatepass").replace(b"\0", b"\xc0\x80")
    value = (0x238F13AF * len(name)) & 0xFFFFFFFF
    for i, c in enumerate(name):
        value = (value + (c << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * value + 12345) & 0xFFFFFFFF) % QDICT_BUCKET_MAX


def qdict_order(d: dict) -> list:
    """Keys of ``d`` in the order QEMU walks a QDict built by inserting them in ``d``'s order.

    QDict is a 512-bucket hash table (newest entry first within a bucket); QEMU's replies,
    events and its first-error-wins checks all follow this order, so labkit does too.
    """
    keys = list(d)
    return [k for _, k in sorted(enumerate(keys), key=lambda e: (_qdict_bucket(e[1]), -e[0]))]


_ESCAPE_RE = re.compile('[\x00-\x1f"\\\\\x7f-\U0010ffff]')
_WRITER_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match) -> str:
    c = m.group()
    simple = _WRITER_ESCAPES.get(c)
    if simple:
        return simple
    cp = ord(c)
    if 0xD800 <= cp <= 0xDFFF:
        cp = 0xFFFD
    if cp > 0xFFFF:
        cp -= 0x10000
        return f"\\u{0xD800 + (cp >> 10):04X}\\u{0xDC00 + (cp & 0x3FF):04X}"
    return f"\\u{cp:04X}"


def _quoted_str(s: str) -> str:
    return '"' + _ESCAPE_RE.sub(_escape, s) + '"'


def _scalar_to_json(v: Any) -> str:
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, str):
        return _quoted_str(v)
    if isinstance(v, int):
        return str(int(v))
    if isinstance(v, float):
        return f"{v:.17g}" if math.isfinite(v) else "null"
    raise TypeError(f"cannot send a {type(v).__name__} over QMP")


_END = object()


def qobject_to_json(root: Any) -> str:
    """qobject_to_json(): compact JSON exactly as QEMU writes it (iterative: ids may nest 1024 deep)."""
    parts: list[str] = []
    stack: list[list[Any]] = []  # [iterator, is_object, first]
    value = root
    while True:
        if isinstance(value, dict):
            if value:
                parts.append("{")
                stack.append([iter([(k, value[k]) for k in qdict_order(value)]), True, True])
            else:
                parts.append("{}")
        elif isinstance(value, (list, tuple)):
            if value:
                parts.append("[")
                stack.append([iter(value), False, True])
            else:
                parts.append("[]")
        else:
            parts.append(_scalar_to_json(value))
        while stack:
            top = stack[-1]
            item = next(top[0], _END)
            if item is _END:
                parts.append("}" if top[1] else "]")
                stack.pop()
                continue
            if not top[2]:
                parts.append(", ")
            top[2] = False
            if top[1]:
                key, value = item
                if not isinstance(key, str):
                    raise TypeError("QMP object keys must be strings")
                parts.append(_quoted_str(key))
                parts.append(": ")
            else:
                value = item
            break
        else:
            return "".join(parts)


def _encode(msg: dict) -> bytes:
    """qmp_send_response(): one JSON object per line (pure ASCII: everything else is escaped)."""
    return (qobject_to_json(msg) + "\n").encode("ascii")


# --------------------------------------------------------------------------------------------
# qapi/qobject-input-visitor.c: argument checking from a QAPI-like schema
# --------------------------------------------------------------------------------------------
_SCALAR_TYPES = ("str", "int", "number", "bool", "any", "dict", "list", "uint64", "size")


@dataclass(frozen=True)
class _Member:
    name: str
    optional: bool
    type: str  # one of _SCALAR_TYPES, or "enum"
    values: tuple[str, ...] = ()


def _parse_schema(args: dict[str, str | Sequence[str]] | None) -> tuple[_Member, ...]:
    members = []
    for key, typ in (args or {}).items():
        optional = key.startswith("*")
        name = key[1:] if optional else key
        if isinstance(typ, str):
            if typ not in _SCALAR_TYPES:
                raise ValueError(f"unknown QMP argument type {typ!r} for {name!r}")
            members.append(_Member(name, optional, typ))
        else:
            members.append(_Member(name, optional, "enum", tuple(typ)))
    return tuple(members)


def _invalid_type(name: str, word: str) -> QMPError:
    return QMPError(f"Invalid parameter type for '{name}', expected: {word}")


def visit_args(args: dict, members: Sequence[_Member]) -> dict:
    """The generated qmp_marshal_*() visit: members in schema order, then visit_check_struct()."""
    for m in members:
        if m.name not in args:
            if m.optional:
                continue
            raise QMPError(f"Parameter '{m.name}' is missing")
        v = args[m.name]
        t = m.type
        if t == "any":
            continue
        if t == "str" or t == "enum":
            if type(v) is not str:
                raise _invalid_type(m.name, "string")
            if t == "enum" and v not in m.values:
                raise QMPError(f"Parameter '{m.name}' does not accept value '{v}'")
        elif t == "int":
            if type(v) is not int or not INT64_MIN <= v <= INT64_MAX:
                raise _invalid_type(m.name, "integer")
        elif t == "uint64" or t == "size":
            if type(v) is not int or not INT64_MIN <= v <= UINT64_MAX:
                raise QMPError(f"Parameter '{m.name}' expects uint64")
            args[m.name] = v & UINT64_MAX  # negative values are accepted for compatibility
        elif t == "number":
            if type(v) not in (int, float):
                raise _invalid_type(m.name, "number")
            args[m.name] = float(v)
        elif t == "bool":
            if type(v) is not bool:
                raise _invalid_type(m.name, "boolean")
        elif t == "dict":
            if type(v) is not dict:
                raise _invalid_type(m.name, "object")
        elif t == "list":
            if type(v) is not list:
                raise _invalid_type(m.name, "array")
    known = {m.name for m in members}
    for key in qdict_order(args):
        if key not in known:
            raise QMPError(f"Parameter '{key}' is unexpected")
    return args


# --------------------------------------------------------------------------------------------
# monitor/qmp.c: one connected client
# --------------------------------------------------------------------------------------------
@dataclass
class _Command:
    name: str
    handler: Callable[..., Any]
    members: tuple[_Member, ...]
    allow_oob: bool = False
    builtin: bool = False  # built-ins also get the session (qmp_capabilities changes it)


class _QMPSession(asyncio.Protocol):
    """MonitorQMP for one connection: greeting, the negotiation state and the request queue.

    Like QEMU without OOB, requests are handled strictly one after the other, and input is not
    read while requests are queued. Like QEMU, input is read on while the client is slow to read our
    replies (a client that lets EVENT_BUFFER_LIMIT of them pile up is dropped instead).
    """

    def __init__(self, monitor: Monitor):
        self.monitor = monitor
        self.transport: asyncio.Transport | None = None
        self.negotiated = False  # mon->commands == &qmp_commands
        self.oob_enabled = False
        self.requests: deque[tuple[Any, str | None]] = deque()
        self.lexer = JSONLexer(JSONMessageParser(self._handle_qmp_command))
        self.lost = False
        self.eof = False
        self.reading_paused = False
        self.stalled = False  # replies above the high-water mark for STALL_GRACE: the client is not reading
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._wakeup = asyncio.Event()
        self._can_write = asyncio.Event()
        self._can_write.set()
        self.dispatcher: asyncio.Task | None = None

    # asyncio.Protocol callbacks -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.send(self.monitor._greeting())
        self.dispatcher = asyncio.get_running_loop().create_task(self._dispatcher_co())
        self.monitor._dispatchers.add(self.dispatcher)
        self.dispatcher.add_done_callback(self.monitor._dispatchers.discard)

    def data_received(self, data: bytes) -> None:
        self.lexer.feed(data)
        if self.requests and not self.reading_paused and not self.lost:
            self.transport.pause_reading()  # monitor_suspend()
            self.reading_paused = True

    def eof_received(self) -> bool:
        self.eof = True
        self._wakeup.set()
        return True  # keep writing the answers to what was already received

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.requests.clear()  # monitor_qmp_cleanup_queue_and_resume()
        self._can_write.set()
        self._wakeup.set()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self.stalled = False
        self._can_write.set()

    # ----------------------------------------------------------------------------------------
    def _handle_qmp_command(self, obj: Any, err: str | None) -> None:
        self.requests.append((obj, err))
        self._wakeup.set()

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.lost and not self.transport.is_closing():
            self.transport.write(data)

    def send_event(self, data: bytes) -> None:
        """Events cannot wait for a slow reader: drop a client that lets them pile up."""
        if self.transport is None or self.lost or self.transport.is_closing():
            return
        if self.transport.get_write_buffer_size() + len(data) > EVENT_BUFFER_LIMIT:
            log.warning("QMP client is not reading its events; disconnecting it")
            self.transport.abort()
            return
        self.transport.write(data)

    async def _client_stopped_reading(self) -> bool:
        """Replies are past the high-water mark. A client that reads gets STALL_GRACE to catch up (input
        waits meanwhile). One that does not: QEMU 10 keeps reading it however far behind it falls (its
        output buffer grows without bound); this monitor keeps reading too, so the sender never blocks, and
        drops the client once EVENT_BUFFER_LIMIT of answers are unread, as for events. True when dropped."""
        if not self.stalled:
            try:
                await asyncio.wait_for(self._can_write.wait(), STALL_GRACE)
                return False
            except TimeoutError:
                self.stalled = True  # until resume_writing(): the client drained what it had
        if self.transport.get_write_buffer_size() <= EVENT_BUFFER_LIMIT:
            return False
        log.warning("QMP client is not reading its replies; disconnecting it")
        self.transport.abort()
        return True

    async def _dispatcher_co(self) -> None:
        """monitor_qmp_dispatcher_co(): answer queued requests in order."""
        while not self.lost:
            if self.requests:
                obj, err = self.requests.popleft()
                if err is not None:
                    rsp = _encode({"error": {"class": "GenericError", "desc": err}})
                else:
                    rsp = await self.monitor._qmp_dispatch(self, obj)
                self.send(rsp)
                if not self._can_write.is_set() and await self._client_stopped_reading():
                    return
                continue
            if self.eof:
                self.transport.close()
                return
            if self.reading_paused:
                self.reading_paused = False
                self.transport.resume_reading()  # monitor_resume()
            self._wakeup.clear()
            await self._wakeup.wait()


# --------------------------------------------------------------------------------------------
# The monitor
# --------------------------------------------------------------------------------------------
class Monitor:
    """A QMP monitor served on a unix socket, one client at a time (``-qmp unix:P,server=on,wait=off``).

    Runs on the VM process's asyncio loop; only ``emit_event`` may be called from other threads.
    """

    def __init__(self, version: tuple[int, int, int] = (10, 0, 2), package: str = "labkit-vm"):
        self.version = tuple(version)
        self.package = package
        self._commands: dict[str, _Command] = {}
        self._listeners: list[Callable[[dict], None]] = []
        # While this answers True, events from other threads are stamped and queued but the loop thread is not
        # woken to send them (release_events does): the VM holds them while the guest is stopped for
        # migration's completion, so that no GIL hand-over to the loop thread lands inside the pause.
        self.hold_events: Callable[[], bool] | None = None
        self._event_lock = threading.RLock()
        self._event_queue: deque[tuple[_QMPSession, dict[str, Any]]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._lsock: socket.socket | None = None
        self._path: str | None = None
        self._inode: tuple[int, int] | None = None
        self._accept_task: asyncio.Task | None = None
        self._session: _QMPSession | None = None
        self._dispatchers: set[asyncio.Task] = set()
        self._register_builtin("qmp_capabilities", self._qmp_capabilities, {"*enable": "list"})
        self._register_builtin("query-version", lambda session, args: self._query_version(), None)
        self._register_builtin("query-commands", lambda session, args: self._query_commands(), None)

    # commands -------------------------------------------------------------------------------
    def register(
        self,
        name: str,
        handler: Callable[[dict], Any],
        args: dict[str, str | Sequence[str]] | None = None,
        *,
        allow_oob: bool = False,
    ) -> None:
        """Add a command. ``args`` is a QAPI-like schema: ``{"mode": "str", "*downtime-limit": "int"}``.

        A leading '*' marks an optional member; types are str, int (int64), number, bool, any,
        dict, list, uint64/size, or a sequence of strings for an enum. ``None`` means the
        command takes no arguments, as in QAPI. ``handler(args)`` returns the 'return' value
        (None -> {}), may be a coroutine function, and raises QMPError on failure.
        """
        if name in self._commands:
            raise ValueError(f"QMP command {name!r} is already registered")
        self._commands[name] = _Command(name, handler, _parse_schema(args), allow_oob)

    def _register_builtin(self, name: str, handler: Callable[..., Any], args: dict | None) -> None:
        self._commands[name] = _Command(name, handler, _parse_schema(args), builtin=True)

    def _qmp_capabilities(self, session: _QMPSession, args: dict) -> None:
        """qmp_qmp_capabilities() and qmp_caps_accept()."""
        enable = args.get("enable", [])
        for index, cap in enumerate(enable):
            if type(cap) is not str:
                raise _invalid_type(f"enable[{index}]", "string")
            if cap != "oob":
                raise QMPError(f"Parameter 'null' does not accept value '{cap}'")
        if session.negotiated:
            raise QMPError("Capabilities negotiation is already complete, command ignored", "CommandNotFound")
        session.oob_enabled = "oob" in enable
        session.negotiated = True

    def _query_version(self) -> dict:
        major, minor, micro = self.version
        return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": self.package}

    def _query_commands(self) -> list:
        return [{"name": name} for name in reversed(self._commands)]  # QAPI_LIST_PREPEND

    def _greeting(self) -> bytes:
        return _encode({"QMP": {"version": self._query_version(), "capabilities": ["oob"]}})

    async def _qmp_dispatch(self, session: _QMPSession, request: Any) -> bytes:
        """qmp_dispatch() + monitor_qmp_dispatch(): one request in, one encoded response out."""
        has_id = isinstance(request, dict) and "id" in request
        try:
            ret = await self._do_dispatch(session, request)
            rsp: dict = {"return": {} if ret is None else ret}
            if has_id:
                rsp["id"] = request["id"]
            return _encode(rsp)
        except QMPError as e:
            cls, desc = e.cls, e.desc
        except Exception as e:  # a handler bug must never take the monitor down
            log.exception("QMP command failed")
            cls, desc = "GenericError", str(e) or type(e).__name__
        if not session.negotiated and cls == "CommandNotFound":
            desc = "Expecting capabilities negotiation with 'qmp_capabilities'"
        rsp = {"error": {"class": cls, "desc": desc}}
        if has_id:
            rsp["id"] = request["id"]
        try:
            return _encode(rsp)
        except (TypeError, ValueError):
            return _encode({"error": {"class": cls, "desc": repr(desc)}})

    async def _do_dispatch(self, session: _QMPSession, request: Any) -> Any:
        if not isinstance(request, dict):
            raise QMPError("QMP input must be a JSON object")
        exec_key = None
        for name in qdict_order(request):  # qmp_dispatch_check_obj()
            value = request[name]
            if name == "execute" or (name == "exec-oob" and session.oob_enabled):
                if type(value) is not str:
                    raise QMPError(f"QMP input member '{name}' must be a string")
                if exec_key:
                    raise QMPError(f"QMP input member '{name}' clashes with '{exec_key}'")
                exec_key = name
            elif name == "arguments":
                if type(value) is not dict:
                    raise QMPError("QMP input member 'arguments' must be an object")
            elif name != "id":
                raise QMPError(f"QMP input member '{name}' is unexpected")
        if exec_key is None:
            raise QMPError("QMP input lacks member 'execute'")
        command = request[exec_key]
        cmd = self._commands.get(command)
        if cmd is None or (not session.negotiated and command != "qmp_capabilities"):
            raise QMPError(f"The command {command} has not been found", "CommandNotFound")
        if exec_key == "exec-oob" and not cmd.allow_oob:
            raise QMPError(f"The command {command} does not support OOB")
        args = visit_args(request.get("arguments", {}), cmd.members)
        ret = cmd.handler(session, args) if cmd.builtin else cmd.handler(args)
        if inspect.isawaitable(ret):
            ret = await ret
        if ret is not None:
            qobject_to_json(ret)  # a handler returning something unsendable is its error, not ours
        return ret

    # events ---------------------------------------------------------------------------------
    def add_event_listener(self, cb: Callable[[dict], None]) -> None:
        """``cb(event)`` sees every event emitted, in order, whether or not a client is connected.

        It runs in the emitting thread, under the monitor's event lock: keep it short.
        """
        with self._event_lock:
            self._listeners.append(cb)

    def emit_event(self, name: str, data: dict | None = None) -> None:
        """monitor_qapi_event_emit(); thread-safe. Events without data have no "data" member."""
        with self._event_lock:
            now = time.time_ns() // 1000  # g_get_real_time()
            event: dict[str, Any] = {
                "timestamp": {"seconds": now // 1_000_000, "microseconds": now % 1_000_000},
                "event": name,
            }
            if data is not None:
                event["data"] = data
            # Encoded when sent, by the loop thread: QEMU's exact JSON costs ~0.1 ms of Python per event, which
            # would otherwise sit in the emitting thread, i.e. inside the migration's pause.
            for cb in self._listeners:
                try:
                    cb(event)
                except Exception:
                    log.exception("QMP event listener failed")
            session = self._session
            if session is None or not session.negotiated or self._loop is None:
                return
            wake = not self._event_queue  # a flush is already due when events are queued: one wake-up
            self._event_queue.append((session, event))
            loop = self._loop
        if threading.get_ident() == self._loop_thread:
            self._flush_events()
        elif wake and not (self.hold_events is not None and self.hold_events()):
            # Each wake-up hands the GIL to the loop thread; a burst of events (a migration's completion
            # emits four within a millisecond) costs one hand-over, not four, in the middle of the pause.
            try:
                loop.call_soon_threadsafe(self._flush_events)
            except RuntimeError:  # loop already closed: the client is gone too
                pass

    def release_events(self) -> None:
        """Send what hold_events kept back: one wake-up of the loop thread for the lot."""
        with self._event_lock:
            loop = self._loop if self._event_queue else None
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed: the client is gone too
                loop.call_soon_threadsafe(self._flush_events)

    def _flush_events(self) -> None:
        while True:
            with self._event_lock:
                if not self._event_queue:
                    return
                session, event = self._event_queue.popleft()
            session.send_event(_encode(event))

    # serving --------------------------------------------------------------------------------
    async def serve_unix(self, path: str) -> None:
        """Bind and listen on ``path`` (mode 0600; a stale socket there is replaced, as QEMU does)."""
        if self._lsock is not None:
            raise RuntimeError("monitor is already serving")
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            os.fchmod(sock.fileno(), 0o600)  # Linux creates the socket file with this mode
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)
            except FileNotFoundError:
                pass
            sock.bind(path)
            os.chmod(path, 0o600)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
            st = os.stat(path)
        except BaseException:
            sock.close()
            raise
        self._lsock, self._path, self._inode = sock, path, (st.st_dev, st.st_ino)
        self._accept_task = self._loop.create_task(self._accept_loop(sock))

    async def _accept_loop(self, lsock: socket.socket) -> None:
        """Accept one client, serve it until it leaves, then accept the next (tcp_chr_accept)."""
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(lsock)
            try:
                conn.setblocking(False)
                _, session = await loop.connect_accepted_socket(lambda: _QMPSession(self), conn)
            except OSError:
                conn.close()
                continue
            self._session = session
            try:
                await asyncio.shield(session.closed)
            finally:
                self._session = None

    async def close(self) -> None:
        """Stop serving: close the listening socket and the client, unlink the socket file."""
        session = self._session
        if self._accept_task is not None:
            self._accept_task.cancel()
            try:
                await self._accept_task
            except asyncio.CancelledError:
                pass
            self._accept_task = None
        if self._lsock is not None:
            self._lsock.close()
            self._lsock = None
        if session is not None and session.transport is not None:
            session.transport.abort()
            await session.closed
        self._session = None
        for task in list(self._dispatchers):
            task.cancel()
        if self._dispatchers:
            await asyncio.gather(*self._dispatchers, return_exceptions=True)
        if self._path is not None:
            try:
                st = os.stat(self._path)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(self._path)
            except FileNotFoundError:
                pass
            self._path = None
        with self._event_lock:
            self._event_queue.clear()
