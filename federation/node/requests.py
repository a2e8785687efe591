"""The outcome of an operator's request, by its request id: what ``GET /api/requests/ID``
and ``dwcp status --request ID`` tell.

A state-changing request's id is the nonce of its signed request (consensus.authz). The
ledger remembers the outcome of every request it executed (committed or refused, 24 h:
consensus.operator_requests); this node adds what the ledger cannot know yet: the
requests it is carrying to the ledger, or carried and got no answer in time (the API
answered "pending, id X"). Their outcome is then:

- ``committed`` / ``refused``: the ledger executed it (the same everywhere);
- ``pending``: this node submitted it and the ledger has not executed it (yet). After
  ``FRESHNESS_WINDOW`` from its signing no replica takes it any more (it would be
  refused as expired), so a pending request older than that becomes ``unknown``;
- ``unknown``: neither the ledger nor this node knows it. Re-submitting the same
  request under the same id is always safe: it never applies twice.
"""

from __future__ import annotations

from typing import Any

import attrs

from consensus.authz import FRESHNESS_WINDOW, Authorization, RequestHead, SignedRequest
from consensus.ledger_state import LedgerState
from mesh import wire

__all__ = ["OperatorRequests", "Pending", "MAX_PENDING", "request_key"]

#: Requests a node keeps as pending: the ledger client takes one at a time per caller
#: and gives up after 30 s, so even a busy operator team leaves far fewer.
MAX_PENDING = 4096


def request_key(authorization: Authorization) -> tuple[str, str, float]:
    """(operator, request id, created) of a signed request the door already checked."""
    signed = wire.decode(authorization.request, expect=(SignedRequest,))
    head = wire.decode(signed.head, expect=(RequestHead,))
    return head.operator, head.nonce, head.created


@attrs.define
class Pending:
    operator: str
    request_id: str
    command: str  # what the route does: import, delete, migrate, cancel, policy
    subject: str  # the VM, or the migration id once the node made one
    created: float  # when the operator signed it
    timed_out: bool = False


class OperatorRequests:
    """The requests this node is carrying to the ledger, by (operator, request id)."""

    def __init__(self) -> None:
        self.pending: dict[tuple[str, str], Pending] = {}

    def begin(self, operator: str, request_id: str, command: str, subject: str,
              created: float) -> Pending:
        while len(self.pending) >= MAX_PENDING:
            del self.pending[next(iter(self.pending))]  # the oldest first
        p = self.pending[(operator, request_id)] = Pending(operator, request_id, command,
                                                           subject, created)
        return p

    def get(self, operator: str, request_id: str) -> Pending | None:
        return self.pending.get((operator, request_id))

    def end(self, operator: str, request_id: str) -> None:
        """The ledger answered (or the node refused it before the ledger saw it)."""
        self.pending.pop((operator, request_id), None)

    def outcome(self, ledger: LedgerState | None, operator: str, request_id: str,
                now: float) -> dict[str, Any]:
        """The request's outcome as an API document (see the module docstring)."""
        doc: dict[str, Any] = {"request_id": request_id, "operator": operator}
        if ledger is not None:
            st = ledger.request_status(operator, request_id)
            if st.state != "unknown":
                self.pending.pop((operator, request_id), None)
                return doc | {"outcome": st.state, "command": st.command,
                              "subject": st.subject, "error": st.error or None,
                              "epoch": st.epoch, "created": st.created}
        p = self.pending.get((operator, request_id))
        if p is not None and now - p.created <= FRESHNESS_WINDOW:
            return doc | {"outcome": "pending", "command": p.command, "subject": p.subject,
                          "error": None, "created": p.created, "timed_out": p.timed_out}
        return doc | {"outcome": "unknown", "command": None, "subject": None, "error": None}
