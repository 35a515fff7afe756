"""QDict's member order (labkit.vm.qobject.qdict), kept per shape of keys: the cached order must be exactly the
order QEMU's 512-bucket walk gives, for every insertion order, and events must encode as QEMU writes them."""

from __future__ import annotations

import itertools

import pytest

from labkit.vm.qobject.json_writer import qobject_to_json_line
from labkit.vm.qobject.qdict import _qdict_bucket, qdict_order

pytestmark = pytest.mark.timeout(30)


def _walk(keys: list[str]) -> list[str]:
    """QEMU's walk, computed afresh: bucket by bucket, newest entry first within a bucket."""
    return [k for _, k in sorted(enumerate(keys), key=lambda e: (_qdict_bucket(e[1]), -e[0]))]


def test_cached_order_is_the_walk_for_every_insertion_order():
    keys = ["status", "total-time", "ram", "expected-downtime", "setup-time", "blocked-reasons"]
    for perm in itertools.permutations(keys, 4):
        d = dict.fromkeys(perm, 0)
        assert qdict_order(d) == _walk(list(perm))
        assert qdict_order(d) == _walk(list(perm))  # the second time from the cache, still right


def test_keys_sharing_a_bucket_keep_the_newest_first():
    by_bucket: dict[int, list[str]] = {}
    for i in range(4000):
        by_bucket.setdefault(_qdict_bucket(f"k{i}"), []).append(f"k{i}")
    a, b = next(v for v in by_bucket.values() if len(v) >= 2)[:2]
    assert qdict_order({a: 1, b: 2}) == [b, a]
    assert qdict_order({b: 1, a: 2}) == [a, b]


def test_an_event_encodes_as_qemu_writes_it():
    ev = {"timestamp": {"seconds": 1764657000, "microseconds": 5}, "event": "MIGRATION", "data": {"status": "active"}}
    line = b'{"timestamp": {"seconds": 1764657000, "microseconds": 5}, "event": "MIGRATION", "data": {"status": "active"}}\n'
    assert qobject_to_json_line(ev) == line
    assert qobject_to_json_line(ev) == line
