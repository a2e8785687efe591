"""The import rules of docs/architecture.md, as a test over the source tree.

The rules are a function of a root directory (``breaches(read_tree(root))``): the
repository must keep them, and a deliberately bad tree in a temp directory shows each
rule catching its breach. Imports are read with ``ast`` (tests/harness/imports.py),
function-local and ``TYPE_CHECKING`` imports included.

The tree keeps every rule (the last tolerated breaches, three sub-package circles, went
with issue 13). A breach a branch is removing can be tolerated by passing its key to
:func:`breaches` as ``known``, with a check that it is still there
(:func:`still_breached`); the test of that mechanism below shows how.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.imports import ImportGraph, circles, within

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("mesh", "consensus", "federation", "sim")
TREES = (*PRODUCT, "tests")
#: The only product packages that may import trio: the drivers of the sans-I/O cores.
DRIVERS = ("mesh.runtime", "federation.node", "federation.dataplane", "federation.api",
           "federation.cli", "federation.demo")
TRIO = ("trio", "trio_websocket")


@dataclass(frozen=True, order=True)
class Breach:
    """``importer`` imports ``imported`` against ``rule`` (for a circle: one import of it,
    between units; ``detail`` walks the circle)."""

    rule: str
    importer: str
    imported: str
    detail: str

    @property
    def key(self) -> tuple[str, str, str]:
        return self.rule, self.importer, self.imported

    def __str__(self) -> str:
        return f"{self.rule}: {self.importer} -> {self.imported}: {self.detail}"


Check = Callable[[ImportGraph, frozenset[tuple[str, str]]], list[Breach]]
RULES: dict[str, tuple[str, Check]] = {}


def rule(name: str, statement: str) -> Callable[[Check], Check]:
    def register(check: Check) -> Check:
        RULES[name] = (statement, check)
        return check
    return register


def _forbidden(graph: ImportGraph, name: str, applies: Callable[[str], bool],
               banned: Callable[[str], bool]) -> list[Breach]:
    return [Breach(name, i.importer, i.imported, i.where) for i in graph.imports
            if within(i.importer, *PRODUCT) and applies(i.importer) and banned(i.imported)]


def _through(graph: ImportGraph, name: str, applies: Callable[[str], bool],
             inside: Callable[[str], bool], banned: Callable[[str], bool]) -> list[Breach]:
    """Imports, by a module ``applies`` selects, of a module outside ``inside`` that is
    ``banned`` or imports a ``banned`` one, directly or through others."""
    edges = graph.module_edges()
    found = []
    for imp in graph.imports:
        if not applies(imp.importer) or inside(imp.imported) or imp.imported not in graph.paths:
            continue
        hit = next((m for m in [imp.imported, *graph.reaches(imp.imported, edges)]
                    if banned(m)), None)
        if hit is not None:
            found.append(Breach(name, imp.importer, imp.imported,
                                f"{imp.where}, reaching {hit}"))
    return found


@rule("mesh-cores-sans-io", "mesh's cores (mesh/ outside mesh/runtime/) import no trio, "
      "trio_websocket or socket, and no runtime package")
def _mesh_cores(graph: ImportGraph, _: frozenset[tuple[str, str]]) -> list[Breach]:
    return _forbidden(graph, "mesh-cores-sans-io",
                      lambda m: within(m, "mesh") and not within(m, "mesh.runtime"),
                      lambda m: within(m, *TRIO, "socket") or "runtime" in m.split(".")[1:])


@rule("trio-only-in-drivers", "trio only under mesh/runtime/ and federation/{node,dataplane,"
      "api,cli,demo}: elsewhere the product imports neither trio nor a driver that reaches it")
def _trio(graph: ImportGraph, _: frozenset[tuple[str, str]]) -> list[Breach]:
    trio_users = {i.importer for i in graph.imports if within(i.imported, *TRIO)}
    name = "trio-only-in-drivers"

    def elsewhere(m: str) -> bool:
        return within(m, *PRODUCT) and not within(m, *DRIVERS)

    return (_forbidden(graph, name, elsewhere, lambda m: within(m, *TRIO))
            + _through(graph, name, elsewhere, lambda m: not within(m, *DRIVERS),
                       trio_users.__contains__))


@rule("product-never-imports-bench", "mesh, consensus, federation and sim never import bench")
def _bench(graph: ImportGraph, _: frozenset[tuple[str, str]]) -> list[Breach]:
    return _forbidden(graph, "product-never-imports-bench", lambda m: True,
                      lambda m: within(m, "bench"))


@rule("mesh-imports-no-upper-layer", "mesh imports neither consensus nor federation nor sim")
def _mesh(graph: ImportGraph, _: frozenset[tuple[str, str]]) -> list[Breach]:
    return _forbidden(graph, "mesh-imports-no-upper-layer", lambda m: within(m, "mesh"),
                      lambda m: within(m, "consensus", "federation", "sim"))


@rule("consensus-imports-no-upper-layer", "consensus imports neither federation nor sim")
def _consensus(graph: ImportGraph, _: frozenset[tuple[str, str]]) -> list[Breach]:
    return _forbidden(graph, "consensus-imports-no-upper-layer",
                      lambda m: within(m, "consensus"), lambda m: within(m, "federation", "sim"))


@rule("sim-runs-no-runtime", "sim imports neither mesh.runtime nor federation.node, directly "
      "or through a module of another package")
def _sim(graph: ImportGraph, _: frozenset[tuple[str, str]]) -> list[Breach]:
    name = "sim-runs-no-runtime"

    def runtime(m: str) -> bool:
        return within(m, "mesh.runtime", "federation.node")

    def in_sim(m: str) -> bool:
        return within(m, "sim")

    return (_forbidden(graph, name, in_sim, runtime)
            + _through(graph, name, in_sim, lambda m: in_sim(m) or runtime(m), runtime))


@rule("demo-is-a-leaf", "only federation/demo/ imports federation.demo (the demo drives the "
      "product; the product never needs the demo)")
def _demo(graph: ImportGraph, _: frozenset[tuple[str, str]]) -> list[Breach]:
    return _forbidden(graph, "demo-is-a-leaf", lambda m: not within(m, "federation.demo"),
                      lambda m: within(m, "federation.demo"))


def _top(module: str) -> str | None:
    top = module.split(".")[0]
    return top if top in PRODUCT else None


def unit_of(graph: ImportGraph, module: str) -> str | None:
    """A module's unit for the circle rule: its sub-package (``mesh.gossip``,
    ``sim.hosts``), or the module itself when it sits loose in a top-level package
    (``sim.world``, ``federation.config``: the layout puts modules of different layers
    there, so each is a unit of its own; docs/architecture.md)."""
    if _top(module) is None:
        return None
    package = graph.package_of(module)
    return module if "." not in package else package


def _circles(graph: ImportGraph, name: str, unit: Callable[[str], str | None],
             tolerated: frozenset[tuple[str, str]]) -> list[Breach]:
    edges = graph.unit_edges(unit)
    kept = [pair for pair in edges if pair not in tolerated]
    found = []
    for walk in circles(kept):
        steps = [f"{a} -> {b} ({edges[a, b].where})" for a, b in zip(walk, walk[1:], strict=False)]
        found.append(Breach(name, walk[0], walk[1], "; ".join(steps)))
    return found


@rule("no-package-circles", "no import circle between mesh, consensus, federation and sim")
def _package_circles(graph: ImportGraph, tolerated: frozenset[tuple[str, str]]) -> list[Breach]:
    return _circles(graph, "no-package-circles", _top, tolerated)


@rule("no-sub-package-circles", "no import circle between sub-packages (and the loose "
      "modules of a top-level package)")
def _unit_circles(graph: ImportGraph, tolerated: frozenset[tuple[str, str]]) -> list[Breach]:
    return _circles(graph, "no-sub-package-circles", lambda m: unit_of(graph, m), tolerated)


@rule("one-module-per-name", "no two modules with the same name in one package tree")
def _names(graph: ImportGraph, _: frozenset[tuple[str, str]]) -> list[Breach]:
    seen: dict[tuple[str, str], str] = {}
    found = []
    for module in sorted(graph.paths):
        if _top(module) is None or module in graph.packages or module.endswith("__main__"):
            continue
        key = (module.split(".")[0], module.rpartition(".")[2])
        if key in seen:
            found.append(Breach("one-module-per-name", seen[key], module, f"both {key[1]}.py"))
        else:
            seen[key] = module
    return found


@rule("tests-share-through-harness", "no test module imports another test module: shared "
      "helpers live in tests/harness/")
def _tests(graph: ImportGraph, _: frozenset[tuple[str, str]]) -> list[Breach]:
    return [Breach("tests-share-through-harness", i.importer, i.imported, i.where)
            for i in graph.imports if within(i.importer, "tests")
            and i.imported.startswith("tests.test_")]


CIRCLE_RULES = ("no-package-circles", "no-sub-package-circles")


def read_tree(root: Path) -> ImportGraph:
    """The import graph of the product packages and the tests under ``root``."""
    return ImportGraph(root, [t for t in TREES if (root / t).is_dir()])


def breaches(graph: ImportGraph, tolerate: frozenset[tuple[str, str, str]] = frozenset(),
             ) -> list[Breach]:
    """Every breach of every rule in ``graph``, but those in ``tolerate`` (rule, importer,
    imported); for a circle rule these are imports between units, left out before the
    circles are looked for."""
    found: list[Breach] = []
    for name, (_, check) in RULES.items():
        allowed = frozenset((a, b) for r, a, b in tolerate if r == name)
        found += [b for b in check(graph, allowed)
                  if name in CIRCLE_RULES or b.key not in tolerate]
    return sorted(found)


def still_breached(graph: ImportGraph, key: tuple[str, str, str]) -> bool:
    """Whether the known breach ``key`` is still there: the import, or for a circle
    rule the import between units, still on a circle."""
    name, a, b = key
    if name not in CIRCLE_RULES:
        return key in {br.key for br in RULES[name][1](graph, frozenset())}
    unit = _top if name == "no-package-circles" else (lambda m: unit_of(graph, m))
    edges = graph.unit_edges(unit)
    return (a, b) in edges and any(a in walk and b in walk for walk in circles(edges))


# --------------------------------------------------------------------------- this tree

@pytest.fixture(scope="module")
def tree() -> ImportGraph:
    return read_tree(ROOT)


@pytest.fixture(scope="module")
def tree_breaches(tree: ImportGraph) -> list[Breach]:
    return breaches(tree, frozenset())


@pytest.mark.parametrize("name", list(RULES))
def test_the_tree_keeps_the_rule(name: str, tree_breaches: list[Breach]) -> None:
    found = [str(b) for b in tree_breaches if b.rule == name]
    assert not found, f"{RULES[name][0]}; broken by:\n" + "\n".join(found)


# --------------------------------------------------------------------------- a bad tree

#: A small tree that keeps every rule: cores, drivers with trio, sim over the cores.
CLEAN = {
    "mesh/__init__.py": "",
    "mesh/core.py": "import random\n",
    "mesh/gossip/__init__.py": "",
    "mesh/gossip/membership.py": "from mesh import core\n",
    "mesh/links/__init__.py": "",
    "mesh/links/routes.py": "from ..gossip.membership import State\n",
    "mesh/runtime/__init__.py": "",
    "mesh/runtime/node_runtime.py": "import socket\nimport trio\n\nfrom mesh.links import routes\n",
    "consensus/__init__.py": "",
    "consensus/ledger.py": "from mesh.core import Action\n",
    "federation/__init__.py": "",
    "federation/config.py": "import tomllib\n",
    "federation/migration/__init__.py": "",
    "federation/migration/session.py": "from consensus import ledger\nfrom .. import config\n",
    "federation/node/__init__.py": "",
    "federation/node/assembly.py": ("import trio\n\nfrom federation.migration import session\n"
                                    "from mesh.runtime.node_runtime import Runtime\n"),
    "federation/demo/__init__.py": "",
    "federation/demo/writer.py": "import trio\n\nfrom federation.node.assembly import Node\n",
    "sim/__init__.py": "",
    "sim/world.py": "from federation.migration.session import Session\n",
    "sim/hosts/__init__.py": "",
    "sim/hosts/dc.py": "from sim import world\n",
    "tests/__init__.py": "",
    "tests/harness/__init__.py": "",
    "tests/harness/node.py": "from federation.node import assembly\n",
    "tests/test_node.py": "import bench.consensus\nfrom tests.harness.node import assembly\n",
}
LOCAL = "def later() -> None:\n    {}\n"
#: (rule, files added to CLEAN, the breach's importer and imported)
BAD = [
    ("mesh-cores-sans-io", {"mesh/links/probe.py": "import socket\n"},
     "mesh.links.probe", "socket"),
    ("mesh-cores-sans-io", {"mesh/gossip/timers.py": LOCAL.format("from ..runtime import x")},
     "mesh.gossip.timers", "mesh.runtime"),
    ("trio-only-in-drivers", {"federation/migration/rounds.py": LOCAL.format("import trio")},
     "federation.migration.rounds", "trio"),
    ("trio-only-in-drivers", {"federation/vms/backend.py": "from federation.demo import writer"},
     "federation.vms.backend", "federation.demo.writer"),
    ("product-never-imports-bench", {"federation/demo/data.py": "from bench.corpus import x\n"},
     "federation.demo.data", "bench.corpus"),
    ("mesh-imports-no-upper-layer", {"mesh/links/modes.py": "from consensus.ledger import L\n"},
     "mesh.links.modes", "consensus.ledger"),
    ("consensus-imports-no-upper-layer",
     {"consensus/evidence.py": "if TYPE_CHECKING:\n    from federation import config\n"},
     "consensus.evidence", "federation.config"),
    ("sim-runs-no-runtime", {"sim/hosts/rt.py": "from mesh.runtime import node_runtime\n"},
     "sim.hosts.rt", "mesh.runtime.node_runtime"),
    ("sim-runs-no-runtime", {"sim/hosts/demo.py": "from federation.demo.writer import W\n"},
     "sim.hosts.demo", "federation.demo.writer"),
    ("demo-is-a-leaf", {"federation/vms/image.py": "from federation.demo import writer\n"},
     "federation.vms.image", "federation.demo.writer"),
    ("no-package-circles", {"federation/cli.py": "from sim import world\n",
                            "sim/cli.py": "from federation import cli\n"},
     "federation", "sim"),
    ("no-sub-package-circles", {"mesh/gossip/messages.py": "from mesh.links import routes\n"},
     "mesh.gossip", "mesh.links"),
    ("one-module-per-name", {"federation/node/session.py": ""},
     "federation.migration.session", "federation.node.session"),
    ("tests-share-through-harness", {"tests/test_other.py": "from tests import test_node\n"},
     "tests.test_other", "tests.test_node"),
]


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_a_tree_that_keeps_the_rules_has_no_breach(tmp_path: Path) -> None:
    assert breaches(read_tree(_tree(tmp_path, CLEAN))) == []


def test_every_rule_is_shown_failing_on_a_bad_tree() -> None:
    assert {case[0] for case in BAD} == set(RULES)


@pytest.mark.parametrize("name, files, importer, imported", BAD,
                         ids=[f"{case[0]}-{i}" for i, case in enumerate(BAD)])
def test_the_rule_fails_on_a_bad_tree(tmp_path: Path, name: str, files: dict[str, str],
                                      importer: str, imported: str) -> None:
    found = breaches(read_tree(_tree(tmp_path, CLEAN | files)))
    assert (name, importer, imported) in {b.key for b in found}, "\n".join(map(str, found))


def test_a_tolerated_circle_is_known_until_it_is_gone(tmp_path: Path) -> None:
    bad = "mesh/gossip/messages.py"
    _tree(tmp_path, CLEAN | {bad: "from mesh.links import routes\n"})
    key = ("no-sub-package-circles", "mesh.gossip", "mesh.links")
    graph = read_tree(tmp_path)
    assert breaches(graph, frozenset({key})) == [] and still_breached(graph, key)
    (tmp_path / bad).unlink()
    assert not still_breached(read_tree(tmp_path), key)
