"""qobject/qdict.c's member order: QDict is a 512-bucket hash table, and QEMU walks it bucket by bucket.

QEMU's replies, its events and its first-error-wins argument checks all follow this order, so a client sees the
same member order and the same first error from labkit-vm as from QEMU.
"""

from __future__ import annotations

import functools
from typing import Any

QDICT_BUCKET_MAX = 512


@functools.lru_cache(maxsize=8192)
def _qdict_bucket(key: str) -> int:
    """tdb_hash(key) % QDICT_BUCKET_MAX, over the key's modified UTF-8 bytes."""
    name = key.encode("utf-8", "surrogatepass").replace(b"\0", b"\xc0\x80")
    value = (0x238F13AF * len(name)) & 0xFFFFFFFF
    for i, c in enumerate(name):
        value = (value + (c << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * value + 12345) & 0xFFFFFFFF) % QDICT_BUCKET_MAX


def qdict_order(d: dict[str, Any]) -> list[str]:
    """Keys of ``d`` in the order QEMU walks a QDict built by inserting them in ``d``'s order.

    QDict is a 512-bucket hash table (newest entry first within a bucket); QEMU's replies,
    events and its first-error-wins checks all follow this order, so labkit does too.
    """
    return list(_qdict_order(tuple(d)))


@functools.lru_cache(maxsize=4096)
def _qdict_order(keys: tuple[str, ...]) -> tuple[str, ...]:
    """qdict_order() by the keys' insertion order alone: a reply or an event has the same few members every
    time, so the sort is done once per shape (it was about half of encoding an event)."""
    return tuple(k for _, k in sorted(enumerate(keys), key=lambda e: (_qdict_bucket(e[1]), -e[0])))
