"""Every bad input a confused user types gets one line that says what to do: no traceback, a non-zero exit,
and an answer within a time bound (a timeout, generous for a loaded machine, not a speed target).

The table runs `labkit`, `labkit-vm` and `labkit vm` as real processes, and `Lab` in this process (where
the same rule means: a LabError whose text is one line, raised before anything is spawned).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from labkit.host.limits import available_memory
from labkit.host.runners.qemu import qemu_missing
from labkit.lab.engine import Lab, LabError

ROOT = Path(__file__).resolve().parents[1]
QEMU_MISSING = qemu_missing()
BOUND = 60.0  # seconds: every refusal here comes far sooner; a hang would not
SHARE_TEXT = "share=on is required for memory-backend objects"


@dataclass
class Case:
    argv: list[str]  # after the program
    expect: str  # a piece of the one line
    prog: str = "labkit"  # labkit | labkit-vm
    bound: float = BOUND
    qemu: bool = False  # needs QEMU 10

    @property
    def id(self) -> str:
        return f"{self.prog} {' '.join(self.argv)}"[:70]


MIGRATE = ["migrate", "--ram", "64M"]
CASES = [
    # sizes: minimum and maximum (the maximum from this host's available memory, before any process exists)
    Case(["migrate", "--ram", "0"], "16.0 MiB to"),
    Case(["migrate", "--ram", "1K"], "the lab runs guests of 16.0 MiB to"),
    Case(["migrate", "--backend", "qemu", "--ram", "0"], "16.0 MiB to"),
    Case(["migrate", "--ram", "1T"], "available memory", bound=5.0),
    Case(["migrate", "--backend", "qemu", "--ram", "1T"], "available memory", bound=5.0),
    Case(["migrate", "--mode", "normal", "--ram", "1T"], "halved: this mode holds two copies", bound=5.0),
    Case(["migrate", "--ram", "-5M"], "--ram: invalid size: '-5M'"),
    Case(["migrate", "--ram", "lots"], "--ram: invalid size"),
    Case(["migrate", "--dirty-rate", "-1M"], "--dirty-rate: invalid size"),
    Case([*MIGRATE, "--working-set", "512M"], "larger than guest RAM"),
    Case(["migrate", "--downtime-limit", "-1"], "--downtime-limit is in ms: 0 to 2000000"),
    Case(["migrate", "--downtime-limit", "2000001"], "Parameter 'downtime_limit' expects an integer"),
    Case(["migrate", "--max-bandwidth", "0"], "a migration needs some bandwidth"),
    Case(["migrate", "--timeout", "0"], "--timeout"),
    Case(["migrate", "--mode", "cpr-exec-please"], "invalid choice"),
    Case(["migrate", "--backend", "kvm"], "invalid choice"),
    # QEMU's refusal, then the labkit flag that fixes it
    Case([*MIGRATE, "--share", "off"], f"{SHARE_TEXT}, and aux-ram-share=on is required. (labkit: use --share on)"),
    Case([*MIGRATE, "--memory-backend", "ram"], "(labkit: use --memory-backend memfd)"),
    Case([*MIGRATE, "--aux-ram-share", "off"], "(labkit: use --aux-ram-share on)"),
    Case([*MIGRATE, "--backend", "qemu", "--share", "off"], "(labkit: use --share on)", qemu=True),
    Case([*MIGRATE, "--backend", "qemu", "--memory-backend", "ram"], "(labkit: use --memory-backend", qemu=True),
    # a guest that dirties memory faster than the link: the timeout says why and what to change
    Case(
        [*MIGRATE, "--mode", "normal", "--dirty-rate", "1G", "--max-bandwidth", "64M", "--timeout", "10"],
        "16x what --max-bandwidth 64.0 MiB/s carries, so pre-copy never converges",
    ),
    Case(["bench", "--reps", "0"], "--reps: 0: must be at least 1"),
    Case(["bench", "--reps", "-2"], "--reps: -2: must be at least 1"),
    Case(["cpr-inspect"], "the following arguments are required: path"),
    Case(["cpr-inspect", "/nonexistent/dir/c.sock", "--timeout", "1"], "Failed to bind socket"),
    Case(["teleport"], "invalid choice: 'teleport'"),
    Case(["lab", "--notebooks", "/nonexistent/notebooks"], "notebooks folder not found"),
    Case(["vm", "-m", "0"], "below the emulator's minimum of 1 MiB"),
    # labkit-vm: QEMU's option syntax, QEMU's texts where QEMU has one
    Case(["-m", "0"], "-m 0: RAM size 0 B is below the emulator's minimum of 1 MiB", prog="labkit-vm"),
    Case(["-m", "1K"], "minimum of 1 MiB", prog="labkit-vm"),
    Case(["-m", "lots"], "Parameter 'size' expects a non-negative number", prog="labkit-vm"),
    Case(["-m"], "-m: requires an argument", prog="labkit-vm"),
    Case(["-enable-kvm"], "the emulator has no KVM", prog="labkit-vm"),
    Case(["-accel", "kvm"], "the emulator has no KVM", prog="labkit-vm"),
    Case(["-smp", "2"], "exactly one vCPU", prog="labkit-vm"),
    Case(["--bogus"], "--bogus: invalid option", prog="labkit-vm"),
    Case(["-qmp", "unix:/nonexistent/dir/q.sock,server=on,wait=off"],
         "Failed to bind socket to /nonexistent/dir/q.sock: No such file or directory", prog="labkit-vm"),
    Case(["-object", "memory-backend-memfd,id=r,size=0"], "can't create backend with size 0", prog="labkit-vm"),
    Case(["-m", "64M", "-x-guest", "working-set=128M"], "larger than guest RAM", prog="labkit-vm"),
    Case(["-x-hold", "nowhere"], "unknown hold point 'nowhere'", prog="labkit-vm"),
    Case(["-machine", "q35,turbo=on"], "Property 'q35-machine.turbo' not found", prog="labkit-vm"),
]  # fmt: skip


def _cmd(case: Case) -> list[str]:
    module = "labkit.cli.main" if case.prog == "labkit" else "labkit.vm"
    return [sys.executable, "-m", module, *case.argv]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_gets_one_line(case: Case):
    if case.qemu and QEMU_MISSING:
        pytest.skip(QEMU_MISSING)
    if "1T" in case.argv and available_memory() >= 1 << 40:
        pytest.skip("this host has 1 TiB free")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("LABKIT_DEBUG", None)
    t0 = time.monotonic()
    r = subprocess.run(_cmd(case), capture_output=True, text=True, env=env, timeout=case.bound + 60)
    took = time.monotonic() - t0
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    assert r.returncode != 0
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert case.expect in lines[0], lines[0]
    assert took < case.bound, f"{took:.1f} s"


LAB_CASES = [
    (dict(ram=0), "16.0 MiB to"),
    (dict(ram="1K"), "16.0 MiB to"),
    (dict(ram="1T"), "available memory"),
    (dict(ram="64M", working_set="1G"), "larger than guest RAM"),
    (dict(downtime_limit=-1), "0 to 2000000"),
    (dict(backend="kvm"), "backend 'kvm': choose one of emulated, qemu"),
    (dict(mode="cpr-exec-please"), "mode must be one of"),
    (dict(pattern="zigzag"), "pattern 'zigzag'"),
    (dict(dirty_rate="fast"), "dirty rate (--dirty-rate): invalid size"),
    (dict(memory_backend="hugetlb"), "memory backend 'hugetlb'"),
]


@pytest.mark.parametrize("kwargs,expect", LAB_CASES, ids=[str(k) for k, _ in LAB_CASES])
def test_lab_refuses_before_spawning(kwargs, expect, tmp_path, monkeypatch):
    if kwargs.get("ram") == "1T" and available_memory() >= 1 << 40:
        pytest.skip("this host has 1 TiB free")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # nothing may be created either: no run dir left behind
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    t0 = time.monotonic()
    with pytest.raises(LabError) as exc:
        Lab(**kwargs)
    assert time.monotonic() - t0 < BOUND
    text = str(exc.value)
    assert "\n" not in text and expect in text, text
    assert list(tmp_path.iterdir()) == []


def test_table_is_large_enough():
    assert len(CASES) + len(LAB_CASES) >= 30
