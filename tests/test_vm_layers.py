"""The emulator's import graph (labkit.vm), read with grimp (import-linter's graph builder): no import circle
among its modules, migration/ below the VM that owns it, and nothing of the lab side.

migration/ reaches the VM through migration/interface.py's Protocols, so no module it imports from labkit.vm
may import migration/ back; these tests fail on the first import that would close a circle.
"""

from __future__ import annotations

import grimp
import pytest

pytestmark = pytest.mark.timeout(120)

MIGRATION = "labkit.vm.migration"


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("labkit")


def _vm_edges(graph: grimp.ImportGraph) -> dict[str, set[str]]:
    mods = [m for m in graph.modules if m == "labkit.vm" or m.startswith("labkit.vm.")]
    return {m: {i for i in graph.find_modules_directly_imported_by(m) if i in mods} for m in mods}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), i.e. every import circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for m in sorted(edges):
        if m not in index:
            visit(m)
    return found


def test_no_import_circle_among_the_emulators_modules(graph: grimp.ImportGraph) -> None:
    assert _cycles(_vm_edges(graph)) == []


def test_migration_imports_no_vm_module_that_imports_migration(graph: grimp.ImportGraph) -> None:
    edges = _vm_edges(graph)
    used = {d for m, deps in edges.items() if m.startswith(MIGRATION) for d in deps if not d.startswith(MIGRATION)}
    assert "labkit.vm.vm" not in used
    # labkit.vm itself (the package's __init__, T_ENTERED_NS) contains migration/: only its own imports count
    back = {d for d in used if d == "labkit.vm" and any(i.startswith(MIGRATION) for i in edges[d])}
    back |= {
        d
        for d in used - {"labkit.vm"}
        if graph.find_shortest_chain(importer=d, imported=MIGRATION, as_packages=True)
    }
    assert back == set(), f"{MIGRATION} imports {sorted(back)}, which import it back"


def test_the_emulator_imports_nothing_of_the_lab_side(graph: grimp.ImportGraph) -> None:
    allowed = {"labkit", "labkit.errors", "labkit.qemu_syntax"}
    outside = {
        (m, i)
        for m in graph.modules
        if m.startswith("labkit.vm")
        for i in graph.find_modules_directly_imported_by(m)
        if i.startswith("labkit") and not i.startswith("labkit.vm") and i not in allowed
    }
    assert outside == set()
