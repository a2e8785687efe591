"""The README's examples run as written, and the docs name only commands that exist.

- Every command line of README.md's "Running a federation" block that needs no running
  node (``dwcp keygen``, ``dwcp federation``, ``dwcp sim``) is run here, in a temporary
  directory standing in for ``D``, ``/etc/dwcp`` and ``~``, and its output is checked.
  The lines that talk to a node (``dwcp node``, ``vm``, ``migrate``, ``status``, ...) are
  walked with four real nodes elsewhere (the README walk-through test); this test only
  checks that each of them names a command that exists, and fails on a line it cannot
  classify, so a new README example is either run or consciously left to that test.
- Every ``dwcp A B`` that README.md or docs/*.md show (in code spans and blocks) names a
  command of the real parser: a renamed or removed command cannot linger in the docs.
- ``dwcp --version`` prints the installed distribution's version.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: The README commands run here (no node needed) and the ones that need a running node.
OFFLINE = {"keygen", "federation", "sim"}
ONLINE = {"node", "vm", "vms", "migrate", "status", "cancel", "policy", "dashboard", "requests"}


def _readme_block(title: str) -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(rf"^## {re.escape(title)}\n.*?```\n(.*?)```", text, re.MULTILINE | re.DOTALL)
    assert m, f"README.md has no code block under '## {title}'"
    return [line for line in m.group(1).splitlines() if line.strip()]


def _argv(line: str) -> list[str]:
    return shlex.split(line, comments=True)


def _dwcp(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "federation", *argv], capture_output=True,
                          text=True, env=env, timeout=120, cwd=env["HOME"])


def _localise(argv: list[str], tmp: Path) -> list[str]:
    """The README's places (``D``, ``/etc/dwcp``, ``~``, ``/var/lib/dwcp``) under ``tmp``."""
    out = []
    for arg in argv:
        if arg == "D" or arg.startswith("D/"):
            arg = str(tmp / "D") + arg[1:]
        for place in ("/etc/dwcp", "/var/lib/dwcp"):
            if arg.startswith(place):
                arg = str(tmp) + arg
        out.append(arg)
    return out


def _check_output(argv: list[str], done: subprocess.CompletedProcess[str], tmp: Path) -> None:
    said = f"`dwcp {shlex.join(argv)}` printed:\n{done.stdout}{done.stderr}"
    assert done.returncode == 0, said
    command, rest = argv[0], argv[1:]
    if command == "keygen":
        assert re.fullmatch(r"ed25519:[A-Za-z0-9+/]{43}=\n", done.stdout), said
        key = Path(rest[rest.index("--out") + 1])
        assert key.is_file() and key.stat().st_mode & 0o777 == 0o600, said
        prefix = "dwcp-operator-ed25519-secret:" if "--operator" in rest else ""
        assert key.read_text().startswith(prefix), said
    elif command == "federation" and rest[0] == "init":
        where = Path(rest[rest.index("--dir") + 1])
        assert done.stdout.strip() == str(where / "federation.toml"), said
        dcs = int(rest[rest.index("--dcs") + 1]) if "--dcs" in rest else 4
        assert sorted(p.name for p in (where / "keys").iterdir()) == sorted(
            [f"dc{i}.key" for i in range(1, dcs + 1)] + ["admin.key"]), said
    elif command == "federation" and rest[0] == "check":
        summary = rf"{re.escape(rest[1])}: federation '\w+', \d+ DCs: dc1, "
        assert re.match(summary, done.stdout), said
    elif command == "sim" and rest[0] == "run":
        assert "--json" in rest, f"the README's sim run example should print its JSON: {said}"
        result = json.loads(done.stdout)
        assert result["ok"] is True and result["violations"] == [], said
    elif command == "sim" and rest[0] == "sweep":
        assert re.search(r": (\d+) runs, 0 failed", done.stdout), said
    else:
        raise AssertionError(f"no check for the README example `dwcp {shlex.join(argv)}`")


@pytest.mark.processes
def test_readme_offline_examples_run(tmp_path: Path) -> None:
    lines = _readme_block("Running a federation")
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    for var in ("DWCP_CONFIG", "DWCP_OPERATOR_KEY"):
        env.pop(var, None)
    ran = []
    for line in lines:
        argv = _argv(line)
        if argv and argv[0] == "export":
            continue  # the node commands' environment; the node walk-through sets it
        assert argv and argv[0] == "dwcp", f"README example is not a dwcp command: {line!r}"
        command = argv[1]
        if command in ONLINE:
            continue
        assert command in OFFLINE, (f"README example `{line}`: classify `dwcp {command}` "
                                    "in this test (run it here, or leave it to the node walk)")
        argv = _localise([str(tmp_path) + a[1:] if a.startswith("~/") else a
                          for a in argv[1:]], tmp_path)
        outside = [a for a in argv if a.startswith("/") and not a.startswith(str(tmp_path))]
        assert not outside, f"README example `{line}` writes outside the test's directory"
        (tmp_path / "etc" / "dwcp").mkdir(parents=True, exist_ok=True)
        _check_output(argv, _dwcp(argv, env), tmp_path)
        ran.append(command)
    assert set(ran) == OFFLINE, f"the README shows no example of {OFFLINE - set(ran)}"


# --------------------------------------------------------------------------- docs vs parser

#: ``dwcp A B`` in a code span, after a shell prompt, or at the start of a code block's line.
_SHOWN = re.compile(r"(?:^\$ |^|`)dwcp ((?:[a-z][a-z0-9-]*)(?: [a-z][a-z0-9-]*)?)",
                    re.MULTILINE)
#: Commands the docs name that another branch adds, each with the work that adds it; the
#: test fails once one exists, so the entry is removed when that work is merged.
COMING: dict[str, str] = {}  # ("dwcp federation rotate-key" arrived with the operator branch)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_docs_name_only_commands_that_exist() -> None:
    from federation.cli.main import build_parser

    top = _subcommands(build_parser())
    wrong = []
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for doc in docs:
        for m in _SHOWN.finditer(doc.read_text(encoding="utf-8")):
            words = m.group(1).split()
            sub = top.get(words[0])
            if sub is None:
                wrong.append(f"{doc.relative_to(ROOT)}: dwcp {words[0]}")
                continue
            below = _subcommands(sub)
            if below and len(words) > 1 and words[1] not in below:
                if f"dwcp {' '.join(words)}" not in COMING:
                    wrong.append(f"{doc.relative_to(ROOT)}: dwcp {' '.join(words)}")
    assert not wrong, "the docs show commands that do not exist: " + "; ".join(sorted(set(wrong)))
    arrived = [c for c in COMING if c.split()[2] in _subcommands(top[c.split()[1]])]
    assert not arrived, f"{arrived} exist now: remove them from COMING"


def test_version_prints_the_installed_version() -> None:
    done = subprocess.run([sys.executable, "-m", "federation", "--version"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"dwcp {version('dwcp')}\n"


def test_the_license_metadata_is_pep_639() -> None:
    """An SPDX expression and the file that carries the text (no deprecated table, so the
    install prints no warning of ours)."""
    from importlib.metadata import metadata

    meta = metadata("dwcp")
    assert meta.get("License-Expression") == "Apache-2.0"
    assert meta.get_all("License-File") == ["docs/LICENSE"]
    assert (ROOT / "docs" / "LICENSE").read_text().lstrip().startswith("Apache License")
