"""util/unicode.c's modified UTF-8 decoding, which QEMU uses to read strings and to show bad input in errors.

The JSON parser refuses what QEMU refuses (noncharacters, surrogates, overlong forms), and the streamer's
"stray" error shows a bad token as QEMU's JSON writer would (invalid sequences become U+FFFD).
"""

from __future__ import annotations

import re

_MIN_CP = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)
NONCHAR_RE = re.compile(
    "[\ufdd0-\ufdef" + "".join(chr(p << 16 | 0xFFFE) + chr(p << 16 | 0xFFFF) for p in range(17)) + "]"
)


def valid_codepoint(cp: int) -> bool:
    """is_valid_codepoint(): in range, not a noncharacter, not a surrogate."""
    return (
        0 <= cp <= 0x10FFFF
        and not (0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE)
        and not 0xD800 <= cp <= 0xDFFF
    )


def mod_utf8_codepoint(b: bytes, i: int) -> tuple[int, int]:
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
    if not valid_codepoint(cp) or (cp < _MIN_CP[length - 2] and not (cp == 0 and length == 2)):
        cp = -1
    return cp, p


def lossy(b: bytes) -> str:
    """Bytes of a C string as QEMU's JSON writer would show them (invalid sequences -> U+FFFD)."""
    b = b.split(b"\0", 1)[0]
    try:
        s = b.decode("utf-8")
        if not NONCHAR_RE.search(s):
            return s
    except UnicodeDecodeError:
        pass
    out, i = [], 0
    while i < len(b):
        cp, i = mod_utf8_codepoint(b, i)
        out.append(chr(cp) if cp >= 0 else "\ufffd")
    return "".join(out)
