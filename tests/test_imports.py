"""No import cycles between the modules of src/ernie45.

Every module is parsed with `ast` and each import of an ernie45 module becomes an edge, wherever it stands: at module
level, or deferred inside a function (a lazy import only hides a cycle until both modules are needed). Relative
imports are resolved; `from package import name` points at the submodule `package.name` where there is one, else at
the package. A package's `__init__` is not an implicit target of the imports of its submodules.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "ernie45"


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if package else parts)] = (path, package)
    return out


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: line of its first import}, within ernie45."""
    modules = _modules()

    def known(name: str) -> str | None:  # `import a.b.attr`-style names fall back to their module
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {}
    for name, (path, package) in modules.items():
        here = name if package else name.rpartition(".")[0]
        edges = graph.setdefault(name, {})
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join([*parent, *([node.module] if node.module else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                dep = known(target) if target.split(".")[0] == "ernie45" else None
                if dep and dep != name:
                    edges.setdefault(dep, node.lineno)
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
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


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "ernie45.generation.config" in graph["ernie45.generation.generate"]  # module level
    assert "ernie45.checkpoint" in graph["ernie45"]  # inside `ernie45.load`
    assert find_cycles({"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    graph = import_graph()
    cycles = find_cycles(graph)
    report = []
    for c in cycles:
        report.append("cycle: " + ", ".join(c))
        report += [f"  {a} -> {b} (line {graph[a][b]})" for a in c for b in sorted(graph[a]) if b in c]
    assert not cycles, "import cycles, with every edge inside each:\n" + "\n".join(report)
