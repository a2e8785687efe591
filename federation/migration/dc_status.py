"""What the node core (:mod:`federation.migration.dc_core`) reports about its migrations:
read-only records for status pages and metrics, so readers need neither its sessions'
internals nor the replica's."""

from __future__ import annotations

import attrs

from consensus.ledger import MigrationRecord
from federation.migration.session import SessionBase
from federation.migration.vocabulary import Outcome, Progress

__all__ = ["SessionStatus", "MigrationView"]


@attrs.frozen
class SessionStatus:
    """A migration session at this DC, as it stands: bytes and the estimate as an
    operator sees them, the round in flight included (SessionBase.moved_bytes,
    shown_eta)."""

    vm: str
    source: str
    target: str
    role: str
    phase: str
    round: int
    bytes_sent: int
    wire_bytes: int
    total_bytes: int
    dirty_rate: float
    throughput: float
    eta: float
    version: int
    reason: str
    #: a source's reserve for the stop window's fixed part, the final round's bias, and
    #: which of the reserve's figures were measured (federation.migration.stop_costs;
    #: 0, 1 and none where the round policy was given none)
    stop_reserve: float = 0.0
    stop_bias: float = 1.0
    reserve_measured: tuple[str, ...] = ()
    #: what the source measured of this migration's own stop window, once committed
    stop_costs: dict[str, float | None] | None = None

    @classmethod
    def of(cls, s: SessionBase) -> SessionStatus:
        reserve, bias, measured = (getattr(s, "reserve", 0.0), getattr(s, "bias", 1.0),
                                   getattr(s, "reserve_measured", ()))
        costs = getattr(s, "stop_costs", None)
        return cls(s.vm, s.source, s.target, s.role.value, s.phase.value, s.round,
                   s.moved_bytes, s.moved_wire, s.total_bytes, s.dirty_rate, s.throughput,
                   s.shown_eta, s.version, s.reason, reserve, bias, tuple(measured),
                   None if costs is None else attrs.asdict(costs))


@attrs.frozen
class MigrationView:
    """One migration as this DC knows it: the ledger's record, the session here, its last
    progress report and its outcome (each None where there is none)."""

    migration_id: str
    ledger: MigrationRecord | None
    session: SessionStatus | None
    progress: Progress | None
    outcome: Outcome | None
