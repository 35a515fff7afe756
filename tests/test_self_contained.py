"""The project is self-contained: no notebook, doc or docstring names a file outside the repository.

A learner who clones labkit has only the repository, so a hint that points at a file on a development
machine (an absolute home or work path) or at a notes file that was never committed is a dead end. This test
reads every notebook cell, every Markdown page (README.md, docs/) and every docstring under labkit/, finds
what looks like a path or a file name, and fails on any that the repository does not hold. QEMU's own source
files (`migration/cpr.c`, `include/migration/cpr.h`) are citations of QEMU's public tree, not files of
this project, and system paths (/proc, /dev, /tmp, ...) name the machine's, so neither counts.
"""

from __future__ import annotations

import ast
import fnmatch
import re
import subprocess
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(60)

# Directories no repository file lives under: a path starting here is somebody's machine.
FOREIGN_ROOTS = ("/work/", "/home/", "/Users/", "/root/", "/mnt/", "/srv/")
# Extensions of files a project names as its own (docs, code, data, notebooks).
OWN_EXTENSIONS = ("md", "txt", "py", "ipynb", "csv", "json", "toml", "cfg", "ini", "yaml", "yml", "sh", "rst")
# QEMU's source tree, cited by its own paths (QEMU is public: a citation, not a file of this project).
QEMU_TREE = ("qapi/", "docs/devel/", "docs/system/", "migration/", "hw/", "system/", "include/", "backends/",
             "util/", "accel/", "target/", "scripts/analyze-migration.py", "tests/qtest/", "tests/functional/")  # fmt: skip
# Files labkit writes when it runs (named as outputs, not as sources to read).
OUTPUTS = ("results.csv",)
PLACEHOLDER_RE = re.compile(r"\b(?:PREFIX|NAME|DIR|PATH|PID|HASH)\b|<[^>]*>")  # PREFIX-summary.csv, guest-<hash>.elf: a pattern, not a file
FILE_RE = re.compile(
    r"(?<![\w.$/-])((?:[\w.*-]+/)*[\w*-][\w.*-]*\.(?:" + "|".join(OWN_EXTENSIONS) + r"))(?![\w/-])"
)
FOREIGN_RE = re.compile(r"(?<![\w.@])(" + "|".join(re.escape(r) for r in FOREIGN_ROOTS) + r")[^\s`'\")\]]*")


def repo_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return [line for line in out.splitlines() if (ROOT / line).exists()]


FILES = repo_files()
NAMES = {Path(f).name for f in FILES}


def in_repo(name: str, where: Path) -> bool:
    """A file name resolves if it is a repository path (from the root or from the citing file's folder), or
    the name or tail of a repository file, or a glob matching one."""
    name = name.lstrip("./")
    if name.startswith(QEMU_TREE) or name in OUTPUTS or PLACEHOLDER_RE.search(name):
        return True
    if "*" in name:
        return any(fnmatch.fnmatch(f, f"*{name}") for f in FILES)
    if (ROOT / name).exists() or (where.parent / name).resolve().exists():
        return True
    return name in NAMES or any(f.endswith("/" + name) for f in FILES)


def texts() -> list[tuple[str, Path, str]]:
    """(label, file, text) for every notebook cell, Markdown page and labkit docstring."""
    out = []
    for path in sorted((ROOT / "notebooks").rglob("*.ipynb")):
        if ".ipynb_checkpoints" in path.parts:
            continue
        for i, cell in enumerate(nbformat.read(path, as_version=4).cells):
            out.append((f"{path.relative_to(ROOT)} cell {i}", path, cell.source))
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        out.append((str(path.relative_to(ROOT)), path, path.read_text()))
    for path in sorted((ROOT / "labkit").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    label = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 1)}"
                    out.append((label, path, doc))
    return out


def outside_references(text: str, where: Path) -> list[str]:
    found = [m.group(0) for m in FOREIGN_RE.finditer(text)]
    for m in FILE_RE.finditer(text):
        name = m.group(1)
        token_start = max(text.rfind(c, 0, m.start()) for c in " \n\t(<[") + 1
        if "://" in text[token_start : m.end()]:
            continue  # part of a URL: a web page, not a file
        if not in_repo(name, where):
            found.append(name)
    return found


TEXTS = texts()


def test_the_scan_sees_notebooks_docs_and_docstrings():
    labels = [label for label, _, _ in TEXTS]
    assert any(label.startswith("notebooks/exercises/") for label in labels)
    assert any(label.startswith("docs/") for label in labels)
    assert sum(label.startswith("labkit/") for label in labels) > 50


@pytest.mark.parametrize(
    "text,bad",
    [
        ("see `/work/shared/reference/qemu-cpr-transfer.md` §3", ["/work/shared/reference/qemu-cpr-transfer.md"]),
        ("what `qemu-10-observed.md` shows", ["qemu-10-observed.md"]),
        ("notes in /home/dev/notes/cpr.txt", ["/home/dev/notes/cpr.txt"]),
        ("copied from cpr-notes.txt and NOTES.md", ["cpr-notes.txt", "NOTES.md"]),
        ("QEMU's qapi/migration.json; writes PREFIX-summary.csv and results.csv", []),
        ("see docs/cpr-errors.md and labkit/teach/exercises/checking.py", []),
        ("maps show /proc/PID/maps and /dev/kvm, block /rom@etc/acpi/rsdp", []),
        ("QEMU's migration/cpr.c and data/reference-*.csv", []),
        ("https://www.qemu.org/docs/master/devel/migration/CPR.rst", []),
    ],
)
def test_the_scan_flags_outside_names_only(text, bad):
    assert outside_references(text, ROOT / "README.md") == bad


FILES_SCANNED = sorted({path for _, path, _ in TEXTS})


@pytest.mark.parametrize("path", FILES_SCANNED, ids=lambda p: str(p.relative_to(ROOT)))
def test_names_no_file_outside_the_repository(path):
    bad = [f"{label}: {name}" for label, where, text in TEXTS if where == path
           for name in outside_references(text, where)]  # fmt: skip
    assert not bad, "names not in the repository (copy the facts into docs/ instead):\n" + "\n".join(bad)
