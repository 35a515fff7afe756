"""qobject/json-streamer.c (QEMU 10.0): splits the token stream into messages, with QEMU's limits.

QMP has no framing: a message ends where its braces balance. Counting them here, and refusing what is too
large, too long or nested too deep, is what keeps one client from exhausting the monitor's memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from labkit.vm.qobject.json_lexer import JSON_ERROR, JSON_LCURLY, JSON_LSQUARE, JSON_RCURLY, JSON_RSQUARE
from labkit.vm.qobject.json_parser import JSONParseError, json_parser_parse
from labkit.vm.qobject.unicode import lossy

MAX_MESSAGE_SIZE = 1 << 20  # bytes of tokens in one message (QEMU's MAX_TOKEN_SIZE is 64 MiB)
MAX_TOKEN_COUNT = 2 << 20  # json-streamer.c
MAX_NESTING = 1 << 10  # json-streamer.c


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
            self.emit(None, f"JSON parse error, stray '{lossy(text)}'")
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
        except JSONParseError as e:
            self.emit(None, "JSON parse error, " + str(e))
        else:
            self.emit(obj, None)
