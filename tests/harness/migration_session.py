"""A source session (dc1 -> dc2, migration m1 of vm1) driven along its normal path, one
step per helper, each returning the actions of its last event; and action filters."""

from __future__ import annotations

from typing import Any

from consensus.ledger import AbortMigration, SetPolicy
from federation.migration.source import SourceSession
from federation.migration.vocabulary import (
    LedgerBegun,
    MigrationReady,
    PrecopyLimits,
    RoundSent,
    SourceFenced,
)
from mesh.core import Received
from tests.harness.ledger import AUTH

LAYOUT = (("memory", 1000), ("disk-0", 500))
V3_ALL = SetPolicy(100, (), (), False)
#: The datacenter mode's pre-copy limits (5 rounds, 0.5 s downtime).
DC_LIMITS = PrecopyLimits(5, 0.5)


def abort_of(command: Any) -> str | None:
    """The migration a DC's own abort (no operator's authorization) is about, else None;
    its reason and cause are checked where a test is about them."""
    if isinstance(command, AbortMigration) and command.authorization is None:
        return command.migration_id
    return None


def of(actions: list[Any], cls: type) -> list[Any]:
    return [a for a in actions if isinstance(a, cls)]


def one(actions: list[Any], cls: type) -> Any:
    found = of(actions, cls)
    assert len(found) == 1, f"expected one {cls.__name__} in {actions}"
    return found[0]


def session(limits: PrecopyLimits = DC_LIMITS, policy: SetPolicy = V3_ALL) -> SourceSession:
    return SourceSession.plan("dc1", "m1", "vm1", "dc2", 3, LAYOUT, limits, policy,
                              (1, 3), (1, 3), AUTH)


def begun(s: SourceSession) -> list[Any]:
    s.start(0.0)
    return s.handle(0.1, LedgerBegun("m1", 3))


def precopy(s: SourceSession) -> list[Any]:
    begun(s)
    return s.handle(0.2, Received("dc2", MigrationReady("m1")))


def fenced(s: SourceSession, t: float = 1.0) -> list[Any]:
    precopy(s)
    return s.handle(t, RoundSent(1, 1500, 1500 * 4096, 1_000_000, 1.0, dirty_pages=1))


def final(s: SourceSession) -> list[Any]:
    fenced(s)
    return s.handle(1.1, SourceFenced(b"R" * 32))


def verifying(s: SourceSession) -> list[Any]:
    final(s)
    return s.handle(1.2, RoundSent(2, 1, 4096, 100, 0.01, 0))
