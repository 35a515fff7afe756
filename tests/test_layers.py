"""The shape of labkit/ that the README's Architecture section promises, checked on the import graph.

import-linter (`make lint`) holds the layer order; these tests hold what a layers contract cannot say: no
import circle anywhere inside labkit/, no module over 600 lines, and the emulated QEMU (labkit.vm) importing
only the leaves both sides share. The graph is grimp's (import-linter's own), built from the source text, so
an import inside a function counts: a circle hidden in a function is still a circle. For circles, an import
under TYPE_CHECKING does not: a type named in a signature (Machine(config, runner: Runner), a Runner's methods
taking a Machine) is no import at run time. The emulator may not name the lab side's types either.
"""

from __future__ import annotations

from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "labkit"
MAX_LINES = 600
# what the emulated QEMU may import of labkit outside labkit.vm: the shared leaves and the package itself
VM_MAY_IMPORT = {"labkit", "labkit.qemu_syntax", "labkit.errors"}


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("labkit", cache_dir=None)


@pytest.fixture(scope="module")
def runtime_graph() -> grimp.ImportGraph:
    """The imports that run: those under `if TYPE_CHECKING:` left out."""
    return grimp.build_graph("labkit", exclude_type_checking_imports=True, cache_dir=None)


def import_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module, or a module importing itself (Tarjan's
    algorithm, iterative so a deep graph cannot hit the recursion limit). Each comes back sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in edges.get(node, ()):
                        found.append(sorted(component))
    return sorted(found)


def _edges(graph: grimp.ImportGraph) -> dict[str, set[str]]:
    return {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}


def _describe(graph: grimp.ImportGraph, cycle: list[str]) -> str:
    """One circle, shown as the imports that close it (module:line -> module), for the failure message."""
    members = set(cycle)
    lines = []
    for importer in cycle:
        for imported in sorted(graph.find_modules_directly_imported_by(importer) & members):
            details = graph.get_import_details(importer=importer, imported=imported)
            where = ", ".join(str(d["line_number"]) for d in details) or "?"
            lines.append(f"    {importer}:{where} -> {imported}")
    return "\n".join(lines)


def test_cycle_finder_finds_circles_and_only_circles() -> None:
    """The finder itself, on small graphs whose answer is known: it must see a circle to guard against one."""
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert import_cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}}) == [["a", "b", "c"], ["d"]]
    assert import_cycles({"a": {"b", "c"}, "b": {"a"}, "c": {"d"}, "d": {"c"}}) == [["a", "b"], ["c", "d"]]


def test_no_import_cycle_inside_labkit(runtime_graph: grimp.ImportGraph) -> None:
    cycles = import_cycles(_edges(runtime_graph))
    assert not cycles, "import circles inside labkit/ (each must become one-way):\n" + "\n".join(
        _describe(runtime_graph, c) for c in cycles
    )


def test_no_module_over_600_lines() -> None:
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert len(sizes) > 20, "labkit/ was not found beside tests/"
    over = {path: n for path, n in sorted(sizes.items()) if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines (split them along their seams): {over}"


def test_the_emulator_imports_only_the_shared_leaves(graph: grimp.ImportGraph) -> None:
    """labkit.vm is the emulated QEMU process: like QEMU it knows nothing of the lab that drives it, so a new
    top-level module cannot slip in beside the ones import-linter's contract forbids by name."""
    outside = {
        (importer, imported)
        for importer in graph.find_descendants("labkit.vm") | {"labkit.vm"}
        for imported in graph.find_modules_directly_imported_by(importer)
        if not (imported == "labkit.vm" or imported.startswith("labkit.vm.")) and imported not in VM_MAY_IMPORT
    }
    assert not outside, f"labkit.vm imports the lab side: {sorted(outside)}"


def test_the_layer_contract_is_declared_and_kept() -> None:
    """`make lint` runs lint-imports; this runs the same contracts in-process, so a plain pytest run sees a
    broken layer too (and the contract cannot silently vanish from pyproject.toml)."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert config["root_package"] == "labkit"
    kinds = {c["type"] for c in config["contracts"]}
    assert {"layers", "forbidden"} <= kinds
    from importlinter.cli import lint_imports

    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True) == 0
