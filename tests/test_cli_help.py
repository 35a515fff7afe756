"""The ways in: `labkit` with no arguments, --version, `labkit vm` passing QEMU options through, `labkit-vm
--help`, a VM started with no monitor, and `labkit lab` printing a URL that JupyterLab answers."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from labkit.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def test_no_arguments_prints_help_with_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for command in ("doctor", "migrate", "demo", "bench", "cpr-inspect", "vm", "lab", "hugepages", "--version"):
        assert command in out


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("labkit 0.")


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_labkit_vm_help_lists_qemu_and_lab_options(flag):
    r = subprocess.run([sys.executable, "-m", "labkit.vm", flag], capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 0 and r.stderr == ""
    for opt in ("-m SIZE", "-machine", "-object", "-qmp", "-incoming", "-x-guest", "-x-hold", "qmp-shell"):
        assert opt in r.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _line_with(proc: subprocess.Popen, stream, text: str, timeout: float) -> str:
    """Wait for a line holding `text`. Reads the raw fd (os.read), never the text wrapper: a wrapper's
    readline() can pull several lines into its own buffer, after which select() sees nothing left to read."""
    deadline = time.monotonic() + timeout
    fd, pending = stream.fileno(), b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if text in line.decode(errors="replace"):
                return line.decode(errors="replace")
        if not chunk and proc.poll() is not None:
            break
    raise AssertionError(f"no line with {text!r} within {timeout} s")


def test_labkit_vm_without_qmp_warns():
    p = subprocess.Popen([sys.executable, "-m", "labkit.vm", "-m", "16M"], stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        _line_with(p, p.stderr, "warning: no -qmp given", 60)
    finally:
        p.send_signal(signal.SIGTERM)  # exit 0 once running, or the default -SIGTERM while still starting
        rc = p.wait(30)
        p.stderr.close()
    assert rc in (0, -signal.SIGTERM)


def test_labkit_vm_subcommand_passes_qemu_options_through(tmp_path):
    from labkit.host.qmp_sync import QMP

    sock = str(tmp_path / "q.sock")
    argv = [sys.executable, "-m", "labkit.cli.main", "vm", "-m", "64M",
            "-machine", "q35,aux-ram-share=on,memory-backend=ram0",
            "-object", "memory-backend-memfd,id=ram0,size=64M,share=on",
            "-qmp", f"unix:{sock},server=on,wait=off", "-x-guest", "dirty-rate=1M"]  # fmt: skip
    p = subprocess.Popen(argv, env=ENV, stderr=subprocess.PIPE)
    qmp = QMP("passthrough")
    try:
        qmp.connect(sock, 60, alive=lambda: p.poll() is None)
        assert qmp.cmd("query-status")["status"] == "running"
        qmp.cmd("quit")
        assert p.wait(30) == 0
    finally:
        qmp.close()
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stderr.close()


@pytest.mark.timeout(180)
def test_labkit_lab_prints_a_url_jupyterlab_answers():
    port = _free_port()
    p = subprocess.Popen(
        [sys.executable, "-m", "labkit.cli.main", "lab", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV,
    )  # fmt: skip
    try:
        line = _line_with(p, p.stdout, f"http://127.0.0.1:{port}/lab?token=", 60)
        token = line.strip().rsplit("token=", 1)[1]
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=5) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert p.poll() is None and time.monotonic() < deadline, "JupyterLab did not answer"
                time.sleep(0.5)
    finally:
        p.send_signal(signal.SIGINT)  # labkit stops JupyterLab, then exits
        try:
            p.wait(60)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            p.stdout.close()
