"""The ``dwcp`` command line.

Commands are plugged in through the ``dwcp.commands`` entry-point group
(``pyproject.toml``): each entry names a ``register(subparsers)`` function that
adds one sub-command and sets ``func`` on it. That keeps each package's
commands next to its code (``dwcp sim`` lives in ``sim/``) without this
module importing every package. A command's ``func(args)`` returns the exit
status.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, entry_points, version

__all__ = ["main", "build_parser", "CommandError", "dwcp_version"]


class CommandError(Exception):
    """An error to print as one line and exit 2 (bad input, not a bug)."""


def dwcp_version() -> str:
    """The installed distribution's version (pyproject.toml's ``version``)."""
    try:
        return version("dwcp")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed: pip install -e .)"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command`` only that command's module is imported, so a node
    does not pay for (or depend on) every other command's imports at start-up."""
    parser = argparse.ArgumentParser(
        prog="dwcp", description="DWCP: move running VMs between datacenters."
    )
    parser.add_argument("--version", action="version", version=f"dwcp {dwcp_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    eps = sorted(entry_points(group="dwcp.commands"), key=lambda e: e.name)
    chosen = [ep for ep in eps if ep.name == command]
    for ep in chosen or eps:
        ep.load()(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(first)
    args = parser.parse_args(argv)
    try:
        status = args.func(args)
    except CommandError as exc:
        print(f"dwcp {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(status or 0)
