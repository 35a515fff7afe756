"""Everything a learner reads names only files they have: no notebook, doc or docstring may point at a file
outside the repository (a reference note on a development machine, an absolute path). Facts from outside
are copied into docs/ instead. Runtime outputs the kit itself writes are listed in RUNTIME."""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# documentation-like file names, optionally with a folder: docs/faults.md, reference-*.csv, 07-cpr-exec.ipynb
NAME = re.compile(r"(?<![\w./*-])((?:[\w.*-]+/)*[\w*-][\w.*-]*\.(?:md|ipynb|csv|json|txt|rst|png))\b")
ABSOLUTE = re.compile(r"(?<![\w.])(/work/|/home/|~/)[\w./-]+")
RUNTIME = {"results.csv", "report.json", "package.json"}  # written or read at run time, never shipped
# QEMU's own source tree, which the kit reads along with (anyone can open it in QEMU's repository)
QEMU_TREE = ("qapi/", "docs/devel/", "migration/", "system/", "hw/", "util/", "include/", "backends/")
CACHE = ("~/.cache/labkit",)  # where the kit builds the real-QEMU guest on first use


def _repo_files() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    files = out.split()
    return files + [p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")]


def _texts() -> list[tuple[str, str]]:
    texts = []
    for nb in sorted((ROOT / "notebooks").rglob("*.ipynb")):
        if ".ipynb_checkpoints" in nb.parts:
            continue
        cells = json.loads(nb.read_text())["cells"]
        texts.append((str(nb.relative_to(ROOT)), "\n".join("".join(c["source"]) for c in cells)))
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "data" / "README.md"]:
        if md.exists():
            texts.append((str(md.relative_to(ROOT)), md.read_text()))
    for py in sorted((ROOT / "labkit").rglob("*.py")):
        tree = ast.parse(py.read_text())
        docs = [
            ast.get_docstring(node) or ""
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        ]
        texts.append((str(py.relative_to(ROOT)), "\n".join(docs)))
    return texts


def _known(name: str, files: list[str]) -> bool:
    if name in RUNTIME or name.startswith(QEMU_TREE) or name.startswith("PREFIX"):
        return True
    pattern = name if "/" in name else f"*{name}"
    return any(fnmatch.fnmatch(f, pattern) or fnmatch.fnmatch(f, f"*/{name}") for f in files)


@pytest.mark.parametrize("where,text", _texts(), ids=lambda v: v if isinstance(v, str) and len(v) < 80 else "")
def test_names_only_files_in_the_repository(where: str, text: str):
    files = _repo_files()
    unknown = sorted({m for m in NAME.findall(text) if not _known(m, files)})
    absolute = sorted({m.group(0) for m in ABSOLUTE.finditer(text) if not m.group(0).startswith(CACHE)})
    assert not unknown and not absolute, f"{where} names files outside the repository: {unknown + absolute}"
