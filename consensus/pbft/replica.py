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
The phases live in their own modules, each a set of functions over the
replica's :class:`~consensus.pbft.state.ReplicaState` and its
:class:`~consensus.pbft.outbox.Outbox` (none imports this module):
requests and the primary's batches (:mod:`consensus.pbft.ordering`), the
normal case (§4.2, :mod:`consensus.pbft.agreement`), execution
(:mod:`consensus.pbft.execution`), checkpoints (§4.3,
:mod:`consensus.pbft.checkpoint`), view change (§4.4,
:mod:`consensus.pbft.viewchange`), STATUS and retransmission (TOCS'02 §5.2,
:mod:`consensus.pbft.status`), state transfer (TOCS'02 §6.2,
:mod:`consensus.pbft.transfer`) and crash recovery (TOCS'02 §4.3,
:mod:`consensus.pbft.recovery`). This module routes events to them and keeps
what spans them: the timers, the evidence watch, and what follows progress.

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
:class:`~consensus.pbft.evidence.EquivocationProof`), ``pbft.invalid-new-view``,
``pbft.divergence``, ``pbft.batch-time-refused`` (a PRE-PREPARE whose batch time
this replica did not accept, :mod:`consensus.pbft.batch_time`). :meth:`Replica.status`
is for ``/api/status``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence

from consensus.authz import OperatorTable
from consensus.ledger import Ledger
from consensus.pbft import (
    agreement,
    batch_time,
    checkpoint,
    execution,
    ordering,
    recovery,
    status,
    transfer,
    viewchange,
)
from consensus.pbft.client import LedgerClient
from consensus.pbft.durable import SLOT_RING, ReplicaLog
from consensus.pbft.evidence import EvidenceBook
from consensus.pbft.messages import (
    BatchData,
    Checkpoint,
    Commit,
    Envelope,
    FetchBatch,
    NewView,
    Prepare,
    PrePrepare,
    Reply,
    Request,
    SignatureError,
    Signed,
    SnapshotChunk,
    SnapshotFetch,
    SnapshotManifest,
    StateReply,
    StateRequest,
    Status,
    Verifier,
    ViewChange,
)
from consensus.pbft.outbox import Outbox
from consensus.pbft.quorum import Quorum
from consensus.pbft.replica_status import ReplicaStatus
from consensus.pbft.state import (
    BATCH_TIMER,
    CHECKPOINT_INTERVAL,
    NEW_VIEW_TIMER,
    REQUEST_TIMER,
    STATUS_TIMER,
    WATERMARK_WINDOW,
    PbftConfig,
    ReplicaState,
)
from mesh import wire
from mesh.core import Action, Event, Offloaded, PeerDown, PeerUp, Received, TimerFired
from mesh.identity import Identity, PublicKey

__all__ = ["PbftConfig", "Replica", "CHECKPOINT_INTERVAL", "WATERMARK_WINDOW"]

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
        wall: Callable[[float], float] | None = None,
        previous_keys: Mapping[str, Sequence[PublicKey]] | None = None,
    ) -> None:
        """``wall`` maps the driver's ``now`` to wall-clock seconds since the epoch, for
        the times the primary stamps on batches (:mod:`consensus.pbft.batch_time`); by
        default ``now`` is wall time (the simulator's clocks)."""
        q = Quorum.of(keys)
        if name not in q.members:
            raise ValueError(f"{name!r} is not a member of the federation")
        cfg = config or PbftConfig()
        if not 0 < cfg.window <= SLOT_RING:
            raise ValueError(f"PbftConfig.window {cfg.window}: the durable log holds "
                             f"1..{SLOT_RING} sequence numbers above its checkpoint")
        verifier = Verifier(keys, previous_keys)
        client = LedgerClient(name, identity, q, cfg.client_timeout, log.store)
        self.state = ReplicaState(name, q, verifier, log, client, rng, cfg, operators, wall)
        self._out = Outbox(name, identity, q.members, verifier)
        recovery.recover(self.state, self._out)

    # ------------------------------------------------------------------ read-only view

    @property
    def name(self) -> str:
        return self.state.name

    @property
    def q(self) -> Quorum:
        return self.state.q

    @property
    def ledger(self) -> Ledger:
        return self.state.ledger

    @property
    def client(self) -> LedgerClient:
        return self.state.client

    @property
    def evidence(self) -> EvidenceBook:
        return self.state.evidence

    @property
    def metrics(self) -> dict[str, int]:
        return self.state.metrics

    @property
    def view(self) -> int:
        return self.state.view

    @property
    def active(self) -> bool:
        return self.state.active

    @property
    def primary(self) -> str:
        return self.state.primary

    @property
    def last_exec(self) -> int:
        return self.state.last_exec

    @property
    def low(self) -> int:
        """The stable checkpoint."""
        return self.state.low

    @property
    def pending(self) -> Mapping[tuple[str, int], tuple[Signed, float]]:
        """Requests received and not executed yet, by (client, request id)."""
        return self.state.pending

    def status(self) -> dict[str, object]:
        """For /api/status and tests."""
        st = self.state
        return {
            "view": st.view,
            "active": st.active,
            "primary": st.primary,
            "last_executed": st.last_exec,
            "stable_checkpoint": st.low,
            "pending": len(st.pending),
            "evidence": st.evidence.summary(),
            "metrics": dict(sorted(st.metrics.items())),
        }

    def status_record(self) -> ReplicaStatus:
        """What this replica reports to status pages and metrics (read-only)."""
        st = self.state
        return ReplicaStatus(
            view=st.view, active=st.active, primary=st.primary,
            last_executed=st.last_exec, stable_checkpoint=st.low,
            members=st.q.members, f=st.q.f, evidence=st.evidence.summary(),
            view_changes_started=st.metrics.get("view_changes_started", 0),
            view_changes_completed=st.metrics.get("view_changes_completed", 0))

    # ------------------------------------------------------------------ driving

    def start(self, now: float) -> list[Action]:
        """First timers; call once when the driver starts the core. After a restart it
        also reports what recovery executed again and sends what it restored: our
        checkpoints, our messages for the sequence numbers in progress, or our
        VIEW-CHANGE if a view change was under way."""
        st, out = self.state, self._out
        out.set_timer(STATUS_TIMER, now + st.cfg.status_interval)
        out.broadcast(status.status_message(st, out))
        if st.active:
            for peer in st.others():
                status.retransmit_slots(st, out, peer)
        viewchange.resume_view_change(st, out, now)
        return self._finish(now)

    def handle(self, now: float, event: Event) -> list[Action]:
        st, out = self.state, self._out
        if isinstance(event, Received):
            self._on_received(now, event)
        elif isinstance(event, TimerFired):
            self._on_timer(now, event.key)
        elif isinstance(event, PeerUp) and event.peer in st.q.members:
            st.unreachable.pop(event.peer, None)
            out.send(event.peer, status.status_message(st, out))
        elif isinstance(event, Offloaded):
            transfer.on_restored(st, out, now, event)
        elif isinstance(event, PeerDown) and event.peer in st.q.members:
            st.unreachable[event.peer] = None
            if event.peer == st.primary and st.active:
                # The primary may be gone: every backup must know our waiting requests
                # for its own timer to run, or the view change lacks 2f+1 voices.
                ordering.relay_own_pending(st, out, now, 0.0)
        return self._finish(now)

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
        st, out = self.state, self._out
        rids, req, env, actions = st.client.submit(now, commands)
        st.verifier.remember(env.signed, req)
        out.extend(actions)
        # OSDI'99 §4.1: the client sends its request to the primary; the backups get
        # it inside the PRE-PREPARE. They learn of it earlier only if it is stuck:
        # the relay of stale requests (status timer), the relay when the primary's
        # link drops, the client's retransmission to all (consensus.pbft.client), and
        # during a view change, when the primary is in doubt, it goes to all at once.
        if st.active and st.primary not in st.unreachable:
            out.send(st.primary, env)
        else:
            out.broadcast(env)
        ordering.on_request(st, out, now, env.signed, st.name)
        return rids, self._finish(now)

    def _finish(self, now: float) -> list[Action]:
        """End of a step: once batches executed, the request timer starts over and the
        primary proposes again (execution reports it; proposing may execute more)."""
        st, out = self.state, self._out
        while st.progressed:
            st.progressed = False
            ordering.arm_request_timer(st, out, now, restart=True)
            ordering.maybe_propose(st, out, now)
        return out.flush()

    # ------------------------------------------------------------------ timers

    def _on_timer(self, now: float, key: object) -> None:
        st, out = self.state, self._out
        if key == STATUS_TIMER:
            out.set_timer(STATUS_TIMER, now + st.cfg.status_interval)
            if status.busy(st) or now >= st.idle_status_at:
                st.idle_status_at = now + IDLE_STATUS_EVERY * st.cfg.status_interval
                out.broadcast(status.status_message(st, out))
                if now - st.progress_at >= st.timeout / 2:
                    # Relay requests waiting half a view timeout only while execution
                    # stands still: with batches executing, an old request is queued
                    # behind others, not lost or ignored by a faulty primary, and
                    # copies of every request to every replica (n - 1 signature
                    # checks each) are what a loaded federation can least afford:
                    # at n = 16 with 1-2 s commits a node received 576 copies in a
                    # 5 s bench run, 146-203 with this rule (docs/BENCHMARKS.md).
                    ordering.forward_pending(st, out, now, st.timeout / 2)
                    ordering.relay_own_pending(st, out, now, st.timeout / 2)
            execution.retry_fetches(st, out)
        elif key == REQUEST_TIMER:
            st.request_timer = False
            if st.pending and st.active:
                st.count("request_timeouts")
                viewchange.start_view_change(st, out, now, st.view + 1)
        elif key == NEW_VIEW_TIMER:
            viewchange.on_new_view_timeout(st, out, now)
        elif key == BATCH_TIMER:
            ordering.maybe_propose(st, out, now, waited=True)
        elif isinstance(key, tuple) and key and key[0] == "ledger-client":
            out.extend(st.client.on_timer(now, key, st.others() + [st.name]))
            if st.client.resend:
                for env in st.client.take_resend():
                    out.broadcast(env)
                    ordering.on_request(st, out, now, env.signed, st.name)

    # ------------------------------------------------------------------ messages

    def _on_received(self, now: float, ev: Received) -> None:
        st = self.state
        env = ev.message
        if not isinstance(env, Envelope):
            try:
                env = wire.decode(ev.raw, expect=(Envelope,))
            except wire.WireError:
                st.evidence.count_malformed(ev.peer)
                st.count("malformed")
                return
        early = self._peek(env)
        if early is not None and self._surplus(early):
            st.count("surplus_unverified")
            return
        try:
            body = st.verifier.open(env.signed, decoded=early)
        except SignatureError as exc:
            if exc.kind == "malformed":
                st.evidence.count_malformed(ev.peer)
                st.count("malformed")
            else:
                st.evidence.count_invalid_signature(ev.peer)
                st.count("invalid_signatures")
            return
        if self._watch(now, env, body):
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
        st = self.state
        if isinstance(body, Commit):
            return body.seq <= st.last_exec or body.seq in st.decided
        if isinstance(body, Reply):
            if body.client != st.name:
                return False  # misaddressed: checked and ignored as before
            return not any(r.request_id in st.client.outstanding for r in body.results)
        return False

    def _dispatch(self, now: float, peer: str, env: Envelope, body: object) -> None:
        st, out = self.state, self._out
        if isinstance(body, Request):
            ordering.on_request(st, out, now, env.signed, peer)
        elif isinstance(body, Reply):
            out.extend(st.client.on_reply(now, env.sender, body))
        elif isinstance(body, PrePrepare):
            refused = agreement.on_preprepare(st, out, now, env, body)
            if refused is not None:
                self._refuse_batch_time(now, body, refused)
        elif isinstance(body, Prepare):
            agreement.on_prepare(st, out, now, env, body)
        elif isinstance(body, Commit):
            agreement.on_commit(st, out, now, env.signed, body)
        elif isinstance(body, Checkpoint):
            checkpoint.on_checkpoint(st, out, now, env.signed, body)
        elif isinstance(body, ViewChange):
            viewchange.on_view_change(st, out, now, env.signed)
        elif isinstance(body, NewView):
            viewchange.on_new_view(st, out, now, env, body)
        elif isinstance(body, Status):
            status.on_status(st, out, now, env.sender, body)
        elif isinstance(body, StateRequest):
            transfer.on_state_request(st, out, now, env.sender, body)
        elif isinstance(body, StateReply):
            transfer.on_state_reply(st, out, now, env, body)
        elif isinstance(body, SnapshotManifest):
            transfer.on_snapshot_manifest(st, out, now, env, body)
        elif isinstance(body, SnapshotFetch):
            transfer.on_snapshot_fetch(st, out, now, env.sender, body)
        elif isinstance(body, SnapshotChunk):
            transfer.on_snapshot_chunk(st, out, now, env, body)
        elif isinstance(body, FetchBatch):
            execution.on_fetch_batch(st, out, env.sender, body)
        elif isinstance(body, BatchData):
            execution.on_batch_data(st, out, now, env, body)

    def _refuse_batch_time(self, now: float, pp: PrePrepare,
                           refused: agreement.TimeRefused) -> None:
        """The primary stamped a batch with a time we cannot accept
        (:mod:`consensus.pbft.batch_time`): no PREPARE; its requests become ours to
        watch, and a time ahead of our clock (which no delay explains) suspects the
        primary at once."""
        st, out = self.state, self._out
        st.count(f"batch_time_{refused.kind}")
        out.notify("pbft.batch-time-refused", {
            "view": pp.view, "seq": pp.seq, "kind": refused.kind,
            "time_us": refused.batch.time_us, "wall_us": int(st.wall(now) * batch_time.US)})
        ordering.adopt_requests(st, out, now, refused.batch.requests)
        if refused.kind == "ahead":
            viewchange.start_view_change(st, out, now, st.view + 1)

    # ------------------------------------------------------------------ evidence

    def _watch(self, now: float, env: Envelope, body: object) -> bool:
        """Keep every slotted message (and the PRE-PREPARE a PREPARE relays) as potential
        evidence before a phase sees it; False: the message is refused outright (a
        PRE-PREPARE not signed by its view's primary)."""
        st = self.state
        if isinstance(body, PrePrepare):
            if env.sender != st.q.primary(body.view):
                st.evidence.count_malformed(env.sender)
                return False
            self._observe(now, env.signed, body)
        elif isinstance(body, Prepare):
            self._observe(now, env.signed, body)
            if env.attachment:
                self._observe_relayed(now, env.attachment)
        elif isinstance(body, Commit):
            self._observe(now, env.signed, body)
        elif isinstance(body, Checkpoint):
            if not body.seq % st.cfg.checkpoint_interval and st.in_window(body.seq):
                self._observe(now, env.signed, body)
        return True

    def _observe(self, now: float, signed: Signed, body: object) -> None:
        """Keep slotted messages as potential evidence, only within the watermark
        window and the last few views, so a faulty peer cannot grow the book. A proof
        against the primary starts a view change at once."""
        st, out = self.state, self._out
        view = getattr(body, "view", st.view)
        seq = getattr(body, "seq", 0)
        if not (st.in_window(seq) and st.view - EVIDENCE_VIEWS <= view <= st.view):
            return
        proof = st.evidence.observe(signed, body)
        if proof is None:
            return
        st.count("equivocation_proofs")
        out.notify("pbft.byzantine", {"dc": proof.dc, "proof": proof})
        if proof.dc == st.primary and st.active:
            viewchange.start_view_change(st, out, now, st.view + 1)

    def _observe_relayed(self, now: float, data: bytes) -> None:
        """A PREPARE carries the primary's signed PRE-PREPARE it answers, so an
        equivocating primary is convicted by the backups' relays."""
        st = self.state
        try:
            inner = wire.decode(data, expect=(Envelope,))
            pp = st.verifier.open(inner.signed, (PrePrepare,))
        except (wire.WireError, SignatureError):
            return
        assert isinstance(pp, PrePrepare)
        if inner.sender == st.q.primary(pp.view) and st.in_window(pp.seq):
            self._observe(now, inner.signed, pp)
