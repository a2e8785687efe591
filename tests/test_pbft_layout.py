"""The PBFT phases work against the replica's state and outbox, not the replica: no phase
module imports ``consensus.pbft.replica``, none imports inside a function (the old way
around an import circle), and the phases import each other without a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import consensus.pbft

PACKAGE = Path(consensus.pbft.__file__).parent
PHASES = ("agreement", "checkpoint", "execution", "ordering", "recovery", "status",
          "transfer", "viewchange")


def _imports(module: str) -> tuple[set[str], list[int]]:
    """(project modules imported at the top level, lines of imports inside functions)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    top: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module:
            top.add(node.module)
            top.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            top.update(a.name for a in node.names)
    nested = [n.lineno for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
              and n not in tree.body]
    return top, nested


def test_no_phase_imports_the_replica_or_imports_inside_a_function() -> None:
    for module in PHASES:
        top, nested = _imports(module)
        assert "consensus.pbft.replica" not in top, f"{module} imports the replica"
        assert not nested, f"{module}: imports inside functions at lines {nested}"


def find_circle(graph: dict[str, set[str]]) -> str | None:
    """An import circle in ``graph`` (module -> modules it imports), as "a -> b -> a"."""
    done: set[str] = set()

    def visit(m: str, path: tuple[str, ...]) -> str | None:
        if m in path:
            return " -> ".join((*path, m))
        if m in done:
            return None
        for dep in sorted(graph[m]):
            circle = visit(dep, (*path, m))
            if circle:
                return circle
        done.add(m)
        return None

    for m in sorted(graph):
        circle = visit(m, ())
        if circle:
            return circle
    return None


def test_the_phases_import_each_other_without_a_circle() -> None:
    graph = {m: {p for p in PHASES if f"consensus.pbft.{p}" in _imports(m)[0]} for m in PHASES}
    assert graph["viewchange"] >= {"agreement", "ordering"}  # the graph is really read
    assert find_circle(graph) is None


def test_a_circle_is_found() -> None:
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == "a -> b -> c -> a"
    assert find_circle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
