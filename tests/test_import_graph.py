"""Import graph of the project's own modules: imports point down, so there is no cycle.

Every import counts: at module level, inside functions, under ``TYPE_CHECKING`` and through
``importlib.import_module("...")`` with a constant name, and any string constant that is exactly a project
module's dotted name (a registry of modules to import by name). A package ``__init__`` that re-exports its submodules
is an edge from the package to each of them, so a submodule must import its siblings directly, never its own
package. Importing ``a.b.c`` from outside package ``a.b`` runs ``a/b/__init__.py`` first, so that is an edge to
the package ``a.b`` too (the runtime cycle this catches: a module of package X importing a submodule of package
Y whose ``__init__`` imports, through any chain, that module of X).
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("instdiff", "pipelines", "cluster")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _resolve(name: str, modules: dict[str, pathlib.Path]) -> str | None:
    """The project module ``name`` refers to (itself, or the closest enclosing package), or None."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    targets: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [f"{mod}.{a.name}" for a in node.names]  # a submodule, or a name in ``mod``
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in modules:
            names = [node.value]  # importlib.import_module("pkg.mod"), or a tuple of module names to import
        for name in names:
            target = _resolve(name, modules)
            if target and target != module:
                targets.add(target)
                targets.update(_outer_packages(module, target, modules))
    return targets


def _outer_packages(importer: str, target: str, modules: dict[str, pathlib.Path]) -> set[str]:
    """Packages enclosing ``target`` that do not enclose ``importer``: Python runs their ``__init__`` first."""
    out = set()
    parts = target.split(".")
    for k in range(1, len(parts)):
        package = ".".join(parts[:k])
        if package in modules and not (importer == package or importer.startswith(package + ".")):
            out.add(package)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_between_project_modules():
    found = cycles(import_graph())
    assert not found, "import cycles (each line one strongly connected set):\n" + "\n".join(map(str, found))


def test_layers_point_down():
    """instdiff never imports pipelines or cluster; pipelines never imports cluster."""
    graph = import_graph()
    rank = {"instdiff": 0, "pipelines": 1, "cluster": 2}
    upward = [(a, b) for a, targets in graph.items() for b in targets if rank[b.split(".")[0]] > rank[a.split(".")[0]]]
    assert not upward, f"imports that point up a layer: {upward}"


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
