"""What changes without root, checked as whichever user runs the suite (CI runs it as root in `make test` and
as a plain user in scripts/ci-unprivileged): the kit degrades with a message, it does not fail."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from labkit.cli.doctor import doctor, format_doctor
from labkit.cli.jupyter import default_notebooks, jupyter_argv
from labkit.host.hugepages import HugePagePool, pool_for, read_pools, set_pool
from labkit.host.procfs import page_frames

ROOT_USER = os.geteuid() == 0


def test_doctor_says_what_root_would_add():
    text = format_doctor(doctor())
    if ROOT_USER:
        assert "root               : yes" in text
    else:
        assert "root               : no (physical frame numbers in /proc/PID/pagemap read as 0 without root)" in text


def test_page_frames_are_hidden_not_failing_without_root():
    m = mmap.mmap(-1, 4096)
    try:
        m[0] = 1  # touch it: a present page
        cell = ctypes.c_char.from_buffer(m)
        (pfn,) = page_frames("self", [ctypes.addressof(cell)])
        del cell
    finally:
        m.close()
    if ROOT_USER:
        assert pfn and pfn > 0
    else:
        assert pfn is None  # the kernel reads it as 0 for a plain user: "not available", never an error


def test_labkit_lab_adds_allow_root_only_for_root():
    nb = Path("/x/notebooks")
    as_user = jupyter_argv(nb, 8888, "tok", browser=False, is_root=False)
    as_root = jupyter_argv(nb, 8888, "tok", browser=False, is_root=True)
    assert "--allow-root" not in as_user and "--allow-root" in as_root
    assert "--IdentityProvider.token=tok" in as_user and "--no-browser" in as_user
    assert f"--ServerApp.root_dir={nb}" in as_user


def test_labkit_lab_opens_the_kits_notebooks():
    assert (default_notebooks() / "00-start-here.ipynb").is_file()


# ------------------------------------------------------------------------------ huge page pools

HUGE = 2 << 20
REPO = Path(__file__).resolve().parents[1]


def _runs_as_nobody(python: str) -> bool:
    try:
        r = subprocess.run(["runuser", "-u", "nobody", "--", python, "-c", ""], capture_output=True, timeout=30)
    except OSError:
        return False
    return r.returncode == 0


def _hugepages_cli(*args: str, as_nobody: bool = False) -> subprocess.CompletedProcess:
    """`labkit hugepages ...` as a real process; as_nobody drops root first, so a root run tests the plain
    user's path for real too."""
    preexec = None
    if as_nobody:
        nobody = pwd.getpwnam("nobody")

        def preexec():
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)

    env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": "/tmp"}
    python = sys.executable
    if as_nobody and not _runs_as_nobody(python):
        python = "/usr/bin/python3"  # root's own interpreter may sit under a 0700 home (pyenv)
        if not _runs_as_nobody(python):
            pytest.skip("no Python interpreter that user 'nobody' may run")
    return subprocess.run(
        [python, "-m", "labkit.cli", "hugepages", *args],
        capture_output=True, text=True, env=env, timeout=60, preexec_fn=preexec,
    )  # fmt: skip


def test_doctor_reports_the_hugepage_pools():
    report = doctor()
    pools = read_pools()
    assert [HugePagePool.from_dict(d) for d in report["hugepages"]] == pools
    (line,) = [ln for ln in format_doctor(report).splitlines() if ln.startswith("  huge pages ")]
    if not pools:
        assert "no hugetlbfs" in line
    for p in pools:
        assert p.describe() in line  # e.g. "2 MiB: 0 total, 0 free, 0 reserved"


def test_hugepages_reserve_without_root_says_what_to_run_and_why():
    if not any(p.page_size == HUGE for p in read_pools()):
        pytest.skip("this kernel has no 2 MiB huge page pool")
    if ROOT_USER:
        try:
            pwd.getpwnam("nobody")
        except KeyError:
            pytest.skip("root, and no user 'nobody' to drop to")
    before = pool_for(HUGE).total
    r = _hugepages_cli("--reserve", "64M", as_nobody=ROOT_USER)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    (line,) = r.stderr.splitlines()
    assert "reserving 64.0 MiB of 2 MiB pages needs root" in line
    assert "because they leave ordinary memory" in line  # why
    assert "run `echo 32 | sudo tee /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages`" in line  # what
    assert pool_for(HUGE).total == before


def test_hugepages_reserve_as_root_sets_the_pool():
    if not any(p.page_size == HUGE for p in read_pools()):
        pytest.skip("this kernel has no 2 MiB huge page pool")
    if not ROOT_USER:
        pytest.skip("setting a pool needs root (the plain user's path is the test above)")
    before = pool_for(HUGE).total
    try:
        r = _hugepages_cli("--reserve", f"{(before + 2) * 2}M")
        assert r.returncode == 0, r.stderr
        assert pool_for(HUGE).total == before + 2
        assert f"2 MiB pool set to {before + 2} pages" in r.stdout
        listed = _hugepages_cli("--json")
        assert any(d["page_size"] == HUGE and d["total"] == before + 2 for d in json.loads(listed.stdout))
    finally:
        set_pool(HUGE, before)
    assert pool_for(HUGE).total == before
