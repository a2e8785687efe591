"""The operator requests a ledger remembers: exactly-once by request id, and their outcome.

An operator's request id (the nonce of its signed request) is its idempotency
key: the ledger keeps the first outcome of every operator request it executed,
so a re-submission of the same signed request returns that outcome and never
applies twice, and a query by request id tells committed, refused or unknown.

Memory is bounded, deterministically (every replica evicts the same records at
the same command): a record leaves once it is ``RETENTION`` older than the
ledger's clock, and when ``MAX_REMEMBERED`` are held the oldest one leaves if it
is already past the freshness window (a request that old is refused as expired
anyway, so forgetting it can never let it apply twice); if even the oldest is
fresh, the new request is refused. Order of eviction: (created, operator, nonce).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from consensus.authz import FRESHNESS_WINDOW, AuthError
from consensus.ledger_commands import MAX_REMEMBERED, RequestRecord

__all__ = ["RequestBook", "RETENTION"]

#: How long the outcome of an operator request stays queryable: Stripe keeps an
#: idempotency key's result for 24 hours (API reference, "Idempotent requests"),
#: long enough for an operator whose request timed out to come back the next day.
RETENTION = 24 * 3600.0

Key = tuple[str, str]


class RequestBook:
    """(operator, nonce) -> :class:`RequestRecord`, evicted oldest first."""

    def __init__(self, records: Iterable[RequestRecord] = ()) -> None:
        self.records: dict[Key, RequestRecord] = {}
        self._order: list[tuple[float, str, str]] = []
        for rec in records:
            self.records[(rec.operator, rec.nonce)] = rec
            self._order.append((rec.created, rec.operator, rec.nonce))
        heapq.heapify(self._order)

    def get(self, operator: str, nonce: str) -> RequestRecord | None:
        return self.records.get((operator, nonce))

    def __len__(self) -> int:
        return len(self.records)

    def add(self, rec: RequestRecord) -> Key:
        key = (rec.operator, rec.nonce)
        if key in self.records:
            raise KeyError(f"request {rec.nonce} of {rec.operator!r} is already recorded")
        self.records[key] = rec
        heapq.heappush(self._order, (rec.created, rec.operator, rec.nonce))
        return key

    def expire(self, clock: float) -> list[Key]:
        """Forget the records older than RETENTION at ``clock``; returns their keys."""
        gone: list[Key] = []
        while self._order and self._order[0][0] < clock - RETENTION:
            _, op, nonce = heapq.heappop(self._order)
            del self.records[(op, nonce)]
            gone.append((op, nonce))
        return gone

    def make_room(self, clock: float) -> list[Key]:
        """Room for one more record (of MAX_REMEMBERED): forget the oldest if it is past
        the freshness window at ``clock``, else raise :class:`AuthError` (``too-many``)."""
        gone: list[Key] = []
        while len(self.records) >= MAX_REMEMBERED:
            created, op, nonce = self._order[0]
            if created >= clock - FRESHNESS_WINDOW:
                raise AuthError("too-many", f"{len(self.records)} operator requests within "
                                            f"the last {FRESHNESS_WINDOW:.0f} s; try again later")
            heapq.heappop(self._order)
            del self.records[(op, nonce)]
            gone.append((op, nonce))
        return gone
