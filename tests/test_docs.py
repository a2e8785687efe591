"""The operator docs cannot silently fall behind the code.

- every ``dwcp`` sub-command registered in pyproject.toml (``dwcp.commands``) and every
  benchmark (``dwcp.benches``) is named in docs/cli.md;
- every sub-command and option that argparse knows (walked from the real parser) is named
  in docs/cli.md;
- every option of the federation file (``federation.config``: the [federation] keys, every
  ModeThresholds field, every [[dc]] key) is named in docs/federation.md;
- every scenario of ``dwcp sim list`` is named in docs/simulator.md;
- every metric family /metrics serves, and every log event, is named in docs/operations.md;
- every relative link in README.md and docs/*.md points at a file that exists, and every
  repository path they name in a code span (``mesh/runtime/``, ``federation/api/http.py``,
  globs too) exists, but the homes of features not built yet ("Where the next features
  go" in docs/architecture.md).

Reads files and builds parsers; no process, no network (well under a second).
"""

from __future__ import annotations

import argparse
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from federation import config

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _doc(name: str) -> str:
    path = DOCS / name
    assert path.is_file(), f"docs/{name} is missing"
    return path.read_text(encoding="utf-8")


def _entry_points(group: str) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return sorted(project["project"]["entry-points"][group])


def _mentions(text: str, word: str) -> bool:
    """``word`` appears as a code span or a whole word (not inside a longer name)."""
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def test_every_registered_command_is_in_cli_md() -> None:
    text = _doc("cli.md")
    commands = _entry_points("dwcp.commands")
    assert commands, "pyproject.toml registers no dwcp.commands"
    missing = [c for c in commands if f"dwcp {c}" not in text]
    assert not missing, f"docs/cli.md does not document: {', '.join('dwcp ' + c for c in missing)}"


def test_every_registered_benchmark_is_in_cli_md() -> None:
    text = _doc("cli.md")
    benches = _entry_points("dwcp.benches")
    missing = [b for b in benches if f"dwcp bench {b}" not in text]
    named = ", ".join("dwcp bench " + b for b in missing)
    assert not missing, f"docs/cli.md does not document: {named}"


def _walk(
    parser: argparse.ArgumentParser, path: tuple[str, ...]
) -> Iterator[tuple[tuple[str, ...], list[str]]]:
    """(command path, option strings) for every parser below ``parser``."""
    options = [s for a in parser._actions for s in a.option_strings if s not in ("-h", "--help")]
    yield path, options
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in sorted(action.choices.items()):
                yield from _walk(sub, (*path, name))


def test_every_subcommand_and_option_is_in_cli_md() -> None:
    from federation.cli.main import build_parser

    text = _doc("cli.md")
    missing: list[str] = []
    for path, options in _walk(build_parser(), ()):
        if not path:
            continue
        if path[0] == "bench":
            # benchmark options are shown in their --help blocks; the names are checked above
            continue
        command = "dwcp " + " ".join(path)
        if command not in text:
            missing.append(command)
        missing += [f"{command} {o}" for o in options if not _mentions(text, o)]
    assert not missing, "docs/cli.md does not document: " + "; ".join(missing)


def test_every_federation_option_is_in_federation_md() -> None:
    text = _doc("federation.md")
    tables = {"[federation]", "[modes]", "[[dc]]", "[[operators]]"}
    keys = set(config._FED_KEYS) | set(config._DC_KEYS) | set(config._OPERATOR_KEYS)
    keys |= {a.name for a in attrs.fields(config.ModeThresholds)}
    keys |= {f"{r.label}" for r in config.Role}
    assert set(config._TOP_KEYS) == {"federation", "modes", "dc", "operators"}, (
        "federation.config grew a top-level table; document it and update this test")
    missing = sorted(t for t in tables if t not in text)
    missing += sorted(k for k in keys if f"`{k}`" not in text)
    assert not missing, f"docs/federation.md does not document: {', '.join(missing)}"


def test_federation_md_states_the_defaults_the_code_has() -> None:
    text = _doc("federation.md")
    for a in attrs.fields(config.ModeThresholds):
        section = text.split(f"### `{a.name}`", 1)
        assert len(section) == 2, f"docs/federation.md has no section for modes.{a.name}"
        body = section[1].split("\n### ", 1)[0]
        assert f"default `{a.default!r}`" in body, (
            f"docs/federation.md: modes.{a.name} default is {a.default!r} in the code")
    versions = list(attrs.fields(config.Federation).versions.default)
    assert f"`{versions}`" in text, f"docs/federation.md: versions default is {versions}"


def test_every_scenario_is_in_simulator_md() -> None:
    pytest.importorskip("sim.scenarios")
    from sim.scenarios import registry

    text = _doc("simulator.md")
    missing = sorted(n for n in registry if n not in text)
    assert not missing, f"docs/simulator.md does not list: {', '.join(missing)}"


def test_every_metric_family_is_in_operations_md() -> None:
    source = "\n".join(p.read_text(encoding="utf-8")
                        for p in sorted((ROOT / "federation" / "node").glob("*.py")))
    families = re.findall(r'(Counter|Gauge)MetricFamily\(\s*"(dwcp_[a-z0-9_]+)"', source)
    assert families, "found no metric families in federation/node/"
    text = _doc("operations.md")
    # prometheus_client exposes a counter family NAME as NAME_total
    exposed = [f"{name}_total" if kind == "Counter" else name for kind, name in families]
    missing = sorted(m for m in exposed if not _mentions(text, m))
    assert not missing, f"docs/operations.md does not name the metrics: {', '.join(missing)}"


def test_every_log_event_is_in_operations_md() -> None:
    sources = sorted((ROOT / "mesh").rglob("*.py")) + sorted((ROOT / "federation").rglob("*.py"))
    text = "\n".join(p.read_text(encoding="utf-8") for p in sources)
    events = sorted(set(re.findall(r'\.log\.event\(\s*"([a-z_]+)"', text)))
    assert events, "found no log events in mesh/ and federation/"
    doc = _doc("operations.md")
    missing = [e for e in events if f"`{e}`" not in doc]
    assert not missing, f"docs/operations.md does not describe the log events: {missing}"


def _markdown() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


#: ``[text](target)`` and ``[label]: target`` (a reference definition).
_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|^\s*\[[^\]]+\]:\s*(\S+)",
                   re.MULTILINE)


def _inside(doc: Path, target: str) -> Path | None:
    """``target`` (relative to ``doc``) as a path in the repository, None if it leaves it."""
    path = (doc.parent / target).resolve()
    return path if path.is_relative_to(ROOT) else None


def test_every_relative_link_points_at_a_file() -> None:
    broken = []
    for doc in _markdown():
        for m in _LINK.finditer(doc.read_text(encoding="utf-8")):
            target = (m.group(1) or m.group(2)).split("#", 1)[0]
            if not target or re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # an anchor in the page, or a URL (http:, mailto:)
            path = _inside(doc, target)
            if path is None or not path.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not broken, "links to nothing in the repository: " + "; ".join(broken)


_TOPS = ("mesh", "consensus", "federation", "sim", "bench", "tests", "docs", "examples")
_CODE_PATH = re.compile(rf"`((?:{'|'.join(_TOPS)})/[^`\s]*|(?:\.\./)+[^`\s]+)`")
_PLANNED = re.compile(r"^### Where the next features go\n.*?(?=^#|\Z)",
                      re.MULTILINE | re.DOTALL)


def _expand(path: str) -> list[str]:
    """``a/{b,c}/d`` as ``a/b/d`` and ``a/c/d`` (one brace group at a time)."""
    m = re.search(r"\{([^{}]*)\}", path)
    if m is None:
        return [path]
    return [e for alt in m.group(1).split(",")
            for e in _expand(path[:m.start()] + alt + path[m.end():])]


def test_every_repository_path_in_the_docs_exists() -> None:
    missing = []
    for doc in _markdown():
        text = _PLANNED.sub("", doc.read_text(encoding="utf-8"))
        for m in _CODE_PATH.finditer(text):
            named = m.group(1).split("::", 1)[0].rstrip(".,:;")
            for path in _expand(named):
                if path.startswith("../"):
                    found = _inside(doc, path)
                    ok = found is not None and found.exists()
                else:
                    ok = any(ROOT.glob(path.rstrip("/")))
                if not ok:
                    missing.append(f"{doc.relative_to(ROOT)}: {path}")
    assert not missing, "the docs name paths that are not in the repository: " + "; ".join(
        missing)
