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
from importlib.metadata import entry_points

__all__ = ["main", "build_parser", "CommandError"]


class CommandError(Exception):
    """An error to print as one line and exit 2 (bad input, not a bug)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dwcp", description="DWCP: move running VMs between datacenters."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for ep in sorted(entry_points(group="dwcp.commands"), key=lambda e: e.name):
        ep.load()(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.func(args)
    except CommandError as exc:
        print(f"dwcp {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
