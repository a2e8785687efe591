"""The client side of PBFT: a DC submitting ledger commands (OSDI'99 §4.1).

The client signs a REQUEST, multicasts it to every replica and waits for f+1
REPLYs from distinct replicas with the same result: at least one of them is
from a correct replica, so the result is the one the ledger computed. Until
then it retransmits the request every ``RETRANSMIT`` seconds (the replicas
answer a request they already executed with its remembered result); after
``timeout`` seconds it gives up.

Sans-I/O: completion is reported as ``Notify("ledger.committed",
{"request_id", "result"})`` or ``Notify("ledger.timeout", {"request_id"})``.
The node's ``await ledger.submit(command)`` wraps this.

Request ids never repeat, also across restarts: ids are handed out from
blocks of ``ID_BLOCK`` whose start is persisted (synced) before the first id
of a block is used, so a restarted client skips to a fresh block.
"""

from __future__ import annotations

from collections.abc import Hashable

import attrs

from consensus.ledger import CLIENT_WINDOW
from consensus.messages import Envelope, Reply, Request, seal
from consensus.quorum import Quorum
from mesh.core import Action, CancelTimer, Notify, Persist, SetTimer, Store
from mesh.identity import Identity

__all__ = ["LedgerClient", "ClientBusy", "RETRANSMIT", "ID_BLOCK"]

#: Retransmission period: BFT-SMaRt's request timeout default (2000 ms); long
#: enough that a normal commit never triggers it, short enough that a request
#: lost in a partition is sent again soon after it heals.
RETRANSMIT = 2.0
#: Ids reserved per persisted block (one synced write per 1024 submissions).
ID_BLOCK = 1024
_NEXT_KEY = "pbft-client/next-block"


class ClientBusy(Exception):
    """As many commands are in flight as the ledger's exactly-once window holds."""


@attrs.define
class _Outstanding:
    envelope: Envelope
    deadline: float
    replies: dict[str, bytes] = attrs.Factory(dict)
    #: the armed timer is the deadline itself (decided when arming it, not by
    #: comparing clock readings when it fires, which a shifted clock can fool)
    at_deadline: bool = False


class LedgerClient:
    def __init__(
        self, name: str, identity: Identity, quorum: Quorum, timeout: float, store: Store
    ) -> None:
        self.name = name
        self.identity = identity
        self.q = quorum
        self.timeout = timeout
        raw = store.get(_NEXT_KEY)
        self._next = int.from_bytes(raw, "big") if raw else 1
        self._block_end = self._next
        self.outstanding: dict[int, _Outstanding] = {}
        self.resend: list[Envelope] = []

    def submit(self, now: float, command: bytes) -> tuple[int, Envelope, list[Action]]:
        if len(self.outstanding) >= CLIENT_WINDOW:
            raise ClientBusy(f"{CLIENT_WINDOW} ledger commands are already in flight")
        actions: list[Action] = []
        if self._next >= self._block_end:
            self._block_end = self._next + ID_BLOCK
            actions.append(Persist(_NEXT_KEY, self._block_end.to_bytes(8, "big")))
        rid = self._next
        self._next += 1
        env = seal(self.identity, self.name, Request(self.name, rid, command))
        out = self.outstanding[rid] = _Outstanding(env, now + self.timeout)
        actions.append(self._arm(now, rid, out))
        return rid, env, actions

    @staticmethod
    def _arm(now: float, rid: int, out: _Outstanding) -> SetTimer:
        out.at_deadline = now + RETRANSMIT >= out.deadline
        at = out.deadline if out.at_deadline else now + RETRANSMIT
        return SetTimer(("ledger-client", rid), at)

    def on_reply(self, now: float, sender: str, reply: Reply) -> list[Action]:
        """Count ``sender``'s results; complete each request with f+1 matching ones."""
        if reply.client != self.name or sender not in self.q.members:
            return []
        actions: list[Action] = []
        for res in reply.results:
            out = self.outstanding.get(res.request_id)
            if out is None:
                continue
            out.replies.setdefault(sender, res.result)
            matching = sum(1 for r in out.replies.values() if r == res.result)
            if matching < self.q.f + 1:
                continue
            del self.outstanding[res.request_id]
            actions.append(CancelTimer(("ledger-client", res.request_id)))
            actions.append(Notify("ledger.committed",
                                  {"request_id": res.request_id, "result": res.result}))
        return actions

    def on_timer(self, now: float, key: Hashable, peers: list[str]) -> list[Action]:
        assert isinstance(key, tuple)
        rid = key[1]
        out = self.outstanding.get(rid)
        if out is None:
            return []
        if out.at_deadline:
            del self.outstanding[rid]
            return [Notify("ledger.timeout", {"request_id": rid})]
        self.resend.append(out.envelope)
        return [self._arm(now, rid, out)]

    def take_resend(self) -> list[Envelope]:
        out, self.resend = self.resend, []
        return out
