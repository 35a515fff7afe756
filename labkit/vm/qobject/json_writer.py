"""qobject/json-writer.c: Python values to compact JSON exactly as QEMU writes it.

Byte-identical output ("%.17g" floats, \\uXXXX escapes, QDict member order) lets a test compare labkit-vm's
replies with QEMU's, and keeps every message pure ASCII.
"""

from __future__ import annotations

import math
import re
from typing import Any

from labkit.vm.qobject.qdict import qdict_order

_ESCAPE_RE = re.compile('[\x00-\x1f"\\\\\x7f-\U0010ffff]')
_WRITER_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match[str]) -> str:
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
            item: Any = next(top[0], _END)
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


def qobject_to_json_line(msg: dict[str, Any]) -> bytes:
    """qmp_send_response()'s encoding: one JSON object per line (pure ASCII: everything else is escaped)."""
    return (qobject_to_json(msg) + "\n").encode("ascii")
