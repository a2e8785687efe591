"""The simulator's operators: deterministic keys, a table every replica shares, and a
signer that makes the operator requests a scenario's workload needs.

In a real federation a person signs each request with a key no DC holds
(federation.api.auth); in a simulated one the scenario plays the operators. The
keys derive from the names, like :func:`sim.hosts.pbft_cluster.identity_for`, and
the nonces from a counter, so a run stays a function of its seed.
"""

from __future__ import annotations

import hashlib

from consensus.authz import Authorization, Operator, OperatorTable, Role, authorize
from mesh.identity import Identity

__all__ = ["SIM_FEDERATION", "SIM_OPERATORS", "operator_key", "OperatorSigner"]

#: The federation id simulated operators sign for.
SIM_FEDERATION = "sim"


def operator_key(name: str) -> Identity:
    """A deterministic operator key per name (never a DC's: another derivation)."""
    return Identity.from_seed(hashlib.sha256(b"dwcp-sim-operator/" + name.encode()).digest())


#: One operator of each role.
SIM_OPERATORS = OperatorTable.of(SIM_FEDERATION, [
    Operator(name, operator_key(name).public, role)
    for name, role in (("admin", Role.ADMIN), ("ops", Role.OPERATOR), ("watcher", Role.VIEWER))
])


class OperatorSigner:
    """Signs intents as operator ``name`` with nonces ``<prefix>-<n>``, n = 1, 2, ..."""

    def __init__(self, name: str = "admin", prefix: str = "sim",
                 table: OperatorTable = SIM_OPERATORS) -> None:
        self.name = name
        self.key = operator_key(name)
        self.prefix = prefix
        self.federation = table.federation
        self.count = 0

    def next_nonce(self) -> str:
        self.count += 1
        return f"{self.prefix}-{self.count:08d}"

    def authorize(self, intent: object, created: float, nonce: str | None = None) -> Authorization:
        return authorize(self.key, self.federation, self.name, intent, created,
                         nonce or self.next_nonce())
