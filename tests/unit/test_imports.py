"""flows/ orchestrates, tasks/ computes: no upward import, no import cycle (read with ``ast``)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("flows", "tasks")

#: Known exceptions, each with the reason it is left; the test fails when one is fixed, so the
#: list only shrinks.
KNOWN_CYCLES: dict[frozenset[str], str] = {}
KNOWN_UPWARD: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> project modules it imports (at any depth of the file, lazy imports included)."""
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _is_package_parent(a: str, b: str) -> bool:
    """A package's ``__init__`` importing its own submodules (or the reverse) is no cycle."""
    return b.startswith(a + ".") or a.startswith(b + ".")


def test_tasks_never_import_flows() -> None:
    upward = {
        (name, target)
        for name, targets in import_graph().items()
        if name.startswith("tasks")
        for target in targets
        if target.split(".")[0] == "flows"
    }
    assert upward == set(KNOWN_UPWARD), "tasks/ must not import flows/"


def test_no_import_cycles() -> None:
    graph = import_graph()
    for name, targets in graph.items():
        graph[name] = {t for t in targets if not _is_package_parent(name, t)}
    assert set(cycles(graph)) == set(KNOWN_CYCLES)


def test_the_checks_see_a_cycle_and_an_upward_import() -> None:
    graph = {"tasks.a": {"tasks.b"}, "tasks.b": {"tasks.a", "flows.x"}, "flows.x": set()}
    assert cycles(graph) == [frozenset({"tasks.a", "tasks.b"})]
