"""The guest in-process: real memfd RAM blocks, the dirty bitmap, verification and the heartbeat."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from labkit.host.procfs import read_maps
from labkit.qemu_syntax import GuestConfig, MiB
from labkit.vm.guest import Guest, verify_guest_memory
from labkit.vm.memory import IMPLICIT_BLOCKS, ram_blocks_create, verify_roms
from labkit.vm.options import parse_args


def make_ram(size="8M", backend="memfd", share="on", aux="on"):
    argv = [
        "-machine",
        f"q35,aux-ram-share={aux},memory-backend=ram0",
        "-object",
        f"memory-backend-{backend},id=ram0,size={size},share={share}",
    ]
    return ram_blocks_create(parse_args(argv))


@pytest.fixture
def ram():
    r = make_ram()
    yield r
    r.close()


def test_blocks_are_memfds_named_as_qemu_names_them(ram):
    import os

    names = [b.idstr for b in ram.created]
    assert names == ["ram0", *[imp.idstr for imp in IMPLICIT_BLOCKS]]
    paths = {m.path for m in read_maps(os.getpid())}
    for name in names:
        assert f"/memfd:{name} (deleted)" in paths
    assert ram.cpr_blockers() == []


def test_private_blocks_block_cpr_with_qemus_text():
    r = make_ram(backend="ram", share="off", aux="off")
    try:
        blockers = r.cpr_blockers()
        assert blockers[-1] == (  # the one migrate reports: created last
            "Memory region /rom@etc/acpi/rsdp is not compatible with CPR. share=on is required "
            "for memory-backend objects, and aux-ram-share=on is required."
        )
        assert any("Memory region ram0 " in b for b in blockers)
        assert all(b.kind == "anon" for b in r)
    finally:
        r.close()


@settings(max_examples=30, deadline=None)
@given(
    pattern=st.sampled_from(["sequential", "random", "hotset"]),
    seed=st.integers(0, 2**16),
    ticks=st.integers(1, 20),
    rate=st.integers(1, 64),
)
def test_dirty_bitmap_never_misses_a_written_page(pattern, seed, ticks, rate):
    r = make_ram("4M")
    try:
        g = Guest(r.system, GuestConfig(dirty_rate=rate * MiB, pattern=pattern, seed=seed))
        r.system.dirty_sync()
        before = r.system.array().copy()
        for _ in range(ticks):
            g.tick(0.001)
        changed = np.flatnonzero((r.system.array() != before).reshape(r.system.npages, -1).any(axis=1))
        dirty = np.flatnonzero(r.system.dirty)
        assert set(changed.tolist()) <= set(dirty.tolist())
        assert verify_guest_memory(r.system)["ok"]
    finally:
        r.close()


def test_verification_catches_one_flipped_byte(ram):
    g = Guest(ram.system, GuestConfig(dirty_rate=512 * MiB, pattern="sequential"))
    for _ in range(10):
        g.tick(0.001)
    ok = verify_guest_memory(ram.system)
    assert ok["ok"] and ok["written"] > 0
    arr = ram.system.array()
    page = g.data_first + 3
    arr[page * 4096 + 1234] ^= 0x01
    bad = verify_guest_memory(ram.system)
    assert not bad["ok"] and bad["bad-pages"] == [page]
    arr[page * 4096 + 1234] ^= 0x01
    arr[(g.data_first + 200) * 4096] ^= 0x80  # a page never written must stay zero
    assert verify_guest_memory(ram.system)["bad-pages"] == [g.data_first + 200]


def test_roms_loaded_and_checked(ram):
    assert verify_roms(ram) == []
    ram.find("pc.bios").array()[10] ^= 1
    assert verify_roms(ram) == ["pc.bios"]


def test_heartbeat_records_the_longest_gap(ram):
    g = Guest(ram.system, GuestConfig())
    g.heartbeat(1_000_000)
    g.heartbeat(1_500_000)
    g.heartbeat(9_500_000)
    g.heartbeat(9_600_000)
    s = g.stats()
    assert s["max-gap-ns"] == 8_000_000 and s["heartbeat-seq"] == 4
    g.reset_gap()
    assert g.stats()["max-gap-ns"] == 0


def test_a_slice_torn_by_a_kill_still_verifies_but_a_flip_does_not(ram):
    """Killed mid-slice, pages may be one generation ahead of the table; the in-flight flag says so."""
    from labkit.vm.guest import H_INFLIGHT

    g = Guest(ram.system, GuestConfig(dirty_rate=512 * MiB))
    for _ in range(5):
        g.tick(0.001)
    page = g.data_first + 7
    gen = int(g.gen[page])
    g.header[H_INFLIGHT] = 1  # as if killed after writing the page, before the table
    g.pages[page] = (page << 32) | (gen + 1)
    assert verify_guest_memory(ram.system)["ok"]
    g.pages[page][3] ^= 1
    assert verify_guest_memory(ram.system)["bad-pages"] == [page]
    g.pages[page] = (page << 32) | (gen + 1)
    g.header[H_INFLIGHT] = 0  # not mid-slice: a page ahead of its table is wrong
    assert verify_guest_memory(ram.system)["bad-pages"] == [page]
