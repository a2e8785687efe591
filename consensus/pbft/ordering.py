"""Requests waiting to be ordered: admission, the primary's batches, relays (OSDI'99 §4.1).

- A REQUEST is admitted if its client signed it; a request that already
  executed is answered again with its remembered results; each client has at
  most ``CLIENT_WINDOW`` requests waiting (the ledger's exactly-once window).
- Every replica with requests waiting runs its request timer; when it fires
  the replica suspects the primary (:mod:`consensus.pbft.viewchange`).
- The primary proposes while its pipeline has room: a batch of what waits, at
  once when nothing is in flight or the batch is full, else after ``batch_wait``.
- Backups hand the primary requests that waited long (once per view); a DC's
  own requests, which go first to the primary alone, are relayed to every
  replica once when they wait long, so every backup can suspect the primary.
"""

from __future__ import annotations

import itertools

from consensus.ledger import CLIENT_WINDOW
from consensus.pbft import agreement, batch_time
from consensus.pbft.messages import (
    Batch,
    Envelope,
    PrePrepare,
    Reply,
    Request,
    Result,
    SignatureError,
    Signed,
    batch_bytes,
    digest,
    request_ids,
)
from consensus.pbft.outbox import Outbox
from consensus.pbft.state import BATCH_TIMER, REQUEST_TIMER, ReplicaState

__all__ = [
    "FORWARD_MAX",
    "on_request",
    "adopt_requests",
    "arm_request_timer",
    "maybe_propose",
    "forward_pending",
    "relay_own_pending",
]

#: Requests relayed per peer per status interval: a batch's worth (B = 100).
FORWARD_MAX = 100


def on_request(st: ReplicaState, out: Outbox, now: float, signed: Signed, peer: str) -> None:
    """Admit a REQUEST from ``peer`` (answer it if it executed, else keep it pending)."""
    try:
        req = st.verifier.open(signed, (Request,))
    except SignatureError:
        st.evidence.count_malformed(peer)
        return
    assert isinstance(req, Request)
    try:
        ids = request_ids(req)
    except SignatureError:
        ids = range(0)
    if req.client != signed.sender or not ids:
        st.evidence.count_malformed(peer)
        return
    key = (req.client, req.request_id)
    if st.ledger.executed_result(*key) is not None:
        # Its commands executed together, in one batch: answer with their results.
        done = [Result(rid, res) for rid in ids
                if (res := st.ledger.executed_result(req.client, rid)) is not None]
        out.send(req.client, out.sign(Reply(st.view, req.client, tuple(done))))
        return
    if key in st.pending:
        return
    if st.pending_of.get(req.client, 0) >= CLIENT_WINDOW:
        st.count("requests_dropped_client_window")
        return
    st.add_pending(key, signed, now)
    arm_request_timer(st, out, now)
    maybe_propose(st, out, now)


def adopt_requests(st: ReplicaState, out: Outbox, now: float,
                   requests: tuple[Signed, ...]) -> None:
    """Keep the requests of a batch this replica refused to vote for as its own pending
    ones (those not executed yet), so its request timer suspects the primary unless
    they execute soon (:mod:`consensus.pbft.batch_time`)."""
    for signed in requests:
        try:
            req = st.verifier.open(signed, (Request,))
        except SignatureError:
            continue  # checked with the batch: cannot happen
        assert isinstance(req, Request)
        key = (req.client, req.request_id)
        if (key in st.pending or st.ledger.executed_result(*key) is not None
                or st.pending_of.get(req.client, 0) >= CLIENT_WINDOW):
            continue
        st.add_pending(key, signed, now)
    arm_request_timer(st, out, now)


def arm_request_timer(st: ReplicaState, out: Outbox, now: float, restart: bool = False) -> None:
    if not st.pending or not st.active:
        if st.request_timer:
            out.cancel_timer(REQUEST_TIMER)
            st.request_timer = False
        return
    if restart or not st.request_timer:
        out.set_timer(REQUEST_TIMER, now + st.timeout)
        st.request_timer = True


def maybe_propose(st: ReplicaState, out: Outbox, now: float, waited: bool = False) -> None:
    """Propose while the pipeline has room: at once when nothing is in flight or a
    batch is full, else when the oldest request has waited ``batch_wait``.
    ``waited``: the batch timer fired, so the wait is over whatever ``now`` says
    (comparing clock readings again could re-arm a timer that is already due, and
    loop, when the driver's clock is shifted or rounds)."""
    if not (st.active and st.is_primary):
        return
    while True:
        # Full pipeline or window: nothing to do until a batch executes (the replica
        # proposes again then), so the waiting requests are not even listed: this runs
        # for every request that arrives, and listing them all each time was
        # quadratic in the requests waiting.
        if st.next_seq > st.low + st.cfg.window:
            return
        inflight = st.in_flight()
        if inflight >= st.cfg.pipeline:
            return
        unproposed = (k for k in st.pending if k not in st.proposed)
        queue = list(itertools.islice(unproposed, st.cfg.batch_max))
        if not queue:
            out.cancel_timer(BATCH_TIMER)
            return
        oldest = st.pending[queue[0]][1]
        due = oldest + st.cfg.batch_wait
        if inflight and len(queue) < st.cfg.batch_max and not waited and now < due:
            out.set_timer(BATCH_TIMER, due)
            return
        _propose(st, out, now, tuple(st.pending[k][0] for k in queue))
        for k in queue:
            st.proposed[k] = st.next_seq - 1


def _propose(st: ReplicaState, out: Outbox, now: float, requests: tuple[Signed, ...]) -> None:
    seq = st.next_seq
    st.next_seq += 1
    batch = Batch(requests, batch_time.stamp(st, now, seq))
    data = batch_bytes(requests, batch.time_us)
    st.decoded[digest(data)] = batch
    pp = PrePrepare(st.view, seq, digest(data))
    st.count("batches_proposed")
    agreement.accept_preprepare(st, out, now, out.sign(pp, data), pp, data)


def forward_pending(st: ReplicaState, out: Outbox, now: float, older_than: float) -> None:
    """As a backup, hand the primary the requests that have waited ``older_than``
    seconds (all of them on entering a view): PBFT backups relay requests so a
    primary that lost or never got one still proposes it (OSDI'99 §4.1). Once per
    request and view: a loaded federation, where every request waits long, must
    not spend its capacity on copies the primary already holds."""
    if not st.active or st.is_primary:
        return
    sent = 0
    for key, (signed, since) in st.pending.items():
        if sent >= FORWARD_MAX:
            break
        if now - since >= older_than and st.forwarded.get(key) != st.view:
            out.send(st.primary, Envelope(signed.sender, signed.body, signed.sig))
            st.forwarded[key] = st.view
            sent += 1


def relay_own_pending(st: ReplicaState, out: Outbox, now: float, older_than: float) -> None:
    """Send every replica, once, the requests of our own client that have waited
    ``older_than`` seconds. A request goes first to the primary alone (OSDI'99
    §4.1), so the backups cannot suspect a primary that ignores it until they
    hold it too; then each runs its request timer, and 2f+1 of them can change
    the view. Once only: repeating is the client's retransmission (every
    ``consensus.pbft.client.RETRANSMIT`` seconds, to all), so an overloaded federation,
    where every request is old, is not flooded with copies on every status tick."""
    if not st.active:
        return
    sent = 0
    for key, (signed, since) in st.pending.items():
        if sent >= FORWARD_MAX:
            break
        if key[0] == st.name and key not in st.relayed and now - since >= older_than:
            out.broadcast(Envelope(signed.sender, signed.body, signed.sig))
            st.relayed[key] = None
            sent += 1
