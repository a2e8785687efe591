"""The client side of PBFT: a DC submitting ledger commands (OSDI'99 §4.1).

The client signs a REQUEST (one to ``MAX_REQUEST_COMMANDS`` commands submitted
together, each with its own request id), sends it to the primary
(``Replica.submit``) and waits, per command, for f+1
REPLYs from distinct replicas with the same result: at least one of them is
from a correct replica, so the result is the one the ledger computed. Until
then it retransmits the request to every replica (the replicas answer a
request they already executed with its remembered result); after ``timeout``
seconds it gives up. The retransmission timeout follows TCP's (RFC 6298):
the smoothed commit latency plus four times its variation, at least
``RETRANSMIT`` and at most ``RETRANSMIT_MAX`` (not doubled per retransmission as
in §5.5: a request lost in a long partition must go out again soon after it
heals, there is no congestion to back off from). A federation that commits
slowly because it is loaded (16 DCs sharing two cores: 1-2 s per command) then
does not add a copy of every request to every replica on top of its load,
while a lost request is still sent again within ``RETRANSMIT`` on an idle one.

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
from consensus.pbft.messages import MAX_REQUEST_COMMANDS, Envelope, Reply, Request, seal
from consensus.pbft.quorum import Quorum
from mesh.core import Action, CancelTimer, Notify, Persist, SetTimer, Store
from mesh.identity import Identity

__all__ = ["LedgerClient", "ClientBusy", "RETRANSMIT", "RETRANSMIT_MAX", "ID_BLOCK"]

#: Retransmission period: BFT-SMaRt's request timeout default (2000 ms); long
#: enough that a normal commit never triggers it, short enough that a request
#: lost in a partition is sent again soon after it heals.
RETRANSMIT = 2.0
#: Most a retransmission waits, however slow commits were: 4 x RETRANSMIT, so
#: a request lost in a partition goes out again within 8 s of the heal (the
#: simulator's PBFT quiet phase requires every request done within 30 s).
RETRANSMIT_MAX = 4 * RETRANSMIT
#: Ids reserved per persisted block (one synced write per 1024 submissions).
ID_BLOCK = 1024
_NEXT_KEY = "pbft-client/next-block"


class ClientBusy(Exception):
    """As many commands are in flight as the ledger's exactly-once window holds."""


@attrs.define
class _Outstanding:
    envelope: Envelope
    deadline: float
    submitted: float
    replies: dict[str, bytes] = attrs.Factory(dict)
    #: sent again at least once (its latency is then no sample, RFC 6298 §3)
    resent: bool = False
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
        #: smoothed commit latency and its mean deviation (RFC 6298 §2), None before
        #: the first commit
        self.srtt: float | None = None
        self.rttvar = 0.0

    def submit(
        self, now: float, commands: tuple[bytes, ...]
    ) -> tuple[range, Request, Envelope, list[Action]]:
        """Sign ``commands`` (1 to ``MAX_REQUEST_COMMANDS``) as one REQUEST; each
        command gets its own request id and completes on its own."""
        if not 1 <= len(commands) <= MAX_REQUEST_COMMANDS:
            raise ValueError(f"a request carries 1 to {MAX_REQUEST_COMMANDS} commands, "
                             f"got {len(commands)}")
        if len(self.outstanding) + len(commands) > CLIENT_WINDOW:
            raise ClientBusy(f"{CLIENT_WINDOW} ledger commands are already in flight")
        actions: list[Action] = []
        if self._next + len(commands) > self._block_end:
            self._block_end = self._next + len(commands) + ID_BLOCK
            actions.append(Persist(_NEXT_KEY, self._block_end.to_bytes(8, "big")))
        rids = range(self._next, self._next + len(commands))
        self._next = rids.stop
        req = Request(self.name, rids.start, tuple(commands))
        env = seal(self.identity, self.name, req)
        for rid in rids:
            out = self.outstanding[rid] = _Outstanding(env, now + self.timeout, now)
            actions.append(self._arm(now, rid, out))
        return rids, req, env, actions

    def retransmit_timeout(self) -> float:
        """RFC 6298 §2.3: RTO = SRTT + 4 RTTVAR, within [RETRANSMIT, RETRANSMIT_MAX]."""
        if self.srtt is None:
            return RETRANSMIT
        return min(RETRANSMIT_MAX, max(RETRANSMIT, self.srtt + 4 * self.rttvar))

    def _arm(self, now: float, rid: int, out: _Outstanding) -> SetTimer:
        at = now + self.retransmit_timeout()
        out.at_deadline = at >= out.deadline
        return SetTimer(("ledger-client", rid), out.deadline if out.at_deadline else at)

    def _sample(self, latency: float) -> None:
        """RFC 6298 §2.2-2.3 with alpha = 1/8, beta = 1/4. Only requests never
        retransmitted are sampled (Karn's algorithm, RFC 6298 §3)."""
        if self.srtt is None:
            self.srtt, self.rttvar = latency, latency / 2
        else:
            self.rttvar += (abs(self.srtt - latency) - self.rttvar) / 4
            self.srtt += (latency - self.srtt) / 8

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
            if not out.resent:
                self._sample(now - out.submitted)
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
        if all(env is not out.envelope for env in self.resend):  # once per request
            self.resend.append(out.envelope)
        out.resent = True
        return [self._arm(now, rid, out)]

    def take_resend(self) -> list[Envelope]:
        out, self.resend = self.resend, []
        return out
