"""What a PBFT replica reports about itself: a read-only record for status pages and
metrics (:meth:`consensus.pbft.replica.Replica.status_record`), so that readers need
none of the replica's internals."""

from __future__ import annotations

from typing import Any

import attrs

__all__ = ["ReplicaStatus"]


@attrs.frozen
class ReplicaStatus:
    view: int
    #: False while a view change runs
    active: bool
    primary: str
    last_executed: int
    stable_checkpoint: int
    #: the replicas of the federation, in name order
    members: tuple[str, ...]
    #: the faults tolerated: n = 3f + 1
    f: int
    #: DCs convicted by a signed equivocation proof, and per peer the messages refused
    #: for a bad signature or as malformed (consensus.pbft.evidence)
    evidence: dict[str, Any]
    view_changes_started: int
    view_changes_completed: int

    @property
    def quorum(self) -> int:
        """Replicas that must agree (and be connected) for the ledger to move: 2f + 1."""
        return 2 * self.f + 1
