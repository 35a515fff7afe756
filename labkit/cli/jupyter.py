"""`labkit lab`: JupyterLab on the kit's notebooks, with the flags this user needs.

Jupyter refuses to run as root without --allow-root, while `labkit doctor` recommends root (page frame
numbers); a workshop laptop runs as a plain user. So the flag is added exactly when the process is root,
and the URL, token included, is printed before JupyterLab starts.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path


def default_notebooks() -> Path:
    """The repository's notebooks/ when run from a clone or an editable install, else the current folder."""
    repo = Path(__file__).resolve().parents[2] / "notebooks"  # labkit/cli/jupyter.py -> the clone
    return repo if repo.is_dir() else Path.cwd()


def jupyter_argv(notebooks: Path, port: int, token: str, browser: bool, is_root: bool) -> list[str]:
    argv = [
        sys.executable, "-m", "jupyterlab",
        f"--ServerApp.root_dir={notebooks}",
        f"--ServerApp.port={port}",
        "--ServerApp.ip=127.0.0.1",
        f"--IdentityProvider.token={token}",
    ]  # fmt: skip
    if not browser:
        argv.append("--no-browser")
    if is_root:
        argv.append("--allow-root")
    return argv


def run_jupyter_lab(notebooks: str | None, port: int = 8888, browser: bool = False, extra=()) -> int:
    """Start JupyterLab in the foreground; Ctrl-C stops it."""
    folder = Path(notebooks).resolve() if notebooks else default_notebooks()
    if not folder.is_dir():
        raise FileNotFoundError(f"notebooks folder not found: {folder}")
    token = secrets.token_hex(16)
    argv = jupyter_argv(folder, port, token, browser, os.geteuid() == 0) + [a for a in extra if a != "--"]
    print(f"labkit: JupyterLab on {folder}", flush=True)
    print(f"labkit: open http://127.0.0.1:{port}/lab?token={token}", flush=True)
    if os.geteuid() == 0:
        print("labkit: running as root (--allow-root): page frame numbers are readable", flush=True)
    proc = subprocess.Popen(argv)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()
