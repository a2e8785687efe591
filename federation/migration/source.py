"""The source side of a migration: it drives (see :mod:`federation.migration.vocabulary`).

PLANNED: the begin is submitted, carrying the operator's signed request for the
migration (the ledger takes a begin only from the VM's owner, on an operator's
request). BEGUN: the ledger recorded it; the offer is
re-sent until the target answers ready. PRECOPY: round 1 sends the diff
against the target's store, round k the pages dirtied while round k-1 ran.
After each round :func:`federation.migration.precopy.decide` says whether to fence
now (the final round's estimate fits the downtime limit — QEMU's rule; the round
cap; a round that did not shrink the dirty pages with the throttle at its top) or
to send another round, with the guest throttled as hard as the measured link and
dirty rate need (auto-converge, a :class:`Throttle` action). FENCED: the VM is stopped (the fence is
persisted *before* it is requested, so a crash never forgets it). FINAL: the
root of the fenced images is announced in the ledger (the target may commit
only with it) while the remaining dirty pages go; then VERIFYING: the root is
sent to the target and the source waits for the ledger. A target that gives up
asks the source to abort (MigrationDecline). Only a ledger abort un-fences; a
ledger commit retires the source copy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import attrs

from consensus.authz import Authorization
from consensus.ledger import AbortMigration, AnnounceRoot, BeginMigration, SetPolicy
from federation.migration.precopy import (
    MAXIMUM,
    decide,
    final_estimate,
    first_round_throttle,
    page_cost,
)
from federation.migration.rollout import choose_version, round_version
from federation.migration.session import SessionBase
from federation.migration.stop_costs import (
    START_PRIOR,
    StopCosts,
    StopEstimate,
    final_round_costs,
)
from federation.migration.vocabulary import (
    FENCE_SLACK,
    PEER_DOWN_GRACE,
    RETRANSMIT,
    STALL_TIMEOUT,
    VERIFY_RATE,
    ActionFailed,
    CancelRequested,
    CancelRound,
    Fence,
    ImageSize,
    LedgerAborted,
    LedgerBegun,
    LedgerCommitted,
    LedgerRefused,
    LedgerRootAnnounced,
    MigrationDecline,
    MigrationError,
    MigrationOffer,
    MigrationReady,
    MigrationRoundDone,
    Phase,
    PolicyChanged,
    PrecopyLimits,
    Retire,
    Role,
    RoundSent,
    SendRound,
    SourceFenced,
    Throttle,
    Throttled,
    TransferProgress,
    Unfence,
    abort_cause,
)
from federation.migration.vocabulary import (
    MigrationAction as Action,
)
from mesh.core import Notify, Received, Send, TimerFired
from mesh.hde.image import PAGE_SIZE

__all__ = ["SourceSession"]

#: Phases in which a round may be in flight (an abort cancels it).
_SENDING = (Phase.PRECOPY, Phase.FINAL)
#: Phases from which the source may still decide to abort.
_ABORTABLE = (Phase.BEGUN, Phase.PRECOPY, Phase.FENCED, Phase.FINAL, Phase.VERIFYING)


class SourceSession(SessionBase):
    role = Role.SOURCE

    def __init__(self, *args: object, policy: SetPolicy,
                 regions: Mapping[str, str] | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.policy = policy
        #: the VM's machine spec the offer carries (not persisted: a source restored
        #: before its offer was answered aborts, federation.migration.restore)
        self.machine = b""
        #: DC -> region, from the federation file (the policy's region targets)
        self.regions = dict(regions or {})
        # The round policy's state (federation.migration.precopy); not persisted: a node
        # restarted mid-way runs its guest unthrottled and measures again.
        #: the pages each round left dirty
        self.dirty_history: list[int] = []
        #: the link's seconds per page, as the last round that moved pages measured
        self.page_cost = 0.0
        #: the seconds an incremental round spends beside moving pages
        self.overhead = 0.0
        #: the throttle asked of the backend (percent), and whether it can go higher
        self.throttle = 0
        self.can_throttle = True
        #: bytes per second of the link to the target as the mesh measured it when the
        #: migration was planned (0: unknown): what round 1's dirty sample is judged by
        self.link_Bps = 0.0
        #: round 1's dirty sample (pages, seconds, the projected preparation) until it is
        #: judged, and the last (time, wire bytes) of round 1's progress while it waits
        #: for the link's pace
        self._sample: tuple[int, float, float] | None = None
        self._wire_seen: tuple[float, int] | None = None
        #: the stop window's fixed part reserved out of the downtime limit, the final
        #: round's bias, and the throttle's ceiling (federation.migration.precopy.decide;
        #: given by the node from what it measured before, :meth:`use_stop_estimate`)
        self.reserve = 0.0
        self.bias = 1.0
        self.ceiling = MAXIMUM
        #: which of the reserve's figures were measured (the rest: the prior)
        self.reserve_measured: tuple[str, ...] = ()
        #: this migration's own stop window, measured as it goes: when the fence was asked
        #: and took, the cost a page the fence was judged at, when the final round ended,
        #: and the whole once the ledger committed (:class:`StopCosts`; the node keeps it
        #: for the VM's next migration from here)
        self._fence_asked: float | None = None
        self._fence_s: float | None = None
        self._fence_cost = 0.0
        self._final: tuple[float | None, float | None, float] | None = None
        self.stop_costs: StopCosts | None = None

    @classmethod
    def plan(
        cls,
        me: str,
        migration_id: str,
        vm: str,
        target: str,
        epoch: int,
        layout: Sequence[tuple[str, int]],
        limits: PrecopyLimits,
        policy: SetPolicy,
        local_versions: Sequence[int],
        peer_versions: Sequence[int],
        authorization: Authorization,
        machine: bytes = b"",
        downtime_limit: float | None = None,
        regions: Mapping[str, str] | None = None,
    ) -> SourceSession:
        """A new migration of ``vm`` (owned here at ``epoch``) to ``target``, on the
        operator's signed request ``authorization``. Raises
        :class:`federation.migration.rollout.RolloutError` when the DCs share no version."""
        if target == me:
            raise MigrationError(f"VM {vm!r}: the target {target!r} is this DC")
        if not layout:
            raise MigrationError(f"VM {vm!r}: no images to migrate")
        version = choose_version(policy, vm, me, target, local_versions, peer_versions,
                                 regions)
        if downtime_limit is not None:
            # a running guest's own limit (the qemu backend: QEMU's 300 ms downtime-limit)
            # where it is tighter than the link mode's
            limits = PrecopyLimits(limits.max_rounds, min(limits.downtime, downtime_limit))
        common = set(local_versions) & set(peer_versions)
        session = cls(me, migration_id, vm, me, target, epoch, limits, version, sorted(common),
                      layout, policy=policy, regions=regions)
        session.authorization = authorization
        session.machine = machine
        return session

    def use_stop_estimate(self, estimate: StopEstimate, ceiling: int) -> None:
        """Judge the final round against what the node measured of its stop windows (see
        :mod:`federation.migration.stop_costs`), and throttle up to ``ceiling``."""
        self.reserve, self.bias = estimate.reserve, estimate.bias
        self.reserve_measured = estimate.measured
        self.ceiling = ceiling

    def begin_command(self) -> BeginMigration:
        """The begin this session submits (raises MigrationError without an operator's
        request: a record from before operators signed migrations)."""
        if self.authorization is None:
            raise MigrationError(f"migration {self.migration_id!r} has no operator request "
                                 "to begin with")
        return BeginMigration(self.vm, self.source, self.target, self.epoch, self.migration_id,
                              self.authorization, self.version)

    def start(self, now: float) -> list[Action]:
        if self.phase is not Phase.PLANNED or self.pending is not None:
            raise MigrationError(f"migration {self.migration_id!r} was already started")
        return [self.persist(), *self.submit(now, self.begin_command()), self.progress()]

    def cancel_refusal(self) -> str:
        """Why an operator's cancel cannot be taken now, or "" if it can (the node asks
        before it hands over :class:`CancelRequested`, so the API can say why)."""
        mid = self.migration_id
        if self.phase is Phase.COMMITTED:
            return f"migration {mid!r} has already committed; nothing to cancel"
        if self.phase is Phase.ABORTED:
            return f"migration {mid!r} has already aborted: {self.reason}"
        if self.phase is Phase.REFUSED:
            return f"migration {mid!r} was refused by the ledger; nothing to cancel"
        if self.phase is Phase.ABORTING:
            return f"migration {mid!r} is already aborting ({self.reason}); the ledger decides"
        return ""

    def _on_cancel(self, now: float, ev: CancelRequested) -> list[Action]:
        if self.cancel_refusal():
            return []
        note = Notify("migration.cancel-requested", {"migration_id": self.migration_id,
                                                     "phase": self.phase.value})
        if self.phase is Phase.PLANNED:
            # The begin is on its way to the ledger: keep the wish (persisted, so a restart
            # keeps it too) and abort as soon as the ledger records the begin.
            self.reason = ev.reason
            return [note, self.persist(), self.progress()]
        return [note, *self.abort(now, ev.reason), self.progress()]

    # ------------------------------------------------------------------ decisions

    def _may_abort(self) -> bool:
        return self.phase in _ABORTABLE

    def request_abort(self, now: float) -> list[Action]:
        return self.submit(now, AbortMigration(self.migration_id, None, self.reason[:256],
                                               abort_cause(self.reason)))

    def announce(self, now: float) -> list[Action]:
        """Announce the fenced root in the ledger (resubmitted until it is recorded)."""
        return self.submit(now, AnnounceRoot(self.migration_id, self.root))

    def _abort_side_effects(self) -> list[Action]:
        return [CancelRound(self.migration_id)] if self.round else []

    def _offer(self) -> Send:
        layout = tuple(ImageSize(n, c) for n, c in self.layout)
        return Send(self.target, MigrationOffer(
            self.migration_id, self.vm, self.source, self.target, self.epoch, layout,
            self.version, self.machine,
        ))

    def _round_done(self, final: bool) -> Send:
        return Send(self.target, MigrationRoundDone(self.migration_id, self.round, final,
                                                    self.root if final else b""))

    def _send_round(self, now: float, final: bool) -> list[Action]:
        # the pages this round is expected to cover: every page first, then the pages
        # dirtied while the previous round ran (_after_round kept its report's count)
        if self.round == 0:
            self.round_pages = self.total_bytes // PAGE_SIZE
        self.round_started, self.round_bytes, self.round_wire = now, 0, 0
        self.round_prepared = 0
        self._sample, self._wire_seen = None, None  # a sample is of its own round
        # until this round measures its own pace, the last round's estimate stands
        self.live_eta = self.eta if self.round else math.inf
        self.round += 1
        self.version = round_version(self.version, self.common, self.policy, self.vm,
                                     self.source, self.target, self.regions)
        return [
            self.persist(),
            SendRound(self.migration_id, self.vm, self.round, self.round > 1, final,
                      self.version),
            self.timer("stall", now + STALL_TIMEOUT),
            self.progress(),
        ]

    def _in_round(self, now: float, ev: TransferProgress) -> list[Action]:
        """A round's progress report: bytes, pages and the estimate move while it runs (the
        convergence decision still waits for the round's end, RoundSent; a dirty sample
        of round 1's preparation may throttle the guest at once)."""
        if self.round_started is None:
            return []
        out: list[Action] = []
        if ev.dirty_seconds > 0 and self.phase is Phase.PRECOPY:
            self._sample = (ev.dirtied, ev.dirty_seconds, ev.preparation_s)
            out += self._sampled(now, self.page_cost or (
                PAGE_SIZE / self.link_Bps if self.link_Bps > 0 else 0.0))
        elif self._sample is not None and ev.wire_bytes > self.round_wire:
            # no link figure at the sample: the round's own pace on the wire once it moves
            # (between two reports: the first one's start is not known)
            if self._wire_seen is not None:
                then, wire = self._wire_seen
                cost = (now - then) / ((ev.wire_bytes - wire) / PAGE_SIZE)
                out += self._sampled(now, cost)
            self._wire_seen = (now, ev.wire_bytes)
        self.round_bytes = max(self.round_bytes, ev.bytes)
        self.round_wire = max(self.round_wire, ev.wire_bytes)
        self.round_prepared = max(self.round_prepared, ev.prepared)
        elapsed = now - self.round_started
        if self.round_bytes > 0 and elapsed > 0:
            rate = self.round_bytes / elapsed
            self.throughput = rate
            left = max(0, self.round_pages * PAGE_SIZE - self.round_bytes)
            self.live_eta = left / rate
        return [*out, self.progress()]

    def _sampled(self, now: float, cost: float) -> list[Action]:
        """Round 1's dirty sample (precopy.first_round_throttle) judged at ``cost`` seconds
        a page on the link (0: not known yet, judged when the round moves): throttle the
        guest for the rest of the round if it writes more than the final round could
        carry."""
        assert self.round_started is not None and self._sample is not None
        if cost <= 0:
            return []
        dirtied, seconds, preparation = self._sample
        self._sample = None
        wanted = first_round_throttle(dirtied, seconds, now - self.round_started, cost,
                                      self.limits.downtime, preparation, self.reserve,
                                      self.bias)
        out: list[Action] = [Notify("migration.precopy", {
            "migration_id": self.migration_id, "round": self.round, "sample_pages": dirtied,
            "sample_s": round(seconds, 4), "preparation_s": round(preparation, 4),
            "page_cost_ms": round(cost * 1000, 4),
            "throttle": max(wanted, self.throttle), "fence": False, "why": "sample"})]
        if self.can_throttle and wanted > self.throttle:
            self.throttle = wanted
            out.append(Throttle(self.vm, self.migration_id, wanted))
        return out

    def _fence_deadline(self) -> float:
        """How long a fenced VM waits for the commit (see FENCE_SLACK)."""
        # With no measured throughput the estimate is unknown; the stall timer then
        # bounds the final round, and this bound covers verification and the commit.
        final = self.eta if math.isfinite(self.eta) else 0.0
        return FENCE_SLACK * (final + self.total_bytes / VERIFY_RATE) + PEER_DOWN_GRACE

    def _after_round(self, now: float, ev: RoundSent) -> list[Action]:
        self.round_started, self.round_bytes, self.round_wire = None, 0, 0
        self.round_pages = ev.dirty_pages
        self.bytes_sent += ev.bytes
        self.wire_bytes += ev.wire_bytes
        seconds = max(ev.seconds, 1e-9)
        # the final round's estimate goes by what moving a page cost (a round's preparation
        # — the running guest's shadow and its index — is not in a stopped guest's final
        # round), where the data plane measured it (precopy.page_cost: round 1's counts
        # its wire bytes as pages, not the pages the target already held)
        moving = max(ev.move_seconds, 1e-9) if ev.move_seconds is not None else seconds
        self.throughput = ev.bytes / moving if ev.bytes else self.throughput
        self.dirty_rate = ev.dirty_pages / seconds
        cost = page_cost(self.round, ev.pages, ev.wire_bytes, ev.seconds, ev.move_seconds)
        if self.phase is Phase.FINAL:
            # the final round against its estimate at the cost the fence was judged at
            self._final = (*final_round_costs(ev.seconds, ev.pages, self._fence_cost), now)
        if cost > 0:
            self.page_cost = cost
        # the fixed work of a round beside moving pages: an incremental round's; until one
        # ran, round 1's (its preparation copies and indexes every page, which an
        # incremental round only scans: an upper bound, so round 1 throttles no less
        # than the next round will show is needed; seen under load: 30 s against 5-9 s)
        if self.round > 1 or self.overhead == 0:
            self.overhead = max(0.0, ev.seconds - moving)
        self.eta = final_estimate(ev.dirty_pages, self.page_cost)
        if self.phase is Phase.FINAL:
            self.final_sent = True
            self.phase = Phase.VERIFYING
            self.eta = 0.0
            return [self.persist(), *self.cancel("stall"), self._round_done(True),
                    self.timer("retransmit", now + RETRANSMIT), self.progress()]
        out: list[Action] = [self._round_done(False)]
        self.dirty_history.append(ev.dirty_pages)
        d = decide(round_=self.round, max_rounds=self.limits.max_rounds,
                   downtime=self.limits.downtime, dirty=self.dirty_history,
                   cost=self.page_cost, seconds=ev.seconds, overhead=self.overhead,
                   throttle=self.throttle, can_throttle=self.can_throttle,
                   reserve=self.reserve, bias=self.bias, ceiling=self.ceiling)
        detail = {
            "migration_id": self.migration_id, "round": self.round,
            "dirty_pages": ev.dirty_pages, "estimate_s": round(self.eta, 4),
            "page_cost_ms": round(self.page_cost * 1000, 4),
            "overhead_s": round(self.overhead, 4), "throttle": d.throttle,
            "fence": d.fence, "why": d.why}
        if self.reserve or self.bias != 1.0:
            detail.update(reserve_s=round(self.reserve, 4), bias=round(self.bias, 4))
        out.append(Notify("migration.precopy", detail))
        if d.fence:
            self._fence_asked, self._fence_cost = now, self.page_cost
            self.fenced = True
            self.phase = Phase.FENCED
            # the fence includes hashing the stopped images for the root
            out += [self.persist(), Fence(self.vm, self.migration_id),
                    self.timer("stall", now + self.hash_bound()), self.progress()]
            return out
        if d.throttle != self.throttle:
            self.throttle = d.throttle
            out.append(Throttle(self.vm, self.migration_id, d.throttle))
        return out + self._send_round(now, final=False)

    # ------------------------------------------------------------------ events

    def _handle(self, now: float, ev: object) -> list[Action]:
        if isinstance(ev, LedgerBegun):
            return self._on_begun(now)
        if isinstance(ev, LedgerCommitted):
            return self._on_committed(now, ev)
        if isinstance(ev, LedgerAborted):
            if self.done:
                return []
            out: list[Action] = [CancelRound(self.migration_id)] if self.round else []
            out.append(Unfence(self.vm, self.migration_id))
            return out + self.finish(now, Phase.ABORTED, self.reason or "aborted in the ledger")
        if isinstance(ev, LedgerRefused):
            if isinstance(ev.command, BeginMigration) and self.phase is Phase.PLANNED:
                return self.finish(now, Phase.REFUSED, f"ledger refused the begin: {ev.reason}")
            return [Notify("migration.ledger-refused",
                           {"migration_id": self.migration_id, "reason": ev.reason})]
        if isinstance(ev, PolicyChanged):
            self.policy = ev.policy
            return []
        if isinstance(ev, LedgerRootAnnounced):
            if isinstance(self.pending, AnnounceRoot):
                self.pending = None
                return self.cancel("ledger")
            return []
        if isinstance(ev, CancelRequested):
            return self._on_cancel(now, ev)
        if isinstance(ev, Received):
            return self._on_message(now, ev)
        if isinstance(ev, RoundSent):
            if self.phase not in _SENDING or ev.round != self.round:
                return []  # a round cancelled by an abort, or a stale report
            return self._after_round(now, ev)
        if isinstance(ev, TransferProgress):
            if self.phase in _SENDING and ev.round == self.round:
                return [self.timer("stall", now + STALL_TIMEOUT), *self._in_round(now, ev)]
            return []
        if isinstance(ev, SourceFenced):
            if self.phase is not Phase.FENCED:
                return []
            self.root = ev.root
            self.phase = Phase.FINAL
            self.fenced_at = now
            if self._fence_asked is not None:
                self._fence_s = now - self._fence_asked
            return [*self._send_round(now, final=True), *self.announce(now),
                    self.timer("fence", now + self._fence_deadline())]
        if isinstance(ev, Throttled):
            if ev.percent < self.throttle:  # the backend cannot throttle this VM (more)
                self.can_throttle = False
            self.throttle = ev.percent
            return []
        if isinstance(ev, ActionFailed):
            if self._may_abort():
                return self.abort(now, f"{ev.action} failed: {ev.reason}")
            return [Notify("migration.error", {"migration_id": self.migration_id,
                                               "action": ev.action, "reason": ev.reason})]
        if isinstance(ev, TimerFired):
            return self._on_timer(now, str(ev.key[2]))  # type: ignore[index]
        raise MigrationError(f"source session got an event it does not take: {ev!r}")

    def _on_begun(self, now: float) -> list[Action]:
        if self.phase is Phase.REFUSED:
            # a resubmitted begin was refused, but an earlier copy of it did get in
            self.phase = Phase.BEGUN
            return self.abort(now, self.reason or "begin recorded after it was refused")
        if self.phase is not Phase.PLANNED:
            return []
        self.pending = None
        self.phase = Phase.BEGUN
        out: list[Action] = [*self.cancel("ledger")]
        if self.reason:  # cancelled while the begin was on its way
            return out + self.abort(now, self.reason)
        return out + [self.persist(), self._offer(), self.timer("retransmit", now + RETRANSMIT),
                      self.timer("stall", now + STALL_TIMEOUT), self.progress()]

    def _on_committed(self, now: float, ev: LedgerCommitted) -> list[Action]:
        if self.done:
            return []
        out: list[Action] = [CancelRound(self.migration_id)] if self.phase in _SENDING else []
        if not self.fenced:
            # Only the target commits (consensus.ledger), normally after checking our root.
            # Whatever it did, the ledger is the authority: stop this copy before retiring.
            self.fenced = True
            out += [self.persist(), Fence(self.vm, self.migration_id),
                    Notify("migration.error", {"migration_id": self.migration_id,
                                               "reason": "committed before the fence"})]
        self.epoch = ev.epoch
        out.append(Retire(self.vm, self.migration_id))
        if self._final is not None:
            out.append(self._stop_measured(now))
        return out + self.finish(now, Phase.COMMITTED)

    def _stop_measured(self, now: float) -> Notify:
        """This migration's stop window as the source saw it (the target's ``cont`` it
        does not see: :data:`START_PRIOR` stands for it), kept for the next migration."""
        assert self._final is not None
        fixed, bias, ended = self._final
        self.stop_costs = StopCosts(self._fence_s, fixed, now - ended + START_PRIOR, bias)
        return Notify("migration.stop-costs", {
            "migration_id": self.migration_id, "vm": self.vm,
            **{k: None if v is None else round(v, 4)
               for k, v in attrs.asdict(self.stop_costs).items()},
            "reserve_s": round(self.reserve, 4), "reserved_bias": round(self.bias, 4),
            "reserve_measured": list(self.reserve_measured)})

    def _on_message(self, now: float, ev: Received) -> list[Action]:
        msg = ev.message
        if ev.peer != self.target or not isinstance(msg, (MigrationReady, MigrationDecline)):
            return [Notify("migration.ignored", {"migration_id": self.migration_id,
                                                 "peer": ev.peer, "message": type(msg).__name__})]
        if isinstance(msg, MigrationDecline):
            out = self.abort(now, f"the target {self.target} gave up: {msg.reason}")
            return [*out, self.progress()] if out else []
        if self.phase is not Phase.BEGUN:
            return []
        self.phase = Phase.PRECOPY
        return [*self.cancel("retransmit"), *self._send_round(now, final=False)]

    def _on_timer(self, now: float, what: str) -> list[Action]:
        if what == "retransmit":
            if self.phase is Phase.BEGUN:
                return [self._offer(), self.timer("retransmit", now + RETRANSMIT)]
            if self.phase is Phase.VERIFYING:
                return [self._round_done(True), self.timer("retransmit", now + RETRANSMIT)]
            return []
        if what == "stall":
            return self.abort(now, f"no progress in {self.phase.value} within its bound: "
                              f"target {self.target} acknowledged nothing for "
                              f"{STALL_TIMEOUT:.0f} s ({self.link_state(now)})")
        if what == "fence":
            return self.abort(now, "the VM stayed fenced longer than its bound without a commit")
        raise MigrationError(f"source session got unknown timer {what!r}")
