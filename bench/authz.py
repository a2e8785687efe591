"""``dwcp bench authz``: what the ledger's authorization costs per command.

Authorization cannot be switched off: every operator command carries the operator's
signed request, and every replica checks it in execution (consensus.ledger). So its cost
is measured directly, on the command ``dwcp bench consensus`` loads the ledger with (a
``RegisterVm`` whose ``ImportVm`` an operator signed):

All times are CPU microseconds of the measuring thread (:data:`CLOCK`), the median of
the passes; each ``*_min`` is the fastest pass, the figure a loaded machine moves least.

- ``sign_us``: the operator's side, once per command (Ed25519 over the request head,
  consensus.authz.authorize);
- ``check_us``: one replica's checks (consensus.authz.open_authorization: decode, the
  Ed25519 verification, the body digest; then freshness and role), which every replica
  does for every command;
- ``execute_us``: one replica's whole ``Ledger.execute`` of the command, checks included,
  on a ledger that grows as the run goes (the state part is the rest);
- ``execute_replica_us``: the same on a ledger that took a snapshot first, as a PBFT
  replica's has (its genesis state), so that its snapshot encoder encodes every record a
  command changes when it changes it: what a replica's execution costs per command;
- ``command_bytes`` and ``authorization_bytes``: the encoded command, and how much of it
  is the signed request and its body (what every PBFT message that carries the command
  carries in addition).

Per committed command at n replicas the federation spends ``sign_us + n * check_us`` of
CPU on authorization: ``per_commit_cpu_us`` at n = 4 and 16, to be read against
``batched_cpu_us_per_commit`` of ``dwcp bench consensus`` (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

from consensus import authz
from consensus.authz import (
    Operator,
    OperatorTable,
    Role,
    authorize,
    check_fresh,
    check_role,
    open_authorization,
)
from consensus.ledger import ImportVm, Ledger, RegisterVm
from mesh import identity, wire

MEMBERS = ("n00", "n01", "n02", "n03")


def forget_verified() -> None:
    """Empty the process's memo of verified operator signatures (consensus.authz), so
    that every pass verifies every request, as a replica does the one time it executes
    it: the passes reuse the same requests."""
    authz._VERIFIED.clear()


#: The clock: this thread's CPU time, so that a busy shared machine (which makes the
#: thread wait, not work more) depresses the figures less than the wall clock would.
CLOCK = time.thread_time


def _per_call_us(fn: Any, items: list[Any], repeats: int) -> tuple[float, float]:
    """The median and the minimum over ``repeats`` passes of the mean CPU microseconds
    per item (on a shared machine the minimum moves least: other work only adds)."""
    passes = []
    for _ in range(repeats):
        forget_verified()
        start = CLOCK()
        for item in items:
            fn(item)
        passes.append((CLOCK() - start) / len(items) * 1e6)
    return round(statistics.median(passes), 2), round(min(passes), 2)


def run(commands: int = 2000, repeats: int = 5) -> dict[str, Any]:
    key = identity.generate()
    table = OperatorTable.of("bench", [Operator("ops", key.public, Role.OPERATOR)])
    now = time.time()
    intents = [ImportVm(f"vm-{i}", "n00", "/bench") for i in range(commands)]

    def sign(i: int) -> Any:
        return authorize(key, "bench", "ops", intents[i], now, f"bench-{i:08d}")

    sign_us, sign_min = _per_call_us(sign, list(range(commands)), repeats)
    auths = [sign(i) for i in range(commands)]

    def check(auth: Any) -> None:
        opened, body = open_authorization(table, auth)
        assert isinstance(body, ImportVm)
        check_fresh(opened.head, now)
        check_role(opened.operator, Role.OPERATOR)

    check_us, check_min = _per_call_us(check, auths, repeats)
    raws = [wire.encode(RegisterVm(f"vm-{i}", "n00", a)) for i, a in enumerate(auths)]

    def execute_pass(as_replica: bool) -> float:
        # a fresh ledger per pass: each command registers a new VM
        ledger = Ledger(MEMBERS, table)
        forget_verified()
        if as_replica:
            # A PBFT replica's ledger has taken a snapshot (its genesis, then every
            # checkpoint), so its snapshot encoder encodes each changed record as the
            # command changes it (consensus.ledger_encoding): part of every command's cost.
            ledger.execute("n00", 1, raws[0])
            ledger.snapshot()
        forget_verified()
        first = 2 if as_replica else 1
        start = CLOCK()
        for i in range(first - 1, commands):
            ledger.execute("n00", i + 1, raws[i])
        spent = (CLOCK() - start) / (commands - first + 1) * 1e6
        assert len(ledger.vms) == commands, "every register executed"
        return spent

    runs = [execute_pass(False) for _ in range(repeats)]
    replica_runs = [execute_pass(True) for _ in range(repeats)]
    execute_us = round(statistics.median(runs), 2)
    auth_bytes = len(auths[0].request) + len(auths[0].body)
    return {
        "commands": commands, "repeats": repeats, "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "sign_us": sign_us, "check_us": check_us, "execute_us": execute_us,
        "sign_us_min": sign_min, "check_us_min": check_min,
        "execute_us_min": round(min(runs), 2),
        "execute_replica_us": round(statistics.median(replica_runs), 2),
        "execute_replica_us_min": round(min(replica_runs), 2),
        "check_share_of_execute": round(check_us / execute_us, 3),
        "command_bytes": len(raws[0]), "authorization_bytes": auth_bytes,
        "per_commit_cpu_us": {"n4": round(sign_us + 4 * check_us, 1),
                              "n16": round(sign_us + 16 * check_us, 1)},
    }


def _main(args: argparse.Namespace) -> int:
    result = run(args.commands, args.repeats)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("authz", help="the ledger's per-command authorization cost")
    p.add_argument("--json", action="store_true", help="one JSON object on one line")
    p.add_argument("--commands", type=int, default=2000, help="commands per pass")
    p.add_argument("--repeats", type=int, default=5,
                   help="passes (their median and minimum are reported)")
    p.set_defaults(func=_main)
