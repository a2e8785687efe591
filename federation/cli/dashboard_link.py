"""``dwcp dashboard``: print a link that opens a node's dashboard in a browser.

::

    dwcp dashboard --config FILE --name DC [--key FILE]

The link carries a signed request of the operator (federation.api.sessions): it works
once, within two minutes, and the node answers it with a read-only session cookie.
"""

from __future__ import annotations

import argparse

from federation.api.client import dashboard_url
from federation.api.sessions import LINK_TTL
from federation.cli.ops import add_node_options, node_api

__all__ = ["register_dashboard"]


def register_dashboard(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("dashboard", help="print a one-time link to a node's dashboard")
    add_node_options(p)
    p.set_defaults(func=run_dashboard)


def run_dashboard(args: argparse.Namespace) -> int:
    api = node_api(args)
    assert api.signer is not None
    print(dashboard_url(api.url, api.signer))
    print(f"(open it within {LINK_TTL:.0f} s; it works once and gives this browser a "
          "read-only session)")
    return 0
