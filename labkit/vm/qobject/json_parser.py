"""qobject/json-parser.c: one message's tokens to Python values, with QEMU's error texts.

A client that sends bad JSON gets the same "JSON parse error, ..." reply from QEMU and from labkit-vm only if
the parser makes the same decisions: which escapes it takes, which code points it refuses, when an integer
becomes a uint64 or a double.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from labkit.errors import LabkitError
from labkit.vm.qobject.json_lexer import (
    JSON_COLON,
    JSON_COMMA,
    JSON_FLOAT,
    JSON_INTEGER,
    JSON_KEYWORD,
    JSON_LCURLY,
    JSON_LSQUARE,
    JSON_RCURLY,
    JSON_RSQUARE,
    JSON_STRING,
)
from labkit.vm.qobject.qnum import INT64_MIN, UINT64_MAX
from labkit.vm.qobject.unicode import NONCHAR_RE, lossy, valid_codepoint


class JSONParseError(LabkitError):
    """A message that is not valid JSON: the text is QEMU's, without its "JSON parse error, " prefix."""


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
                raise JSONParseError("invalid UTF-8 sequence in string") from None
            if NONCHAR_RE.search(s):
                raise JSONParseError("invalid UTF-8 sequence in string")
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
            if not valid_codepoint(cp):
                raise JSONParseError(f"{lossy((body + quote)[beg:i])} is not a valid Unicode character")
            out.append(chr(cp))
        else:
            raise JSONParseError("invalid escape sequence in string")
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

    Raises JSONParseError with QEMU's text (without the "JSON parse error, " prefix).
    """
    pos, n = 0, len(tokens)
    # frame: [container, is_object, pending key (None while the key itself is being parsed)]
    stack: list[list[Any]] = []
    while True:
        if pos >= n:
            raise JSONParseError("premature EOI")
        type_, text = tokens[pos]
        if type_ == JSON_LCURLY or type_ == JSON_LSQUARE:
            pos += 1
            if pos >= n:
                raise JSONParseError("premature EOI")
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
                raise JSONParseError(f"invalid keyword '{lossy(text)}'")
        else:
            raise JSONParseError("expecting value")
        # hand the finished value to the containers that are waiting for it
        while True:
            if not stack:
                return value
            frame = stack[-1]
            if frame[1]:
                if frame[2] is None:
                    if type(value) is not str:
                        raise JSONParseError("key is not a string in object")
                    frame[2] = value
                    if pos >= n:
                        raise JSONParseError("premature EOI")
                    if tokens[pos][0] != JSON_COLON:
                        raise JSONParseError("missing : in object pair")
                    pos += 1
                    break
                if frame[2] in frame[0]:
                    raise JSONParseError("duplicate key")
                frame[0][frame[2]] = value
                frame[2] = None
                if pos >= n:
                    raise JSONParseError("premature EOI")
                sep = tokens[pos][0]
                pos += 1
                if sep == JSON_RCURLY:
                    value = stack.pop()[0]
                    continue
                if sep != JSON_COMMA:
                    raise JSONParseError("expected separator in dict")
                break
            frame[0].append(value)
            if pos >= n:
                raise JSONParseError("premature EOI")
            sep = tokens[pos][0]
            pos += 1
            if sep == JSON_RSQUARE:
                value = stack.pop()[0]
                continue
            if sep != JSON_COMMA:
                raise JSONParseError("expected separator in list")
            break
