"""`labkit lab` opens the kit's own notebooks from a clone or an editable install, wherever it is started."""

from __future__ import annotations

from pathlib import Path

from labkit.cli.jupyter import default_notebooks

ROOT = Path(__file__).resolve().parent.parent


def test_the_notebooks_are_found_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the clone: the folder must come from the package's place, not the cwd
    assert default_notebooks() == ROOT / "notebooks"
    assert (default_notebooks() / "00-start-here.ipynb").is_file()
