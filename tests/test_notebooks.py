"""Every notebook under notebooks/ (exercises and solutions too) runs top to bottom, and none is stored with
outputs.

Each notebook runs in a fresh python3 kernel with its own folder as the working directory, in a runner
subprocess (`python tests/test_notebooks.py NOTEBOOK REPORT`) so the kernel's sockets and threads never touch
the test process. A notebook fails on any error output, on a cell that exceeds the per-notebook timeout
(LABKIT_NOTEBOOK_TIMEOUT, 90 s by default), and on any process it leaves running in its kernel: notebooks
end with a cell that closes their lab.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
TIMEOUT = int(os.environ.get("LABKIT_NOTEBOOK_TIMEOUT", "90"))
KERNEL_START = 30  # seconds on top of the cells' budget: kernel start and shutdown
OWN = (
    "00-start-here",
    "01-memfd-and-fd-passing",
    "02-cpr-transfer-step-by-step",
    "03-real-qemu-step-by-step",
    "04-pause-time-normal-vs-cpr",
    "05-blockers-and-failures",
    "06-cpr-reboot",
    "08-after-the-pause",
)


def all_notebooks() -> list[Path]:
    return sorted(p for p in NOTEBOOKS.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def _id(path: Path) -> str:
    return str(path.relative_to(NOTEBOOKS))


# ------------------------------------------------------------------------------------------------ the runner


def _problems(nb) -> list[str]:
    """Error outputs, and tracebacks printed to stderr, cell by cell."""
    found = []
    for index, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                found.append(f"cell {index}: {out.get('ename')}: {out.get('evalue')}")
            elif (
                out.get("output_type") == "stream"
                and out.get("name") == "stderr"
                and "Traceback" in out["text"]
            ):
                found.append(f"cell {index}: traceback on stderr:\n{out['text'][-2000:]}")
    return found


def run_notebook(path: Path, timeout: int = TIMEOUT) -> dict:
    """Execute one notebook in a fresh kernel; report seconds, problems and processes left behind."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=timeout,
        allow_errors=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    report: dict = {"notebook": str(path), "problems": [], "left": [], "cells": []}
    t0 = time.monotonic()
    with client.setup_kernel():
        kernel = psutil.Process(client.km.provisioner.process.pid)
        count = 0
        for index, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                count += 1
            start = time.monotonic()
            try:
                client.execute_cell(cell, index, execution_count=count)
            except CellTimeoutError as e:
                report["problems"].append(f"cell {index} ran past the {timeout} s timeout: {e}")
                break
            except CellExecutionError as e:
                report["problems"].append(f"cell {index} raised:\n{str(e)[-3000:]}")
                break
            finally:
                report["cells"].append(round(time.monotonic() - start, 2))
            if time.monotonic() - t0 > timeout:
                report["problems"].append(f"the notebook ran past its {timeout} s timeout at cell {index}")
                break
        report["seconds"] = round(time.monotonic() - t0, 2)
        deadline = time.monotonic() + 5
        while kernel.children(recursive=True) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = kernel.children(recursive=True)
        report["left"] = [" ".join(p.cmdline()[:3]) for p in left if p.is_running()]
        for p in left:
            p.kill()
    report["problems"] += [p for p in _problems(nb) if p not in report["problems"]]
    report["stdout"] = "".join(
        out.get("text", "")
        for cell in nb.cells
        for out in cell.get("outputs", [])
        if out.get("output_type") == "stream" and out.get("name") == "stdout"
    )
    return report


# ------------------------------------------------------------------------------------------------- the tests


def test_the_notebooks_are_there():
    names = {p.stem for p in all_notebooks()}
    assert set(OWN) <= names, f"missing: {sorted(set(OWN) - names)}"


@pytest.mark.parametrize("path", all_notebooks(), ids=_id)
def test_notebook_is_stored_without_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]
    assert not dirty, (
        f"{_id(path)}: cells {dirty} hold outputs or execution counts (strip them before committing)"
    )
    assert "widgets" not in nb.metadata, f"{_id(path)}: saved widget state in the metadata"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


def _run(path: Path, env: dict[str, str] | None = None) -> dict:
    """Run one notebook through the runner subprocess; kill it and its kernel if it overruns."""
    with tempfile.TemporaryDirectory(prefix="labkit-nbtest-") as tmp:
        out = Path(tmp) / "report.json"
        runner = subprocess.Popen(
            [sys.executable, __file__, str(path), str(out)], cwd=ROOT, env={**os.environ, **(env or {})}
        )
        try:
            runner.wait(TIMEOUT + KERNEL_START)
        except subprocess.TimeoutExpired:
            for p in psutil.Process(runner.pid).children(recursive=True):
                p.kill()
            runner.kill()
            runner.wait()
            pytest.fail(f"{_id(path)} did not finish within {TIMEOUT + KERNEL_START} s")
        assert runner.returncode == 0, f"the notebook runner failed for {_id(path)}"
        report = json.loads(out.read_text())
    print(f"{_id(path)}: {report['seconds']} s; cells {report['cells']}")
    assert not report["problems"], "\n\n".join(report["problems"])
    assert not report["left"], f"{_id(path)} left processes running: {report['left']}"
    return report


@pytest.mark.timeout(TIMEOUT + KERNEL_START + 30)
@pytest.mark.parametrize("path", all_notebooks(), ids=_id)
def test_notebook_runs_top_to_bottom(path: Path):
    _run(path)


@pytest.mark.timeout(TIMEOUT + KERNEL_START + 30)
def test_real_qemu_notebook_stops_cleanly_without_qemu():
    """Where QEMU 10 is missing, 03 explains how to install it and every later cell says it skipped."""
    report = _run(NOTEBOOKS / "03-real-qemu-step-by-step.ipynb", env={"LABKIT_QEMU": "/nonexistent/qemu-system-x86_64"})
    assert "real QEMU 10: not available" in report["stdout"]
    assert "skipped: real QEMU 10 is not available here" in report["stdout"]
    assert "Phase:" not in report["stdout"]


if __name__ == "__main__":
    result = run_notebook(Path(sys.argv[1]))
    Path(sys.argv[2]).write_text(json.dumps(result))
