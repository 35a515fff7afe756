"""qobject/json-lexer.c: QEMU's JSON lexer, the same state table byte for byte, with its error recovery.

A QMP client sees QEMU's exact behaviour on bad bytes (where a token ends, where recovery resumes) only if the
lexer is the same state machine; it turns a byte stream, cut anywhere, into tokens for the streamer.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Protocol, cast

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
# States that loop on themselves: skip such runs with one regex match instead of byte by byte. Every pattern
# matches the empty string, so match() never returns None.
_LEXER_SKIP = cast(
    "dict[int, Callable[[bytearray, int], re.Match[bytes]]]",
    {
        IN_START: re.compile(rb"[ \t\r\n]*").match,
        IN_RECOVERY: re.compile(rb"[^\x00-\x08\x0a-\x1f\xfe\xff\[\]{}:,]*").match,
        IN_DQ_STRING: re.compile(rb'[^\x00-\x1f"\\\xfe\xff]*').match,
        IN_SQ_STRING: re.compile(rb"[^\x00-\x1f'\\\xfe\xff]*").match,
        IN_DIGITS: re.compile(rb"[0-9]*").match,
        IN_MANTISSA_DIGITS: re.compile(rb"[0-9]*").match,
        IN_EXP_DIGITS: re.compile(rb"[0-9]*").match,
        IN_KEYWORD: re.compile(rb"[a-z]*").match,
    },
)


class TokenSink(Protocol):
    """What the lexer feeds: json_streamer's JSONMessageParser (a protocol, so the lexer imports nothing)."""

    discarding: bool

    def process_token(self, type_: int, text: bytes) -> None: ...

    def check_partial(self, partial_len: int) -> None: ...


class JSONLexer:
    """json_lexer_feed(): turns a byte stream into tokens for a ``JSONMessageParser``.

    Input may arrive in arbitrary pieces; a token cut by a read boundary waits for the rest.
    Only the current, unfinished token is kept, and not even that while its message is being
    discarded for being too large.
    """

    def __init__(self, parser: TokenSink):
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
