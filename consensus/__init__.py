"""DWCP consensus: PBFT replica, the ledger state machine, Byzantine evidence, durable log.

- :class:`Replica` (:mod:`consensus.pbft.replica`): the sans-I/O PBFT core, n = 3f+1;
  its phases (``ordering``, ``agreement``, ``execution``, ``checkpoint``, ``viewchange``,
  ``status``, ``transfer``, ``recovery`` in :mod:`consensus.pbft`) are functions over
  its :class:`~consensus.pbft.state.ReplicaState` and :class:`~consensus.pbft.outbox.Outbox`;
- :class:`LedgerClient` (:mod:`consensus.pbft.client`): submit a command, complete on
  f+1 matching replies;
- :class:`Ledger` (:mod:`consensus.ledger`): VM ownership, migrations, policy, and who
  may change them (its commands in :mod:`consensus.ledger_commands`, its state and
  snapshot in :mod:`consensus.ledger_state` with bytes built from cached record
  encodings, :mod:`consensus.ledger_encoding`, the operator requests it remembers in
  :mod:`consensus.operator_requests`);
- operators, roles and their signed requests (:mod:`consensus.authz`);
- :class:`EvidenceBook`, :func:`check_proof` (:mod:`consensus.pbft.evidence`);
- :class:`ReplicaLog` (:mod:`consensus.pbft.durable`): the durable log over a
  :class:`mesh.core.Store` (SQLite in a node, the crash-consistent store in sim);
- the signed wire messages and certificate checks (:mod:`consensus.pbft.messages`,
  :mod:`consensus.pbft.quorum`).
"""

from consensus.ledger import (
    AbortMigration,
    AnnounceRoot,
    BeginMigration,
    ChangePolicy,
    CommitMigration,
    Ledger,
    LedgerInvariantError,
    LedgerResult,
    RegisterVm,
    SetPolicy,
    UnregisterVm,
)
from consensus.pbft.client import LedgerClient
from consensus.pbft.durable import ReplicaLog
from consensus.pbft.evidence import EquivocationProof, EvidenceBook, check_proof
from consensus.pbft.replica import PbftConfig, Replica

__all__ = [
    "Replica",
    "PbftConfig",
    "LedgerClient",
    "Ledger",
    "LedgerResult",
    "LedgerInvariantError",
    "RegisterVm",
    "BeginMigration",
    "AnnounceRoot",
    "CommitMigration",
    "AbortMigration",
    "SetPolicy",
    "ChangePolicy",
    "UnregisterVm",
    "EvidenceBook",
    "EquivocationProof",
    "check_proof",
    "ReplicaLog",
]
