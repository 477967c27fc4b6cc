"""Imports run one way: no cycle among the modules of ofmipd and auth_backends.

Every import that can run counts, the lazy ones inside functions included (they run too,
only later), and `from package import name` counts as importing package.name when that is
a module. Only `if TYPE_CHECKING:` blocks are left out: they never run.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ofmipd", "auth_backends")

Graph = Mapping[str, set[str]]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under `node`, at any depth, except in TYPE_CHECKING blocks
    (their `else:` branch runs, so it counts)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and is_type_checking(child.test):
            for statement in child.orelse:
                yield from import_nodes_of(statement)
            continue
        yield from import_nodes_of(child)


def import_nodes_of(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    else:
        yield from import_nodes(node)


def imported(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool) -> list[str]:
    """Names of the modules a statement may import (some are not ours: filtered later)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the importer's package, `level` steps up
        package = importer.split(".")
        if not is_package:
            package.pop()
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, set[str]]:
    """module -> the modules of `packages` that importing it (now or later) may run."""
    files = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            files[module_name(path, root)] = path
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        # A submodule's own packages are always imported before it, so they are no edge.
        loaded_first = set(ancestors(name))
        edges: set[str] = set()
        for node in import_nodes(tree):
            for target in imported(node, name, is_package):
                # Importing a.b.c runs a and a.b first.
                for module in (*ancestors(target), target):
                    if module in files and module != name and module not in loaded_first:
                        edges.add(module)
        graph[name] = edges
    return graph


def cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as
    one cycle through them, sorted, so a failure names the modules to untangle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(one_cycle(graph, set(c)) for c in components)


def one_cycle(graph: Graph, component: set[str]) -> list[str]:
    """A path that starts and ends at the component's first module, within it (BFS)."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & component):
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if target not in parents:
                    parents[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"not a cycle: {sorted(component)}")  # pragma: no cover


def test_no_import_cycle_among_our_modules() -> None:
    found = cycles(import_graph(ROOT))
    # One cycle per tangle: untangle it and the next run names any other left in it.
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_construction_and_the_smtp_layer_do_not_know_each_other() -> None:
    # Both depend on ofmipd.app instead; the SMTP layer keeps its own handler cache.
    graph = import_graph(ROOT)
    assert "ofmipd.smtp" not in graph["ofmipd.assemble"]
    assert "ofmipd.assemble" not in graph["ofmipd.smtp"]


def test_the_graph_sees_what_runs() -> None:
    graph = import_graph(ROOT)
    assert "ofmipd.errors" in graph["ofmipd.config"]  # at module level
    assert "ofmipd.metrics" in graph["ofmipd.listeners"]  # inside a function
    assert "ofmipd.stdio" in graph["ofmipd.cli"]  # inside a function
    assert "ofmipd.logs" in graph["ofmipd.cli"]  # `from ofmipd import logs`
    assert "ofmipd.identity" not in graph["ofmipd.auth"]  # only under TYPE_CHECKING


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_lazy_cycle_is_found_and_named(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg import b\n",
            "pkg/b.py": "def later():\n    from . import c\n",
            "pkg/c.py": "import pkg.a\n",
        },
    )
    assert cycles(import_graph(tmp_path, ["pkg"])) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]


def test_type_checking_imports_are_no_edge(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "import pkg.b\n",
            "pkg/b.py": (
                "import typing\nif typing.TYPE_CHECKING:\n    from pkg.a import X\n"
                "else:\n    from pkg import c\n"
            ),
            "pkg/c.py": "",
        },
    )
    graph = import_graph(tmp_path, ["pkg"])
    assert graph["pkg.b"] == {"pkg.c"}
    assert cycles(graph) == []


def test_a_package_importing_its_own_submodule_is_no_cycle(tmp_path: Path) -> None:
    # The package is loaded before its submodule, so pkg.sub needs nothing new from it...
    write(tmp_path, {"pkg/__init__.py": "from pkg import sub\n", "pkg/sub.py": "import pkg\n"})
    assert cycles(import_graph(tmp_path, ["pkg"])) == []
    # ...but another package's module that pkg imports and that imports pkg back is one.
    write(tmp_path, {"other/__init__.py": "", "other/m.py": "import pkg.sub\n"})
    write(tmp_path, {"pkg/__init__.py": "from other import m\n"})
    assert cycles(import_graph(tmp_path, ["pkg", "other"])) == [["other.m", "pkg", "other.m"]]
