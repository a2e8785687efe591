"""``dwcp policy show|set``: the rollout policy (v1/v3) in the ledger, through a node's API.

::

    dwcp policy show [--json]
    dwcp policy set [--v3-percent N] [--target-dcs A,B] [--target-regions R,S]
                    [--target-vms X,Y] [--exclude-dcs C,D] [--kill-switch on|off]
                    [--max-abort-percent P] [--min-ended N] [--max-verify-failures N]
                    [--json]

``set`` reads the ledger's policy (``GET /api/policy``), changes the fields given and
records the whole policy (``POST /api/policy``); see :mod:`federation.migration.rollout` for the
rule every DC applies.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from consensus.ledger import SetPolicy
from federation.cli.main import CommandError
from federation.cli.ops import (
    Pending,
    add_node_options,
    add_request_id,
    ledger_call,
    node_api,
    pending_exit,
    table,
)

__all__ = ["register_policy", "render_policy"]


def _percent(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer 0..100, got {text!r}") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"expected an integer 0..100, got {value}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")] if text.strip() else []
    if any(not n for n in names):
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def register_policy(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("policy", help="show or set the rollout policy (v1/v3) in the ledger")
    psub = p.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    show = psub.add_parser("show", help="the policy in the node's ledger, and per VM its bucket")
    show.add_argument("--json", action="store_true", help="print GET /api/policy's document")
    add_node_options(show)
    show.set_defaults(func=run_policy_show)
    put = psub.add_parser("set", help="change the policy (fields not given are kept)")
    put.add_argument("--v3-percent", type=_percent, metavar="N",
                     help="v3 for VMs whose bucket (hash of the name mod 100) is below N")
    put.add_argument("--target-dcs", type=_names, metavar="DC,DC",
                     help="v3 for every migration from or to these DCs ('' clears)")
    put.add_argument("--target-regions", type=_names, metavar="REGION,REGION",
                     help="v3 for every migration from or to a DC in these regions (the "
                          "federation file's [[dc]] region; '' clears)")
    put.add_argument("--target-vms", type=_names, metavar="VM,VM",
                     help="v3 for these VMs ('' clears)")
    put.add_argument("--exclude-dcs", type=_names, metavar="DC,DC",
                     help="never v3 from or to these DCs, whatever the targets say ('' clears)")
    put.add_argument("--kill-switch", choices=("on", "off"),
                     help="on: v1 for every migration, whatever the rest says; off also "
                          "clears an automatic rollback")
    put.add_argument("--max-abort-percent", type=_percent, metavar="P",
                     help="roll back to v1 when P %% or more of the v3 migrations ended "
                          "since this policy aborted (not counting operators' cancels; "
                          "0: no such rule)")
    put.add_argument("--min-ended", type=_count, metavar="N",
                     help="judge the abort rate once N v3 migrations ended (default 10)")
    put.add_argument("--max-verify-failures", type=_count, metavar="N",
                     help="roll back to v1 at the N-th v3 migration that fails "
                          "verification (0: no such rule)")
    put.add_argument("--json", action="store_true", help="print the recorded policy as JSON")
    add_request_id(put)
    add_node_options(put)
    put.set_defaults(func=run_policy_set)


def render_policy(policy: dict[str, Any], vms: list[dict[str, Any]]) -> str:
    """The policy, then per VM of the ledger its bucket and whether its migrations get v3
    (:func:`consensus.ledger.v3_allowed`; both DCs must also offer v3)."""
    from federation.migration.rollout import rollout_bucket

    pct = policy["v3_percent"]
    excluded = policy.get("excluded_dcs", [])
    fields: list[tuple[str, str]] = [("v3_percent", str(pct)),
            ("target_dcs", ", ".join(policy["target_dcs"]) or "-"),
            ("target_vms", ", ".join(policy["target_vms"]) or "-"),
            ("kill_switch", "on" if policy["kill_switch"] else "off")]
    if "excluded_dcs" in policy:
        fields += [("target_regions", ", ".join(policy["target_regions"]) or "-"),
                 ("excluded_dcs", ", ".join(excluded) or "-"),
                 ("rollback", _rollback_rules(policy)),
                 ("v3 since set", f"{policy['v3_ended']} ended, {policy['v3_aborted']} "
                                  f"aborted, {policy['v3_verify_failures']} failed "
                                  "verification")]
        if policy["rolled_back"]:
            fields.append(("ROLLED BACK", policy["rolled_back"]))
    width = max(len(k) for k, _ in fields) + 2
    lines = [f"{k:<{width}}{v}" for k, v in fields]
    lines.append("")
    rows = [["VM", "OWNER", "BUCKET", "V3"]]
    for v in vms:
        if v["owner"] is None:
            continue
        bucket = rollout_bucket(v["name"])
        if policy["kill_switch"]:
            why = "no (rolled back)" if policy.get("rolled_back") else "no (kill switch)"
        elif v["owner"] in excluded:
            why = "no (its owner is in excluded_dcs)"
        elif v["name"] in policy["target_vms"]:
            why = "yes (target_vms)"
        elif v["owner"] in policy["target_dcs"]:
            why = "yes (its owner is in target_dcs)"
        elif bucket < pct:
            why = f"yes (bucket {bucket} < {pct})"
        elif policy["target_dcs"] or policy.get("target_regions"):
            why = "only to a DC in target_dcs" if not policy.get("target_regions") else (
                "only to a DC in target_dcs or target_regions")
        else:
            why = "no"
        rows.append([v["name"], v["owner"], str(bucket), why])
    lines.append(table(rows) if len(rows) > 1 else "no VMs in the ledger")
    return "\n".join(lines)


def _rollback_rules(policy: dict[str, Any]) -> str:
    rules = []
    if policy["max_abort_percent"]:
        rules.append(f"at {policy['max_abort_percent']} % aborted once "
                     f"{policy['min_ended']} v3 migrations ended")
    if policy["max_verify_failures"]:
        n = policy["max_verify_failures"]
        rules.append(f"at {n} verification failure{'s' if n > 1 else ''}")
    return "; ".join(rules) or "none (only by hand)"


#: ``dwcp policy set`` options -> SetPolicy fields (all optional; the rest is kept).
_FIELDS = ("v3_percent", "target_dcs", "target_vms", "target_regions", "max_abort_percent",
           "min_ended", "max_verify_failures")


def run_policy_show(args: argparse.Namespace) -> int:
    api = node_api(args)
    policy = api.ok("GET", "/api/policy")
    if args.json:
        print(json.dumps(policy, indent=2))
        return 0
    print(render_policy(policy, api.ok("GET", "/api/vms")))
    return 0


def run_policy_set(args: argparse.Namespace) -> int:
    changes: dict[str, Any] = {k: getattr(args, k) for k in _FIELDS
                               if getattr(args, k) is not None}
    if args.exclude_dcs is not None:
        changes["excluded_dcs"] = args.exclude_dcs
    if args.kill_switch is not None:
        changes["kill_switch"] = args.kill_switch == "on"
    if not changes:
        raise CommandError("nothing to set: give --v3-percent, --target-dcs, --target-vms "
                           "or --kill-switch (or another option of `dwcp policy set -h`)")
    api = node_api(args)
    # The API records a whole policy: start from the ledger's, change what was asked.
    policy = {**api.ok("GET", "/api/policy"), **changes}
    try:
        recorded = ledger_call(api, "POST", "/api/policy", SetPolicy(
            policy["v3_percent"], tuple(policy["target_dcs"]), tuple(policy["target_vms"]),
            policy["kill_switch"], tuple(policy.get("target_regions", ())),
            tuple(policy.get("excluded_dcs", ())), policy.get("max_abort_percent", 0),
            policy.get("min_ended", 10), policy.get("max_verify_failures", 0)),
            args.request_id)
    except Pending as exc:
        return pending_exit(exc)
    if "request" in recorded:  # sent before under this id: the ledger's policy now
        recorded = api.ok("GET", "/api/policy")
    recorded.pop("request_id", None)  # the policy alone (the id is in the node's log)
    if args.json:
        print(json.dumps(recorded, indent=2))
        return 0
    print(render_policy(recorded, api.ok("GET", "/api/vms")))
    return 0
