"""The words every layer shows the same way live once, in the qemu_syntax leaf (sizes and milliseconds for
people, the two sides, QAPI's MigMode, a `migrate` channel), and the package's public names all resolve: a
refactor that moves a module cannot leave `labkit.X` pointing nowhere."""

from __future__ import annotations

import json

import pytest

import labkit
from labkit.qemu_syntax import MIG_MODES, SIDES, GiB, KiB, MiB, TiB, format_ms, human_size, unix_channel


@pytest.mark.parametrize(
    "n,spec,shown",
    [
        (0, ".1f", "0 B"),
        (1023, ".1f", "1023 B"),
        (KiB, ".1f", "1.0 KiB"),
        (1536 * MiB, ".1f", "1.5 GiB"),
        (3 * TiB, ".1f", "3.0 TiB"),
        (-2 * MiB, ".1f", "-2.0 MiB"),  # a difference of sizes keeps its sign
        (GiB, ".3g", "1 GiB"),  # the figures' titles: no trailing .0
        (256 * MiB, ".3g", "256 MiB"),
    ],
)
def test_human_size(n, spec, shown):
    assert human_size(n, spec) == shown


def test_format_ms_says_n_a_where_nothing_was_measured():
    assert format_ms(None) == "n/a"
    assert format_ms(12.345) == "12.35 ms" and format_ms(12.345, 1) == "12.3 ms" and format_ms(0) == "0.00 ms"


def test_the_modes_and_sides_are_qemus_words():
    assert MIG_MODES == ("normal", "cpr-reboot", "cpr-transfer", "cpr-exec")  # QAPI MigMode, in its order
    assert SIDES == ("source", "destination")


def test_unix_channel_is_a_migration_channel_as_qmp_takes_it():
    main, cpr = unix_channel("/run/m.sock"), unix_channel("/run/c.sock", "cpr")
    assert main == {"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": "/run/m.sock"}}
    assert cpr["channel-type"] == "cpr" and cpr["addr"]["path"] == "/run/c.sock"
    json.dumps([main, cpr])  # it goes over QMP as it is


def test_every_public_name_of_labkit_resolves():
    for name in labkit.__all__:
        assert getattr(labkit, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        labkit.nothing_here  # noqa: B018
