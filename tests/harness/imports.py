"""The import graph of a source tree, read with ``ast`` (nothing is imported or run).

Every ``import``/``from ... import`` counts wherever it stands: at the top, inside a
function (an import put there to dodge a circle is still an import), under
``if TYPE_CHECKING:`` (a type names a dependency all the same). ``from a import b``
names the module ``a.b`` when the tree has one, else the module ``a``; relative
imports resolve against the importing module's package. tests/test_layers.py states
the rules over this graph.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, order=True)
class Import:
    """``importer`` (a module of the tree) imports ``imported`` at ``path:line``."""

    importer: str
    imported: str
    path: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def within(module: str, *prefixes: str) -> bool:
    """``module`` is one of ``prefixes`` or inside one of them (dotted names)."""
    return any(module == p or module.startswith(p + ".") for p in prefixes)


class ImportGraph:
    """Every module under ``root/<top>`` for each top-level package in ``tops``, and
    every import they make (of anything: the standard library and third parties too)."""

    def __init__(self, root: Path, tops: Iterable[str]) -> None:
        self.root = root
        self.paths: dict[str, Path] = {}
        self.packages: set[str] = set()
        for top in tops:
            for path in sorted((root / top).rglob("*.py")):
                parts = list(path.relative_to(root).with_suffix("").parts)
                if parts[-1] == "__init__":
                    parts.pop()
                    self.packages.add(".".join(parts))
                self.paths[".".join(parts)] = path
        self.imports: list[Import] = sorted(
            {imp for name in sorted(self.paths) for imp in self._read(name)})

    def _read(self, name: str) -> Iterator[Import]:
        path = self.paths[name]
        tree = ast.parse(path.read_bytes(), filename=str(path))
        rel = path.relative_to(self.root).as_posix()
        package = name if name in self.packages else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield Import(name, alias.name, rel, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node, package, f"{rel}:{node.lineno}")
                for alias in node.names:
                    sub = f"{base}.{alias.name}" if base else alias.name
                    yield Import(name, sub if sub in self.paths else base, rel, node.lineno)

    def package_of(self, module: str) -> str:
        """The package a module belongs to: itself for a package's ``__init__``."""
        return module if module in self.packages else module.rpartition(".")[0]

    def module_edges(self) -> dict[str, list[Import]]:
        """Imports between modules of the tree. Importing ``a.b.c`` also runs the
        ``__init__`` of ``a`` and ``a.b``, so those count as imported too."""
        edges: dict[str, list[Import]] = {}
        for imp in self.imports:
            parts = imp.imported.split(".")
            for i in range(len(parts), 0, -1):
                target = ".".join(parts[:i])
                if target in self.paths and target != imp.importer:
                    edges.setdefault(imp.importer, []).append(
                        Import(imp.importer, target, imp.path, imp.line))
        return edges

    def reaches(self, start: str, edges: dict[str, list[Import]] | None = None,
                ) -> dict[str, Import]:
        """Every module of the tree that importing ``start`` imports, directly or through
        others, each with the import that first leads to it (breadth first)."""
        edges = self.module_edges() if edges is None else edges
        seen: dict[str, Import] = {}
        frontier = [start]
        while frontier:
            following: list[str] = []
            for module in frontier:
                for imp in edges.get(module, []):
                    if imp.imported != start and imp.imported not in seen:
                        seen[imp.imported] = imp
                        following.append(imp.imported)
            frontier = following
        return seen

    def unit_edges(self, unit: Callable[[str], str | None]) -> dict[tuple[str, str], Import]:
        """Imports between units (``unit`` maps a module to its unit, or None to leave it
        out), each pair with its first import; an import of a module counts for that
        module's unit only (not for the packages above it)."""
        edges: dict[tuple[str, str], Import] = {}
        for imp in self.imports:
            if imp.imported not in self.paths:
                continue
            a, b = unit(imp.importer), unit(imp.imported)
            if a is not None and b is not None and a != b:
                edges.setdefault((a, b), imp)
        return edges


def _absolute(node: ast.ImportFrom, package: str, where: str) -> str:
    if node.level == 0:
        return node.module or ""
    parts = package.split(".") if package else []
    if node.level - 1 > len(parts):
        raise ValueError(f"{where}: relative import beyond the top-level package")
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def circles(pairs: Iterable[tuple[str, str]]) -> list[list[str]]:
    """Every import circle among the nodes of the directed graph ``pairs``: each strongly
    connected component of more than one node (Tarjan), as one circle through all of
    them in import order, starting at its smallest name; in name order."""
    succ: dict[str, list[str]] = {}
    for a, b in sorted(set(pairs)):
        succ.setdefault(a, []).append(b)
        succ.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[set[str]] = []

    def visit(v: str) -> None:  # depth: the number of units, a few dozen at most
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(succ):
        if v not in index:
            visit(v)
    return sorted(_walk(succ, component) for component in components)


def _walk(succ: dict[str, list[str]], component: set[str]) -> list[str]:
    """A closed walk from the smallest node of ``component`` through all its nodes
    (shortest hops, in name order), ending back at the start."""
    start = min(component)
    walk = [start]
    for goal in sorted(component - {start}) + [start]:
        if goal != start and goal in walk:
            continue
        walk += _path(succ, component, walk[-1], goal)[1:]
    return walk


def _path(succ: dict[str, list[str]], component: set[str], a: str, b: str) -> list[str]:
    """A shortest path from ``a`` to ``b`` inside ``component`` (a circle when a is b)."""
    before: dict[str, str] = {}
    frontier = [a]
    while frontier and b not in before:
        following = []
        for v in frontier:
            for w in succ[v]:
                if w in component and w not in before:
                    before[w] = v
                    following.append(w)
        frontier = following
    path = [b, before[b]]
    while path[-1] != a:
        path.append(before[path[-1]])
    return path[::-1]
