"""The known differences (known_differences.toml) and the judgement of one scenario's diff against them.

Every difference the harness finds must be listed with its reason; a listed difference must still occur,
exactly as listed. Each entry names a scenario and a check and gives both backends' rendered values, so a
difference that changes shape is caught too. `python -m tests.conformance.report --update-known` rewrites
the file from a fresh run, keeping the reasons of entries that still match and marking new ones TODO.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .harness import Observation, render

KNOWN_FILE = Path(__file__).with_name("known_differences.toml")
NOT_OBSERVED = "(not observed)"
TODO = "TODO: say why, or fix the difference"
GATES = ("start", "process")


@dataclass
class Difference:
    scenario: str
    check: str
    emulated: str
    qemu: str
    reason: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.scenario, self.check)

    def toml(self) -> str:
        q = lambda s: json.dumps(s, ensure_ascii=False)  # noqa: E731 - a JSON string is a TOML basic string
        return (
            f"[[difference]]\nscenario = {q(self.scenario)}\ncheck = {q(self.check)}\n"
            f"emulated = {q(self.emulated)}\nqemu = {q(self.qemu)}\nreason = {q(self.reason or TODO)}\n"
        )


def diff(scenario: str, obs: dict[str, Observation]) -> list[Difference]:
    """Every check whose rendered value differs between the backends, in the order the checks were made.
    Where a process's fate differs (a gate check: one refuses to start, one exits where the other runs on),
    what only one side could be asked afterwards is not compared: the gate's difference says it all."""
    emu, qemu = obs["emulated"].checks, obs["qemu"].checks
    keys = list(dict.fromkeys([*emu, *qemu]))
    if any(g in emu and g in qemu and emu[g] != qemu[g] for g in GATES):
        keys = [k for k in keys if k in emu and k in qemu]
    out = []
    for k in keys:
        e = render(emu[k]) if k in emu else NOT_OBSERVED
        q = render(qemu[k]) if k in qemu else NOT_OBSERVED
        if e != q:
            out.append(Difference(scenario, k, e, q))
    return out


def load_known(path: Path = KNOWN_FILE) -> list[Difference]:
    if not path.exists():
        return []
    data = tomllib.loads(path.read_text())
    return [Difference(**d) for d in data.get("difference", [])]


def judge(scenario: str, found: list[Difference], known: list[Difference]) -> list[str]:
    """What is wrong with this scenario's diff: new, changed and gone differences, each with the exact
    edit of known_differences.toml that would accept it."""
    listed = {d.key: d for d in known if d.scenario == scenario}
    problems = []
    how = "(or run `python -m tests.conformance.report --update-known` and write the reasons)"
    for d in found:
        k = listed.pop(d.key, None)
        if k is None:
            problems.append(
                f"NEW difference in scenario {scenario!r}, check {d.check!r}:\n  emulated: {d.emulated}\n"
                f"  qemu:     {d.qemu}\nFix it, or add to {KNOWN_FILE.name} {how}:\n{d.toml()}"
            )
        elif (k.emulated, k.qemu) != (d.emulated, d.qemu):
            problems.append(
                f"CHANGED difference in scenario {scenario!r}, check {d.check!r}:\n"
                f"  listed   emulated: {k.emulated}\n  listed   qemu:     {k.qemu}\n"
                f"  now      emulated: {d.emulated}\n  now      qemu:     {d.qemu}\n"
                f"Update its entry in {KNOWN_FILE.name} {how}:\n{Difference(**{**d.__dict__, 'reason': k.reason}).toml()}"
            )
        elif not k.reason or k.reason.startswith("TODO"):
            problems.append(f"difference {scenario!r} / {d.check!r} is listed without a reason: write one")
    for k in listed.values():
        problems.append(
            f"GONE: scenario {scenario!r}, check {k.check!r} no longer differs (both backends now agree).\n"
            f"Delete this entry from {KNOWN_FILE.name} {how}:\n{k.toml()}"
        )
    return problems


def write_known(found: list[Difference], old: list[Difference], path: Path = KNOWN_FILE) -> None:
    """Rewrite the file as exactly `found`, keeping the reason of every entry that still matches."""
    reasons = {(d.scenario, d.check, d.emulated, d.qemu): d.reason for d in old}
    by_key = {d.key: d.reason for d in old}
    head = (
        "# Every difference the conformance harness (tests/conformance/) finds between labkit-vm and real QEMU 10,\n"
        "# with its reason. A difference not listed here fails the tests, and so does a listed one that no longer\n"
        "# occurs. Regenerate with `python -m tests.conformance.report --update-known`: reasons are kept for\n"
        "# entries that still match, a changed entry keeps its old reason (check it), a new one gets TODO.\n"
    )
    body = []
    for d in found:
        reason = reasons.get((d.scenario, d.check, d.emulated, d.qemu)) or by_key.get(d.key) or TODO
        body.append(Difference(d.scenario, d.check, d.emulated, d.qemu, reason).toml())
    path.write_text(head + "\n" + "\n".join(body))
