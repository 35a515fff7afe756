"""The differential conformance harness as tests: each scenario on both backends, every difference known.

A test fails on a difference known_differences.toml does not list, on one that changed, and on a listed one
that no longer occurs; its message says exactly what to put in (or take out of) the file.
"""

from __future__ import annotations

import pytest

from labkit.host.runners.qemu import qemu_missing

from .harness import SCENARIOS, Observation, observe, render
from .known import diff, judge, load_known
from .sections import section_list

_MISSING = qemu_missing()


@pytest.mark.qemu
@pytest.mark.skipif(_MISSING is not None, reason=f"{_MISSING}")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario(scenario):
    obs = observe(scenario)
    for backend, o in obs.items():  # the harness itself worked on both sides
        assert "harness-error" not in o.checks, f"{backend}: {o.checks['harness-error']}"
    problems = judge(scenario.name, diff(scenario.name, obs), load_known())
    assert not problems, "\n\n".join(problems)


def test_every_known_difference_names_a_scenario_and_a_reason():
    names = {s.name for s in SCENARIOS}
    for d in load_known():
        assert d.scenario in names, f"{d.scenario!r} is not a scenario of the harness"
        assert d.reason.strip(), f"{d.scenario} / {d.check}: no reason"
        assert d.emulated != d.qemu


def test_section_list_reads_both_record_layouts():
    """A hand-built stream in QEMU's layout (per-page RAM records) and one in labkit's (runs)."""
    import struct

    def sec(kind, sid, name=None, inst=0, ver=1):
        head = bytes([kind]) + struct.pack(">I", sid)
        if name is not None:
            head += bytes([len(name)]) + name.encode() + struct.pack(">II", inst, ver)
        return head

    footer = lambda sid: b"\x7e" + struct.pack(">I", sid)  # noqa: E731
    block = bytes([4]) + b"ram0" + struct.pack(">Q", 8192)
    start = sec(1, 2, "ram", 0, 4) + struct.pack(">Q", 8192 | 0x04) + block + struct.pack(">Q", 0x10) + footer(2)
    qemu_pages = (struct.pack(">Q", 0x08) + bytes([4]) + b"ram0" + b"\xaa" * 4096
                  + struct.pack(">Q", 0x1000 | 0x02 | 0x20) + b"\x00" + struct.pack(">Q", 0x10))  # fmt: skip
    device = sec(4, 3, "timer") + b"\x7e\x00\x00" + footer(3)  # payload holding a stray footer byte
    header = struct.pack(">II", 0x5145564D, 3)
    config = b"\x07" + struct.pack(">I", 11) + b"pc-q35-10.0"
    qemu = section_list(header + config + start + sec(3, 2) + qemu_pages + footer(2) + device + b"\x00")
    assert qemu["error"] is None and qemu["format"] == "qemu"
    assert [s["kind"] for s in qemu["sections"]] == ["CONFIGURATION", "START", "END", "FULL", "EOF"]
    assert qemu["sections"][1]["blocks"] == [["ram0", 8192]] and qemu["pages"] == {"zero": 1, "normal": 1}
    assert qemu["sections"][3]["size"] == 3
    runs = struct.pack(">Q", 0x08) + bytes([4]) + b"ram0" + struct.pack(">I", 2) + b"\x01" * 8192
    labkit = section_list(header + start + sec(2, 2) + runs + struct.pack(">Q", 0x10) + footer(2) + b"\x00")
    assert labkit["error"] is None and labkit["format"] == "labkit runs" and labkit["pages"]["normal"] == 2
    assert render(["a", "b"]) == "a, b" and render([]) == "(none)"


def test_judge_names_new_changed_gone_and_unexplained_differences(tmp_path):
    """The failure messages say which difference and what to write in the file; the file round-trips."""
    from .known import Difference, write_known

    listed = [
        Difference("s", "changed", "a", "b", "because"),
        Difference("s", "gone", "x", "y", "because"),
        Difference("s", "todo", "p", "q", "TODO: say why"),
        Difference("other", "kept", "1", "2", "elsewhere"),
    ]
    found = [Difference("s", "new", "e", "q"), Difference("s", "changed", "a", "c"), Difference("s", "todo", "p", "q")]
    problems = judge("s", found, listed)
    assert [p.split(" ", 1)[0] for p in problems] == ["NEW", "CHANGED", "difference", "GONE:"]
    assert 'check = "new"\nemulated = "e"\nqemu = "q"' in problems[0]
    assert 'qemu = "c"\nreason = "because"' in problems[1]  # a changed entry keeps its reason to check
    assert "without a reason" in problems[2] and 'check = "gone"' in problems[3]
    path = tmp_path / "known.toml"
    write_known([*found, listed[3]], listed, path)
    again = {d.key: d for d in load_known(path)}
    assert again[("s", "changed")].qemu == "c" and again[("s", "changed")].reason == "because"
    assert again[("s", "new")].reason.startswith("TODO") and again[("other", "kept")].reason == "elsewhere"
    assert judge("s", [], []) == [] and diff("s", {"emulated": Observation({"a": [1]}), "qemu": Observation({"a": [1]})}) == []
