"""``dwcp bench NAME [--json]``: every benchmark is a ``dwcp.benches`` entry point
naming a ``register(subparsers)`` function that adds ``NAME`` with its own options.
A benchmark prints one JSON object of figures it measured on real work."""

from __future__ import annotations

import argparse
from importlib.metadata import entry_points


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("bench", help="run a benchmark and print its figures as JSON")
    bsub = p.add_subparsers(dest="bench", required=True, metavar="NAME")
    for ep in sorted(entry_points(group="dwcp.benches"), key=lambda e: e.name):
        ep.load()(bsub)
