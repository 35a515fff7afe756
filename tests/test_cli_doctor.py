"""`labkit doctor`, run for real on this machine: each answer is checked against the thing it names, read
independently here (/dev/kvm opened, the QEMU binary asked its version, memfd + SCM_RIGHTS exercised), and
the text says in words what each answer means for the lab."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import labkit
from labkit.cli.doctor import _memfd_and_scm_rights, doctor, format_doctor

ROOT = Path(__file__).resolve().parent.parent
KEYS = {
    "python", "labkit", "platform", "cpus", "memfd-scm-rights", "memfd-scm-rights-detail", "kvm", "qemu",
    "qemu-version", "qemu-cpr-transfer", "root", "python-executable",
}  # fmt: skip


def _kvm_opens() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def _qemu_version_here(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
    return out.split("version ", 1)[1].split()[0]


@pytest.fixture(scope="module")
def report() -> dict:
    return doctor()


def test_memfd_and_scm_rights_really_pass_an_fd():
    ok, text = _memfd_and_scm_rights()
    assert ok is True and text == "memfd_create and SCM_RIGHTS work"  # Linux >= 3.17: memfd, always here


def test_every_answer_matches_what_this_machine_has(report):
    assert KEYS <= set(report)
    assert report["labkit"] == labkit.__version__
    assert report["python"] == platform.python_version() and report["python-executable"] == sys.executable
    assert report["cpus"] == os.cpu_count()
    assert report["root"] == (os.geteuid() == 0)
    assert report["memfd-scm-rights"] is True
    assert report["kvm"] == _kvm_opens()


def test_qemu_is_found_and_its_version_read_from_the_binary(report):
    if report["qemu"] is None:
        assert shutil.which("qemu-system-x86_64") is None or report["qemu-version"] is None
        assert report["qemu-cpr-transfer"] is False
        pytest.skip("qemu-system-x86_64 not installed here")
    assert os.access(report["qemu"], os.X_OK)
    assert report["qemu-version"] == _qemu_version_here(report["qemu"])
    major = int(report["qemu-version"].split(".")[0])
    assert report["qemu-cpr-transfer"] == (major >= 10)  # cpr-transfer is QEMU 10.0's


def test_the_text_says_what_each_answer_means(report):
    text = format_doctor(report)
    lines = text.splitlines()
    assert lines[0].startswith(f"labkit {labkit.__version__} on Python {platform.python_version()}")
    assert "memfd + SCM_RIGHTS : yes (memfd_create and SCM_RIGHTS work)" in text
    kvm = next(line for line in lines if "/dev/kvm usable" in line)
    assert kvm.endswith(": yes") if report["kvm"] else "fall back to TCG" in kvm
    if report["qemu"]:
        assert f"qemu-system-x86_64 : {report['qemu-version']} at {report['qemu']}" in text
    assert lines[-1].startswith("  emulated backend   : always available")


def test_the_text_for_a_machine_without_qemu_kvm_or_root(report):
    """The other branch of each line, on this machine's report with those three answers turned off."""
    bare = {**report, "kvm": False, "qemu": None, "qemu-version": None, "qemu-cpr-transfer": False, "root": False}
    text = format_doctor(bare)
    assert "/dev/kvm usable    : no (real QEMU would fall back to TCG)" in text
    assert "qemu-system-x86_64 : not installed (scripts/install-qemu installs QEMU 10 on Debian 12)" in text
    assert "root               : no (physical frame numbers in /proc/PID/pagemap read as 0 without root)" in text
    old = {**report, "qemu": "/usr/bin/qemu-system-x86_64", "qemu-version": "8.2.2", "qemu-cpr-transfer": False}
    assert "8.2.2 at /usr/bin/qemu-system-x86_64; cpr-transfer needs QEMU >= 10.0" in format_doctor(old)


def test_the_cli_prints_the_same_report_as_json():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-m", "labkit.cli", "doctor", "--json"], capture_output=True, text=True, env=env, timeout=60
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert KEYS <= set(got) and got["memfd-scm-rights"] is True and got["labkit"] == labkit.__version__
