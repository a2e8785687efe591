"""The PBFT replica: a sans-I/O core ordering ledger commands among n = 3f+1 DCs.

Castro & Liskov, "Practical Byzantine Fault Tolerance" (OSDI'99) and
"Practical Byzantine Fault Tolerance and Proactive Recovery" (TOCS'02):

- Normal case (OSDI'99 §4.2): the primary of view v assigns sequence number n
  to a batch of client requests and multicasts PRE-PREPARE(v, n, d) with the
  batch attached; a backup accepts it if it is in view v, n is within the
  watermarks, d is the digest of the batch and every request in it is signed
  by its client, and it has accepted no other digest for (v, n); then it
  multicasts PREPARE. *Prepared* = the pre-prepare plus 2f matching PREPAREs
  from other replicas; the replica multicasts COMMIT. *Committed-local* =
  prepared plus 2f+1 matching COMMITs. Batches execute in sequence order and
  every request is answered with a signed REPLY.
- Checkpoints (§4.3): after executing n with n mod K = 0 a replica multicasts
  CHECKPOINT(n, state digest); 2f+1 matching make it *stable*, the low
  watermark moves to n and the log below is discarded.
- Execution, checkpoints and crash recovery (§4.3, in :mod:`consensus.pbft.execution`),
  view change (§4.4, in :mod:`consensus.pbft.viewchange`), retransmission and state
  transfer (TOCS'02 §5.2, §6.2, in :mod:`consensus.pbft.transfer`).

Every message is an :class:`~consensus.pbft.messages.Envelope` signed by its
sender; signatures are verified over the received body bytes before decoding.

Driving it: construct it over the node's store (it recovers from the durable
log at once), call :meth:`Replica.start` once when the node starts, then feed
every event to :meth:`Replica.handle` and execute the returned actions in
order (a ``Persist`` before the ``Send`` that follows it). The DC's own ledger
commands go through :meth:`Replica.submit`; completion is a
``Notify("ledger.committed")`` or ``Notify("ledger.timeout")``. Other
notifications: ``pbft.executed``, ``pbft.view-change``, ``pbft.new-view``,
``pbft.state-transfer``, ``pbft.byzantine`` (with an
:class:`~consensus.evidence.EquivocationProof`), ``pbft.invalid-new-view``,
``pbft.divergence``. :meth:`Replica.status` is for ``/api/status``.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Mapping

import attrs

from consensus.authz import OperatorTable
from consensus.durable import ReplicaLog, SlotRecord
from consensus.evidence import EvidenceBook
from consensus.ledger import CLIENT_WINDOW, Ledger
from consensus.pbft import execution, transfer, viewchange
from consensus.pbft.client import LedgerClient
from consensus.pbft.execution import Decided
from consensus.pbft.messages import (
    MAX_BATCH,
    NULL_BATCH,
    NULL_DIGEST,
    Batch,
    BatchData,
    Checkpoint,
    Commit,
    Envelope,
    FetchBatch,
    NewView,
    Prepare,
    PreparedCert,
    PrePrepare,
    Reply,
    Request,
    Result,
    SignatureError,
    Signed,
    StateReply,
    StateRequest,
    Status,
    Verifier,
    ViewChange,
    batch_bytes,
    digest,
    request_ids,
    seal,
)
from consensus.pbft.quorum import Quorum, ValidViewChange
from consensus.pbft.replica_status import ReplicaStatus
from mesh import wire
from mesh.core import (
    Action,
    CancelTimer,
    Event,
    Notify,
    PeerDown,
    PeerUp,
    Received,
    Send,
    SetTimer,
    TimerFired,
)
from mesh.identity import Identity, PublicKey

__all__ = ["PbftConfig", "Replica", "CHECKPOINT_INTERVAL", "WATERMARK_WINDOW"]

#: K: checkpoint period. TOCS'02 §8.1 runs with "checkpoint period K = 128".
CHECKPOINT_INTERVAL = 128
#: L: log size, the distance between low and high watermark. TOCS'02 §8.1: L = 256 (2K).
WATERMARK_WINDOW = 256

#: An idle replica still sends STATUS every this many status intervals, so a
#: replica that fell behind during a partition too short for its connections to
#: drop (no PeerUp to trigger an exchange) learns it within a few seconds.
IDLE_STATUS_EVERY = 8
#: Views back from the current one in which conflicting messages are still kept
#: as evidence: enough to convict a primary whose equivocation surfaces in the
#: PREPAREs relayed during the view change that removes it.
EVIDENCE_VIEWS = 2

#: Body tags decoded before their signature check (see Replica._peek).
_PEEKED = frozenset({Commit.wire_tag, Reply.wire_tag})  # type: ignore[attr-defined]

REQUEST_TIMER = ("pbft", "request")
NEW_VIEW_TIMER = ("pbft", "new-view")
BATCH_TIMER = ("pbft", "batch")
STATUS_TIMER = ("pbft", "status")


@attrs.frozen
class PbftConfig:
    #: Base view-change timeout. BFT-SMaRt's system.totalordermulticast.timeout
    #: default is 2000 ms; it doubles at every view change that fails to
    #: complete (OSDI'99 §4.5.2) and resets once requests execute again.
    view_timeout: float = 2.0
    #: Doublings are capped at 2^6 = 64 x the base (128 s by default), so a long
    #: partition does not leave the federation idle for minutes after it heals.
    max_backoff: int = 6
    #: B: requests per batch (BFT-SMaRt's maxBatchSize default, 100).
    batch_max: int = MAX_BATCH
    #: T: how long the primary holds a partial batch while instances are in
    #: flight. BFT-SMaRt's batchtimeout default is -1 (never wait); we wait at
    #: most 1 ms, a third of the 3 ms unbatched latency target of issue 5.
    batch_wait: float = 0.001
    #: Batches in flight before the primary batches. TOCS'02 §5.1.4: the
    #: primary batches requests that arrive while a bounded window of protocol
    #: instances is running; BFT-SMaRt runs one at a time, and so do we: on the
    #: 2-core test machine (bench, n = 4, 16 commands in flight per node, three
    #: alternating runs each) one instance at a time took 1,000-1,065 us of CPU
    #: per command and committed 970-1,045/s, two took 1,190-1,245 us and
    #: 844-872/s at the same p99: with twice the batches in flight each is half
    #: as large, and the votes, frames and reply signatures are paid per batch.
    #: The batch then holds what arrived while the previous instance ran, so its
    #: size follows the load (up to ``batch_max``).
    pipeline: int = 1
    #: Status period (TOCS'02 §5.2: replicas multicast status periodically so
    #: lost messages are retransmitted); a quarter of the view timeout, so a
    #: lost message is repaired before a backup suspects the primary.
    status_interval: float = 0.5
    checkpoint_interval: int = CHECKPOINT_INTERVAL
    window: int = WATERMARK_WINDOW
    #: How long a client waits for f+1 matching replies (see consensus.pbft.client).
    client_timeout: float = 30.0


class Slot:
    """Agreement state of one sequence number in the current view."""

    __slots__ = ("seq", "pp", "digest", "batch", "prepares", "commits", "prepared", "sent_commit")

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.pp: Signed | None = None
        self.digest: bytes | None = None
        self.batch: bytes | None = None
        self.prepares: dict[str, tuple[bytes, Signed]] = {}
        self.commits: dict[str, tuple[bytes, Signed]] = {}
        self.prepared = False
        self.sent_commit = False


class Replica:
    """One DC's PBFT replica and the ledger it orders (see the module docstring)."""

    def __init__(
        self,
        name: str,
        identity: Identity,
        keys: Mapping[str, PublicKey],
        log: ReplicaLog,
        rng: random.Random,
        config: PbftConfig | None = None,
        operators: OperatorTable | None = None,
    ) -> None:
        self.name = name
        self.identity = identity
        self.q = Quorum.of(keys)
        if name not in self.q.members:
            raise ValueError(f"{name!r} is not a member of the federation")
        self.cfg = config or PbftConfig()
        self.rng = rng
        self.log = log
        self.verifier = Verifier(keys)
        self.evidence = EvidenceBook()
        self.client = LedgerClient(name, identity, self.q, self.cfg.client_timeout, log.store)
        #: who may sign operator requests, for the ledger's checks (the federation file)
        self.operators = operators
        self.genesis = Ledger(self.q.members).state_digest()
        self.ledger = Ledger(self.q.members, operators)
        self.view = 0
        self.active = True
        self.low = 0  # h, the stable checkpoint
        self.stable_proof: tuple[Signed, ...] = ()
        self.stable_snapshot = self.ledger.snapshot()
        self.last_exec = 0
        self.next_seq = 1
        self.slots: dict[int, Slot] = {}
        self.decided: dict[int, Decided] = {}
        self.prepared_certs: dict[int, tuple[int, PreparedCert]] = {}
        self.batches: dict[bytes, bytes] = {NULL_DIGEST: NULL_BATCH}
        #: digest -> the requests of a batch checked at pre-prepare, until it executes
        self.decoded: dict[bytes, tuple[Signed, ...]] = {}
        self.snapshots: dict[int, tuple[bytes, bytes]] = {}
        self.checkpoint_votes: dict[int, dict[str, tuple[bytes, Signed]]] = {}
        #: (client, request id) -> (signed request, arrival time): received, not executed
        self.pending: dict[tuple[str, int], tuple[Signed, float]] = {}
        self._pending_of: dict[str, int] = {}
        self.proposed: dict[tuple[str, int], int] = {}
        self.request_timer = False
        self.nv_timer = False
        self.backoff = 0
        #: when a batch last executed here (see the STATUS timer's relays)
        self.progress_at = 0.0
        self.view_changes: dict[str, ValidViewChange] = {}
        self.new_view_msg: Envelope | None = None
        self.fetching: dict[bytes, float] = {}
        self.transfer_until = 0.0
        self.idle_status_at = 0.0
        #: peer -> the height its last STATUS claimed
        self.ahead: dict[str, int] = {}
        self.served: dict[str, float] = {}
        #: peers whose link the driver reported down (PeerDown, no PeerUp since)
        self.unreachable: dict[str, None] = {}
        #: our own pending requests already relayed to every replica (once each; the
        #: client's retransmission repeats them, see viewchange.relay_own_pending)
        self.relayed: dict[tuple[str, int], None] = {}
        #: pending requests handed to the primary, and in which view (once per view)
        self.forwarded: dict[tuple[str, int], int] = {}
        self.metrics: dict[str, int] = {}
        self._out: list[Action] = []
        execution.recover(self)

    # ------------------------------------------------------------------ plumbing

    @property
    def primary(self) -> str:
        return self.q.primary(self.view)

    @property
    def is_primary(self) -> bool:
        return self.primary == self.name

    @property
    def timeout(self) -> float:
        return self.cfg.view_timeout * (2 ** min(self.backoff, self.cfg.max_backoff))

    def _count(self, metric: str, by: int = 1) -> None:
        self.metrics[metric] = self.metrics.get(metric, 0) + by

    def _emit(self, *actions: Action) -> None:
        self._out.extend(actions)

    def _flush(self) -> list[Action]:
        out, self._out = self._out, []
        return out

    def _others(self) -> list[str]:
        return [m for m in self.q.members if m != self.name]

    def _sign(self, body: object, attachment: bytes = b"") -> Envelope:
        env = seal(self.identity, self.name, body, attachment)
        self.verifier.remember(env.signed, body)
        return env

    def _broadcast(self, env: Envelope) -> None:
        for peer in self._others():
            self._emit(Send(peer, env))

    def _send(self, peer: str, env: Envelope) -> None:
        if peer != self.name:
            self._emit(Send(peer, env))

    def start(self, now: float) -> list[Action]:
        """First timers; call once when the driver starts the core."""
        self._emit(SetTimer(STATUS_TIMER, now + self.cfg.status_interval))
        self._broadcast(self._status())
        viewchange.resume_view_change(self, now)
        return self._flush()

    def status(self) -> dict[str, object]:
        """For /api/status and tests."""
        return {
            "view": self.view,
            "active": self.active,
            "primary": self.primary,
            "last_executed": self.last_exec,
            "stable_checkpoint": self.low,
            "pending": len(self.pending),
            "evidence": self.evidence.summary(),
            "metrics": dict(sorted(self.metrics.items())),
        }

    # ------------------------------------------------------------------ events

    def handle(self, now: float, event: Event) -> list[Action]:
        if isinstance(event, Received):
            self._on_received(now, event)
        elif isinstance(event, TimerFired):
            self._on_timer(now, event.key)
        elif isinstance(event, PeerUp) and event.peer in self.q.members:
            self.unreachable.pop(event.peer, None)
            self._send(event.peer, self._status())
        elif isinstance(event, PeerDown) and event.peer in self.q.members:
            self.unreachable[event.peer] = None
            if event.peer == self.primary and self.active:
                # The primary may be gone: every backup must know our waiting requests
                # for its own timer to run, or the view change lacks 2f+1 voices.
                viewchange.relay_own_pending(self, now, 0.0)
        return self._flush()

    def submit(self, now: float, command: bytes) -> tuple[int, list[Action]]:
        """Submit a ledger command as this DC's client; completion is a
        ``Notify("ledger.committed", {"request_id", "result"})`` (the result is an
        encoded :class:`~consensus.ledger.LedgerResult`) or
        ``Notify("ledger.timeout", {"request_id"})``. Raises
        :class:`~consensus.pbft.client.ClientBusy` with ``CLIENT_WINDOW`` commands in flight."""
        rids, actions = self.submit_many(now, (command,))
        return rids.start, actions

    def submit_many(self, now: float, commands: tuple[bytes, ...]) -> tuple[range, list[Action]]:
        """Submit 1 to ``MAX_REQUEST_COMMANDS`` commands that are ready together as one
        signed REQUEST (one signature, one check of it per replica); each command has
        its own request id (in order) and completes on its own, as with :meth:`submit`."""
        rids, req, env, actions = self.client.submit(now, commands)
        self.verifier.remember(env.signed, req)
        self._emit(*actions)
        # OSDI'99 §4.1: the client sends its request to the primary; the backups get
        # it inside the PRE-PREPARE. They learn of it earlier only if it is stuck:
        # the relay of stale requests (status timer), the relay when the primary's
        # link drops, the client's retransmission to all (consensus.pbft.client), and
        # during a view change, when the primary is in doubt, it goes to all at once.
        if self.active and self.primary not in self.unreachable:
            self._send(self.primary, env)
        else:
            self._broadcast(env)
        self._on_request(now, env.signed, self.name)
        return rids, self._flush()

    def _on_timer(self, now: float, key: object) -> None:
        if key == STATUS_TIMER:
            self._emit(SetTimer(STATUS_TIMER, now + self.cfg.status_interval))
            if self._busy() or now >= self.idle_status_at:
                self.idle_status_at = now + IDLE_STATUS_EVERY * self.cfg.status_interval
                self._broadcast(self._status())
                if now - self.progress_at >= self.timeout / 2:
                    # Relay requests waiting half a view timeout only while execution
                    # stands still: with batches executing, an old request is queued
                    # behind others, not lost or ignored by a faulty primary, and
                    # copies of every request to every replica (n - 1 signature
                    # checks each) are what a loaded federation can least afford:
                    # at n = 16 with 1-2 s commits a node received 576 copies in a
                    # 5 s bench run, 146-203 with this rule (docs/BENCHMARKS.md).
                    viewchange.forward_pending(self, now, self.timeout / 2)
                    viewchange.relay_own_pending(self, now, self.timeout / 2)
            execution.retry_fetches(self, now)
        elif key == REQUEST_TIMER:
            self.request_timer = False
            if self.pending and self.active:
                self._count("request_timeouts")
                viewchange.start_view_change(self, now, self.view + 1)
        elif key == NEW_VIEW_TIMER:
            viewchange.on_new_view_timeout(self, now)
        elif key == BATCH_TIMER:
            self._maybe_propose(now, waited=True)
        elif isinstance(key, tuple) and key and key[0] == "ledger-client":
            self._emit(*self.client.on_timer(now, key, self._others() + [self.name]))
            if self.client.resend:
                for env in self.client.take_resend():
                    self._broadcast(env)
                    self._on_request(now, env.signed, self.name)

    def _on_received(self, now: float, ev: Received) -> None:
        env = ev.message
        if not isinstance(env, Envelope):
            try:
                env = wire.decode(ev.raw, expect=(Envelope,))
            except wire.WireError:
                self.evidence.count_malformed(ev.peer)
                self._count("malformed")
                return
        early = self._peek(env)
        if early is not None and self._surplus(early):
            self._count("surplus_unverified")
            return
        try:
            body = self.verifier.open(env.signed, decoded=early)
        except SignatureError as exc:
            if exc.kind == "malformed":
                self.evidence.count_malformed(ev.peer)
                self._count("malformed")
            else:
                self.evidence.count_invalid_signature(ev.peer)
                self._count("invalid_signatures")
            return
        self._dispatch(now, ev.peer, env, body)

    @staticmethod
    def _peek(env: Envelope) -> object | None:
        """The body of a COMMIT or REPLY, decoded before its signature is checked (the
        decoder is strict and safe on any bytes), so that :meth:`_surplus` can skip the
        check of one that is of no use; None for other types or on any doubt."""
        if wire.peek_tag(env.body) not in _PEEKED:
            return None
        try:
            return wire.decode(env.body, expect=(Commit, Reply))
        except wire.WireError:
            return None  # the normal path checks and counts it

    def _surplus(self, body: object) -> bool:
        """A COMMIT for a sequence number already decided, or a REPLY our client no longer
        waits for: the quorum it could join is complete (2f+1 commits, f+1 replies),
        so it changes nothing and its signature need not be checked (nor is it kept as
        evidence: equivocation is caught in the PRE-PREPAREs, relayed in PREPAREs, and
        in the votes that are counted). At n = 16 this skips 5 of 15 COMMITs and 10 of
        15 REPLYs per batch."""
        if isinstance(body, Commit):
            return body.seq <= self.last_exec or body.seq in self.decided
        if isinstance(body, Reply):
            if body.client != self.name:
                return False  # misaddressed: checked and ignored as before
            return not any(r.request_id in self.client.outstanding for r in body.results)
        return False

    def _dispatch(self, now: float, peer: str, env: Envelope, body: object) -> None:
        if isinstance(body, Request):
            self._on_request(now, env.signed, peer)
        elif isinstance(body, Reply):
            self._emit(*self.client.on_reply(now, env.sender, body))
        elif isinstance(body, PrePrepare):
            self._on_preprepare(now, env, body)
        elif isinstance(body, Prepare):
            self._on_prepare(now, env, body)
        elif isinstance(body, Commit):
            self._on_commit(now, env.signed, body)
        elif isinstance(body, Checkpoint):
            execution.on_checkpoint(self, now, env.signed, body)
        elif isinstance(body, ViewChange):
            viewchange.on_view_change(self, now, env.signed)
        elif isinstance(body, NewView):
            viewchange.on_new_view(self, now, env, body)
        elif isinstance(body, Status):
            transfer.on_status(self, now, env.sender, body)
        elif isinstance(body, StateRequest):
            transfer.on_state_request(self, now, env.sender, body)
        elif isinstance(body, StateReply):
            transfer.on_state_reply(self, now, env, body)
        elif isinstance(body, FetchBatch):
            execution.on_fetch_batch(self, env.sender, body)
        elif isinstance(body, BatchData):
            execution.on_batch_data(self, now, env, body)

    def _observe(self, now: float, signed: Signed, body: object) -> None:
        """Keep slotted messages as potential evidence, only within the watermark
        window and the last few views, so a faulty peer cannot grow the book."""
        view = getattr(body, "view", self.view)
        seq = getattr(body, "seq", 0)
        if not (self._in_window(seq) and self.view - EVIDENCE_VIEWS <= view <= self.view):
            return
        proof = self.evidence.observe(signed, body)
        if proof is None:
            return
        self._count("equivocation_proofs")
        self._emit(Notify("pbft.byzantine", {"dc": proof.dc, "proof": proof}))
        if proof.dc == self.primary and self.active:
            viewchange.start_view_change(self, now, self.view + 1)

    # ------------------------------------------------------------------ requests

    def _on_request(self, now: float, signed: Signed, peer: str) -> None:
        try:
            req = self.verifier.open(signed, (Request,))
        except SignatureError:
            self.evidence.count_malformed(peer)
            return
        assert isinstance(req, Request)
        try:
            ids = request_ids(req)
        except SignatureError:
            ids = range(0)
        if req.client != signed.sender or not ids:
            self.evidence.count_malformed(peer)
            return
        key = (req.client, req.request_id)
        if self.ledger.executed_result(*key) is not None:
            # Its commands executed together, in one batch: answer with their results.
            done = [Result(rid, res) for rid in ids
                    if (res := self.ledger.executed_result(req.client, rid)) is not None]
            self._send(req.client, self._sign(Reply(self.view, req.client, tuple(done))))
            return
        if key in self.pending:
            return
        if self._pending_of.get(req.client, 0) >= CLIENT_WINDOW:
            self._count("requests_dropped_client_window")
            return
        self._add_pending(key, signed, now)
        self._arm_request_timer(now)
        self._maybe_propose(now)

    def _add_pending(self, key: tuple[str, int], signed: Signed, now: float) -> None:
        self.pending[key] = (signed, now)
        self._pending_of[key[0]] = self._pending_of.get(key[0], 0) + 1

    def _drop_pending(self, key: tuple[str, int]) -> None:
        self.relayed.pop(key, None)
        self.forwarded.pop(key, None)
        if self.pending.pop(key, None) is not None:
            left = self._pending_of[key[0]] - 1
            if left:
                self._pending_of[key[0]] = left
            else:
                del self._pending_of[key[0]]

    def _arm_request_timer(self, now: float, restart: bool = False) -> None:
        if not self.pending or not self.active:
            if self.request_timer:
                self._emit(CancelTimer(REQUEST_TIMER))
                self.request_timer = False
            return
        if restart or not self.request_timer:
            self._emit(SetTimer(REQUEST_TIMER, now + self.timeout))
            self.request_timer = True

    def _in_flight(self) -> int:
        return max(0, self.next_seq - 1 - self.last_exec)

    def _maybe_propose(self, now: float, waited: bool = False) -> None:
        """Propose while the pipeline has room: at once when nothing is in flight or a
        batch is full, else when the oldest request has waited ``batch_wait``.
        ``waited``: the batch timer fired, so the wait is over whatever ``now`` says
        (comparing clock readings again could re-arm a timer that is already due, and
        loop, when the driver's clock is shifted or rounds)."""
        if not (self.active and self.is_primary):
            return
        while True:
            # Full pipeline or window: nothing to do until a batch executes (execute_ready
            # proposes again), so the waiting requests are not even listed: this runs
            # for every request that arrives, and listing them all each time was
            # quadratic in the requests waiting.
            if self.next_seq > self.low + self.cfg.window:
                return
            inflight = self._in_flight()
            if inflight >= self.cfg.pipeline:
                return
            unproposed = (k for k in self.pending if k not in self.proposed)
            queue = list(itertools.islice(unproposed, self.cfg.batch_max))
            if not queue:
                self._emit(CancelTimer(BATCH_TIMER))
                return
            oldest = self.pending[queue[0]][1]
            due = oldest + self.cfg.batch_wait
            if inflight and len(queue) < self.cfg.batch_max and not waited and now < due:
                self._emit(SetTimer(BATCH_TIMER, due))
                return
            self._propose(now, tuple(self.pending[k][0] for k in queue))
            for k in queue:
                self.proposed[k] = self.next_seq - 1

    def _propose(self, now: float, requests: tuple[Signed, ...]) -> None:
        seq = self.next_seq
        self.next_seq += 1
        data = batch_bytes(requests)
        self.decoded[digest(data)] = requests
        env = self._sign(PrePrepare(self.view, seq, digest(data)), data)
        self._count("batches_proposed")
        self._accept_preprepare(now, env, PrePrepare(self.view, seq, digest(data)), data)

    # ------------------------------------------------------------------ normal case

    def _in_window(self, seq: int) -> bool:
        return self.low < seq <= self.low + self.cfg.window

    def _slot(self, seq: int) -> Slot:
        slot = self.slots.get(seq)
        if slot is None:
            slot = self.slots[seq] = Slot(seq)
        return slot

    def _batch_ok(self, data: bytes, peer: str) -> bool:
        """Every request in a proposed batch is signed by the client it names."""
        try:
            batch = wire.decode(data, expect=(Batch,))
            for s in batch.requests:
                req = self.verifier.open(s, (Request,))
                assert isinstance(req, Request)
                request_ids(req)
                if req.client != s.sender:
                    raise SignatureError("request signed by another DC", "malformed")
        except (wire.WireError, SignatureError):
            self.evidence.count_malformed(peer)
            self._count("bad_batches")
            return False
        self.decoded[digest(data)] = batch.requests  # execution need not decode it again
        return True

    def _on_preprepare(self, now: float, env: Envelope, pp: PrePrepare) -> None:
        if env.sender != self.q.primary(pp.view):
            self.evidence.count_malformed(env.sender)
            return
        self._observe(now, env.signed, pp)
        if not (self.active and pp.view == self.view and self._in_window(pp.seq)):
            return
        if pp.seq <= self.last_exec and pp.seq in self.decided:
            return
        slot = self.slots.get(pp.seq)
        if slot is not None and slot.pp is not None:
            return  # duplicate, or a conflict already kept as evidence
        data = env.attachment or self.batches.get(pp.digest)
        if data is None or digest(data) != pp.digest or not self._batch_ok(data, env.sender):
            return
        self._accept_preprepare(now, env, pp, data)

    def _accept_preprepare(
        self, now: float, env: Envelope, pp: PrePrepare, data: bytes | None, announce: bool = True
    ) -> None:
        """Log the pre-prepare (durably, before our PREPARE goes out) and vote."""
        slot = self._slot(pp.seq)
        slot.pp, slot.digest, slot.batch = env.signed, pp.digest, data
        if data is not None:
            self.batches[pp.digest] = data
        else:
            execution.fetch(self, now, pp.digest)
        self._emit(ReplicaLog.slot_action(SlotRecord(pp.seq, env.signed, data or b"", (), ())))
        if env.sender == self.name:
            if announce:
                self._broadcast(env)
        else:
            vote = self._sign(Prepare(pp.view, pp.seq, pp.digest), relay(env))
            self._broadcast(vote)
            slot.prepares[self.name] = (pp.digest, vote.signed)
        self._check_prepared(now, slot)

    def _on_prepare(self, now: float, env: Envelope, p: Prepare) -> None:
        self._observe(now, env.signed, p)
        if env.attachment:
            self._observe_relayed(now, env.attachment)
        if not (self.active and p.view == self.view and self._in_window(p.seq)):
            return
        if env.sender == self.q.primary(p.view):
            return
        slot = self._slot(p.seq)
        if env.sender not in slot.prepares:
            slot.prepares[env.sender] = (p.digest, env.signed)
            self._check_prepared(now, slot)

    def _observe_relayed(self, now: float, data: bytes) -> None:
        """A PREPARE carries the primary's signed PRE-PREPARE it answers, so an
        equivocating primary is convicted by the backups' relays."""
        try:
            inner = wire.decode(data, expect=(Envelope,))
            pp = self.verifier.open(inner.signed, (PrePrepare,))
        except (wire.WireError, SignatureError):
            return
        assert isinstance(pp, PrePrepare)
        if inner.sender == self.q.primary(pp.view) and self._in_window(pp.seq):
            self._observe(now, inner.signed, pp)

    def _on_commit(self, now: float, signed: Signed, c: Commit) -> None:
        self._observe(now, signed, c)
        if not (self.active and c.view == self.view and self._in_window(c.seq)):
            return
        slot = self._slot(c.seq)
        if signed.sender not in slot.commits:
            slot.commits[signed.sender] = (c.digest, signed)
            self._check_committed(now, slot)

    def _check_prepared(self, now: float, slot: Slot) -> None:
        if slot.pp is None or slot.prepared:
            return
        good = [s for d, s in slot.prepares.values() if d == slot.digest]
        if len(good) < 2 * self.q.f:
            return
        slot.prepared = True
        cert = PreparedCert(slot.pp, tuple(good[: 2 * self.q.f]))
        self.prepared_certs[slot.seq] = (self.view, cert)
        record = SlotRecord(slot.seq, slot.pp, slot.batch or b"", cert.prepares, ())
        self._emit(ReplicaLog.slot_action(record))
        assert slot.digest is not None
        vote = self._sign(Commit(self.view, slot.seq, slot.digest))
        self._broadcast(vote)
        slot.sent_commit = True
        slot.commits[self.name] = (slot.digest, vote.signed)
        self._check_committed(now, slot)

    def _check_committed(self, now: float, slot: Slot) -> None:
        if not slot.prepared or slot.seq in self.decided:
            return
        good = tuple(s for d, s in slot.commits.values() if d == slot.digest)
        if len(good) < 2 * self.q.f + 1:
            return
        assert slot.digest is not None and slot.pp is not None
        self._decide(now, slot.seq, slot.digest, good[: 2 * self.q.f + 1], slot.batch, slot.pp)

    def _decide(
        self,
        now: float,
        seq: int,
        dig: bytes,
        commits: tuple[Signed, ...],
        batch: bytes | None,
        pp: Signed | None,
    ) -> None:
        self.decided[seq] = Decided(dig, commits, batch)
        # Not synced: a decision lost in a crash comes back from the peers (state
        # transfer with the commit certificate), and re-executing it is deterministic.
        record = SlotRecord(seq, pp, batch or b"", (), commits)
        self._emit(attrs.evolve(ReplicaLog.slot_action(record), sync=False))
        if batch is None:
            execution.fetch(self, now, dig)
        execution.execute_ready(self, now)

    # ------------------------------------------------------------------ status

    def _busy(self) -> bool:
        """Whether a STATUS is due every interval: requests wait, a view change runs,
        or sequence numbers are in progress. An idle federation sends one every
        ``IDLE_STATUS_EVERY`` intervals; peers answer a STATUS that shows its sender
        behind with their own, so the sender learns what it misses."""
        return bool(self.pending or not self.active or self.fetching or self._in_flight()
                    or any(s > self.last_exec for s in self.slots))

    def _status(self) -> Envelope:
        return self._sign(Status(self.view, self.active, self.last_exec, self.low))

    def status_record(self) -> ReplicaStatus:
        """What this replica reports to status pages and metrics (read-only)."""
        return ReplicaStatus(
            view=self.view, active=self.active, primary=self.primary,
            last_executed=self.last_exec, stable_checkpoint=self.low,
            members=self.q.members, f=self.q.f, evidence=self.evidence.summary(),
            view_changes_started=self.metrics.get("view_changes_started", 0),
            view_changes_completed=self.metrics.get("view_changes_completed", 0))

def relay(env: Envelope) -> bytes:
    """A signed message without its attachment, as bytes to attach to another one."""
    return wire.encode(Envelope(env.sender, env.body, env.sig))
