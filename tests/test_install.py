"""The package installs anywhere: a wheel built from this tree, in a fresh venv, runs the demo and the qemu
backend (whose guest is built from sources that must travel inside the wheel as package data).

Slow by nature (a wheel build, a venv, a demo): marked `install`, still run by `make test` and in CI, with a
timeout well above what it takes here (printed at the end).
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

from labkit.host.runners.qemu import qemu_missing

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.install, pytest.mark.timeout(600)]


def _env() -> dict:
    """The user's environment, without this checkout on the path: only the installed wheel may answer."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(argv, cwd, timeout) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{argv}: exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r


def test_wheel_in_fresh_venv_runs_demo_and_qemu_backend(tmp_path):
    t0 = time.monotonic()
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)], tmp_path, 300)
    (wheel,) = wheels.glob("labkit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for src in ("guest.c", "boot.S", "layout.h", "link.ld"):
        assert f"labkit/guest/{src}" in names, f"guest/{src} is not package data"
    t_wheel = time.monotonic()

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, 120)
    py = str(venv / "bin" / "python")
    _run([py, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], tmp_path, 120)
    # The dependencies (JupyterLab and friends, ~1.5 min to install from pip's cache, as `make demo` does)
    # come from this test's own environment, appended *after* the venv's site-packages: `labkit` itself can
    # only come from the wheel (the environment's editable labkit hooks in through a .pth file, which a
    # directory added this way does not run).
    site = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, 60).stdout
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site.strip()) / "labkit-test-deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    t_install = time.monotonic()
    where = _run([str(venv / "bin" / "python"), "-c", "import labkit; print(labkit.__file__)"], tmp_path, 60)
    assert where.stdout.strip().startswith(str(venv)), where.stdout  # the wheel, not this checkout

    bin_ = venv / "bin"
    _run([str(bin_ / "labkit"), "--version"], tmp_path, 60)
    demo = _run([str(bin_ / "labkit"), "demo", "--ram", "64M", "--out", str(tmp_path / "demo")], tmp_path, 300)
    assert "wrote" in demo.stdout
    assert (tmp_path / "demo" / "results.csv").is_file()
    assert len(list((tmp_path / "demo").glob("*.png"))) >= 7
    t_demo = time.monotonic()

    missing = qemu_missing()
    if missing is None:
        r = _run([str(bin_ / "labkit"), "migrate", "--backend", "qemu", "--ram", "64M"], tmp_path, 300)
        assert "guest memory verified: True" in r.stdout, r.stdout
    t_qemu = time.monotonic()
    print(
        f"\nwheel {t_wheel - t0:.1f} s, venv + pip install --no-deps {t_install - t_wheel:.1f} s, demo {t_demo - t_install:.1f} s, "
        f"qemu migrate {'skipped: ' + missing if missing else f'{t_qemu - t_demo:.1f} s'}"
    )
