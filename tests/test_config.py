"""Sizes, VM descriptions and the argv they render to: both backends get QEMU's spelling."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from labkit.host.hardware import VMConfig
from labkit.qemu_syntax import GiB, GuestConfig, KiB, MiB, SizeError, format_size, parse_size
from labkit.vm.options import OptionError, parse_args


@pytest.mark.parametrize(
    "text,default,expected",
    [
        ("4096", "b", 4096),
        ("1K", "b", KiB),
        ("1k", "b", KiB),
        ("256M", "b", 256 * MiB),
        ("1G", "b", GiB),
        ("2T", "b", 2 << 40),
        ("512", "m", 512 * MiB),
        ("1.5G", "b", 3 * GiB // 2),
        ("0", "b", 0),
    ],
)
def test_parse_size(text, default, expected):
    assert parse_size(text, default) == expected


@pytest.mark.parametrize("bad", ["", "G", "-1", "1X", "1.5", "1 G B", "99999999999999999999999"])
def test_parse_size_refuses(bad):
    with pytest.raises(SizeError):
        parse_size(bad)


@given(st.integers(min_value=0, max_value=1 << 50))
def test_format_size_round_trips(n):
    assert parse_size(format_size(n)) == n


def test_vmconfig_renders_qemu_spelling_and_parses_back():
    cfg = VMConfig(name="src", ram=GiB, guest=GuestConfig(dirty_rate=256 * MiB, pattern="random"))
    argv = cfg.emulated_argv("/tmp/x/q.sock")
    assert argv[argv.index("-machine") + 1] == "q35,aux-ram-share=on,memory-backend=ram0"
    assert argv[argv.index("-object") + 1] == "memory-backend-memfd,id=ram0,size=1G,share=on"
    assert argv[argv.index("-qmp") + 1] == "unix:/tmp/x/q.sock,server=on,wait=off"
    opts = parse_args(argv)
    assert opts.ram_size == GiB and opts.aux_ram_share and opts.memory_backend == "ram0"
    assert opts.objects["ram0"].share and opts.objects["ram0"].qom_type == "memory-backend-memfd"
    assert opts.guest.dirty_rate == 256 * MiB and opts.guest.pattern == "random"
    assert opts.qmp == ["/tmp/x/q.sock"]


def test_nodefaults_is_the_default_and_can_be_left_out():
    """-nodefaults unless asked otherwise; without it q35 has a VGA and a NIC, so both programs add blocks."""
    assert "-nodefaults" in VMConfig().common_argv("/tmp/q")
    argv = VMConfig(nodefaults=False).emulated_argv("/tmp/q")
    assert "-nodefaults" not in argv and not parse_args(argv).nodefaults


def test_with_incoming_renders_json_channel():
    cpr = {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": "/r/cpr.sock"}}
    cfg = VMConfig().with_incoming("unix:/r/main.sock", cpr)
    argv = cfg.emulated_argv("/r/q.sock")
    values = [argv[i + 1] for i, a in enumerate(argv) if a == "-incoming"]
    assert values[0] == "unix:/r/main.sock" and json.loads(values[1]) == cpr
    opts = parse_args(argv)
    assert set(opts.incoming) == {"main", "cpr"}


def test_default_pc_ram_when_no_backend():
    cfg = VMConfig(memory_backend="none", ram=64 * MiB)
    opts = parse_args(cfg.emulated_argv("/tmp/q"))
    assert opts.memory_backend is None and opts.ram_size == 64 * MiB


def test_machine_options_merge_like_qemu():
    opts = parse_args(
        [
            "-machine",
            "q35",
            "-machine",
            "aux-ram-share=on",
            "-object",
            "memory-backend-memfd,id=m,size=8M,share=on",
            "-machine",
            "memory-backend=m",
        ]
    )
    assert opts.aux_ram_share and opts.memory_backend == "m" and opts.ram_size == 8 * MiB


def test_last_incoming_per_channel_type_wins():
    opts = parse_args(
        [
            "-incoming",
            "unix:/a",
            "-incoming",
            "unix:/b",
            "-incoming",
            "cpr,addr.transport=socket,addr.type=unix,addr.path=/c",
        ]
    )
    assert opts.incoming["main"] == "unix:/b"
    assert "cpr" in opts.incoming


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["-bogus"], "-bogus: invalid option"),
        (["-m"], "-m: requires an argument"),
        (["-m", "lots"], "-m lots: Parameter 'size'"),
        (
            ["-object", "memory-backend-memfd,id=r,size=1M,bogus=1"],
            "Property 'memory-backend-memfd.bogus' not found",
        ),
        (["-object", "frobnicator,id=x"], "invalid object type: frobnicator"),
        (["-machine", "memory-backend=nope"], "Memory backend 'nope' not found"),
        (["-machine", "aux-ram-share=maybe"], "expects 'on' or 'off'"),
        (["-x-guest", "pattern=zigzag"], "does not accept value 'zigzag'"),
        (["-qmp", "tcp:1.2.3.4:5"], "is not a unix socket address"),
    ],
)
def test_bad_options_name_the_option(argv, needle):
    with pytest.raises(OptionError) as e:
        parse_args(argv)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_option_error_carries_the_option_as_given():
    """A caller (the lab's error line, a test) learns which option to fix without parsing the message."""
    with pytest.raises(OptionError) as e:
        parse_args(["--m", "0"])
    assert e.value.option == "--m" and str(e.value).startswith("--m 0: ")
    with pytest.raises(OptionError) as e:
        parse_args(["-machine", "memory-backend=nope"])  # a cross-option check: no single option to blame
    assert e.value.option is None
