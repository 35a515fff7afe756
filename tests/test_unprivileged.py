"""What changes without root, checked as whichever user runs the suite (CI runs it as root in `make test` and
as a plain user in scripts/ci-unprivileged): the kit degrades with a message, it does not fail."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

from labkit.cli.doctor import doctor, format_doctor
from labkit.cli.jupyter import default_notebooks, jupyter_argv
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
