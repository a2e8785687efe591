"""The node's consensus-and-migration core: the PBFT replica and the migration sessions
of one DC in one sans-I/O core, so the sessions see the ledger exactly as it executes.

Wiring (what :mod:`federation.migration.vocabulary` asks of a node):

- every ``pbft``/``pbft.*`` message, ``pbft``/``ledger-client`` timer and peer event
  goes to the replica; ``migration.*`` messages and ``("migration", id, what)``
  timers go to the session of that migration id;
- after every replica step the ledger's migration records are compared with the
  last ones seen: a new ``begun`` becomes :class:`LedgerBegun` for the source
  session (and creates the target session at the target), the source's announced
  root :class:`LedgerRootAnnounced`, ``committed`` and ``aborted`` become
  :class:`LedgerCommitted` / :class:`LedgerAborted`, a policy change
  :class:`PolicyChanged` — whatever way the ledger got there (normal execution or
  state transfer);
- a session's :class:`SubmitLedger` and the node's own submissions
  (:meth:`NodeCore.submit_many`) are gathered over the step and signed together, up
  to ``MAX_REQUEST_COMMANDS`` per REQUEST (``replica.submit_many``: one signature and
  one check of it per replica for the lot, each command with its own request id and
  result), when the step ends: what a step makes ready goes out as few requests as
  possible, as the consensus benchmark submits (issue 14 item 5). A session's
  completion comes back as :class:`LedgerRefused` if the ledger rejected it; the
  node's own submissions complete through ``on_ledger_done``, once f+1 replicas
  answered *and* this DC's replica executed them (so the caller reads its own write
  in this DC's ledger);
- the sessions' other actions (VM work, rounds) are handed to the host's effects
  hook, in order with the ``Persist`` actions that must precede them.

Records of sessions that cannot be restored yet (the replica is behind them) are
retried after every ledger change.

Ended sessions stay (with their last progress and outcome, for the API) until the host
calls :meth:`NodeCore.forget_ended`: the node does, so that a node migrating all day
keeps a bounded number of them (``federation.node.assembly``: ``ENDED_KEEP_SECONDS``,
``ENDED_KEEP_MAX``); the simulator does not (its runs are short).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from consensus.authz import Authorization
from consensus.ledger import Ledger, LedgerResult, MigrationRecord, SetPolicy
from consensus.pbft.client import ClientBusy
from consensus.pbft.messages import MAX_REQUEST_COMMANDS
from consensus.pbft.replica import Replica
from consensus.pbft.transfer import RESTORE
from federation.migration.dc_status import MigrationView, SessionStatus
from federation.migration.precopy import HARD_MAXIMUM
from federation.migration.restore import restore
from federation.migration.round_events import SessionView
from federation.migration.session import SessionBase
from federation.migration.source import SourceSession
from federation.migration.stop_costs import StopHistory
from federation.migration.target import TargetSession
from federation.migration.vocabulary import (
    LedgerAborted,
    LedgerBegun,
    LedgerCommitted,
    LedgerRefused,
    LedgerRootAnnounced,
    MigrationError,
    Outcome,
    PolicyChanged,
    Progress,
    SubmitLedger,
    limits_for,
)
from mesh import wire
from mesh.core import (
    Action,
    Event,
    Notify,
    Offload,
    Offloaded,
    PeerDown,
    PeerUp,
    Received,
    TimerFired,
)
from mesh.links.modes import Mode

__all__ = ["NodeCore", "TAGS", "LedgerDone"]

#: Wire tags this core consumes.
TAGS = ("pbft", "pbft.", "migration.")

#: ``on_ledger_done(request_id, result)``: ``result`` is None on a timeout.
LedgerDone = Callable[[int, LedgerResult | None], None]


class NodeCore:
    def __init__(
        self,
        me: str,
        replica: Replica,
        *,
        on_ledger_done: LedgerDone,
        mode_of: Callable[[str], Mode | None],
        on_ledger_moved: Callable[[], None] | None = None,
        regions: Mapping[str, str] | None = None,
        bandwidth_of: Callable[[str], float | None] | None = None,
        stop_history: StopHistory | None = None,
    ) -> None:
        self.me = me
        #: the fixed part of this DC's stop windows as measured (None: not measured, as
        #: in the simulator, whose stop windows have none): a migration with a downtime
        #: limit of its VM's own (a qemu guest) reserves it out of the limit, and throttles
        #: up to HARD_MAXIMUM before it fences over the limit
        self.stop_history = stop_history
        #: bytes per second of the link to a DC as the mesh measured it (None: unknown);
        #: a source session's round policy judges round 1's dirty sample against it
        self.bandwidth_of = bandwidth_of
        #: DC -> region (the federation file's), for the rollout's region targets
        self.regions = dict(regions or {})
        #: wall-clock seconds minus this core's ``now`` (the node sets it once its clock
        #: runs; 0 in the simulator): abort reasons say "since 12:01:07" in UTC
        self.wall_offset = 0.0
        self.replica = replica
        self.on_ledger_done = on_ledger_done
        #: called after the replica executed something (the node reconciles its VMs)
        self.on_ledger_moved = on_ledger_moved
        self._executed = replica.last_exec
        self.mode_of = mode_of
        self.sessions: dict[str, SessionBase] = {}
        #: last Progress / Outcome of every session, for the API
        self.progress: dict[str, Progress] = {}
        self.outcomes: dict[str, Outcome] = {}
        self.counters: dict[str, int] = {}
        #: migration id -> when its session here ended (``now``), in the order they ended
        self._ended: dict[str, float] = {}
        #: (role, outcome) -> sessions ended so and then forgotten (forget_ended)
        self.forgotten_outcomes: dict[tuple[str, str], int] = {}
        self._seen: dict[str, tuple[str, bool]] = {
            mid: _seen(rec) for mid, rec in replica.ledger.migrations.items()
        }
        self._policy: SetPolicy = replica.ledger.policy
        #: request id -> the session that submitted it
        self._requests: dict[int, str] = {}
        #: node-level requests (not from a session) awaiting completion
        self.node_requests: set[int] = set()
        #: node-level requests committed (f+1 matching replies) that this DC's replica
        #: has not executed yet: reported once it has
        self._unseen: dict[int, LedgerResult] = {}
        #: persisted records waiting for the replica to catch up
        self.unrestored: dict[str, bytes] = {}
        #: the ledger object and height _ledger_changes last compared (it changes only
        #: by executing a batch or by a state transfer, which installs a new object)
        self._compared: tuple[Ledger, int] = (replica.ledger, replica.last_exec)
        #: commands made ready during the current step, submitted when it ends: the
        #: encoded command and the migration id of its session (None: the node's own)
        self._ready: list[tuple[bytes, str | None]] = []
        #: what the worker that restored a transferred ledger also computed of it for
        #: _ledger_changes, until the step that installs it ends
        self._restored: _RestoredView | None = None

    # ------------------------------------------------------------------ core API

    def start(self, now: float) -> list[Action]:
        out = self.replica.start(now)
        return self._end_step(now, self._after_replica(now, out) + self._retry_restore(now))

    def handle(self, now: float, event: Event) -> list[Action]:
        return self._end_step(now, self._handle(now, event))

    def _handle(self, now: float, event: Event) -> list[Action]:
        if isinstance(event, Received):
            tag: str = event.message.wire_tag
            if tag.startswith("migration."):
                return self._to_session(now, event.message.migration_id, event)
            return self._after_replica(now, self.replica.handle(now, event))
        if isinstance(event, TimerFired):
            key = event.key
            if isinstance(key, tuple) and len(key) == 3 and key[0] == "migration":
                return self._to_session(now, str(key[1]), event)
            return self._after_replica(now, self.replica.handle(now, event))
        if isinstance(event, Offloaded):  # the replica's (a restored ledger)
            view = event.result
            if isinstance(view, _RestoredView):
                self._restored = view
                event = Offloaded(event.key, view.ledger, event.error)
            try:
                return self._after_replica(now, self.replica.handle(now, event))
            finally:
                self._restored = None  # (only the install's step may use it)
        if isinstance(event, (PeerUp, PeerDown)):
            out = self._after_replica(now, self.replica.handle(now, event))
            for mid in list(self.sessions):
                out += self._to_session(now, mid, event)
            return out
        return []

    # ------------------------------------------------------------------ node requests

    def submit(self, now: float, command: Any) -> tuple[int, list[Action]]:
        """Submit ``command`` for the node; completion comes through ``on_ledger_done``.
        Raises :class:`~consensus.pbft.client.ClientBusy` when the client's window is full."""
        rids, out = self.submit_many(now, (command,))
        if rids[0] is None:
            raise ClientBusy("the ledger client's window is full")
        return rids[0], out

    def submit_many(self, now: float, commands: Sequence[Any]) -> tuple[list[int | None],
                                                                       list[Action]]:
        """Submit the node's ``commands`` (ready together) with whatever else this step
        made ready, ``MAX_REQUEST_COMMANDS`` per signed REQUEST; each completes through
        ``on_ledger_done`` under its request id. The ids come in the order of
        ``commands``; None where the client's window was full (ClientBusy)."""
        at = len(self._ready)  # nothing, unless called from inside a step
        self._ready += [(wire.encode(c), None) for c in commands]
        out, rids = self._submit_ready(now)
        return rids[at:at + len(commands)], out

    def plan_migration(
        self, now: float, migration_id: str, vm: str, target: str,
        layout: tuple[tuple[str, int], ...], local_versions: tuple[int, ...],
        peer_versions: tuple[int, ...], authorization: Authorization, machine: bytes = b"",
        downtime_limit: float | None = None,
    ) -> list[Action]:
        """Start migrating ``vm`` (owned here per the ledger) to ``target``, on the
        operator's signed request ``authorization`` (a ``MigrateVm`` intent)."""
        ledger = self.replica.ledger
        owner, epoch = ledger.owner(vm), ledger.epoch(vm)
        if owner != self.me or epoch is None:
            raise MigrationError(f"VM {vm!r} is owned by {owner!r} in the ledger, not {self.me}")
        busy = ledger.vms[vm].migration_id
        if busy is not None and ledger.migrations[busy].state == "begun":
            raise MigrationError(f"VM {vm!r} is already migrating ({busy})")
        if migration_id in self.sessions:
            raise MigrationError(f"migration {migration_id!r} exists")
        session = SourceSession.plan(
            self.me, migration_id, vm, target, epoch, layout, limits_for(self.mode_of(target)),
            ledger.policy, local_versions, peer_versions, authorization,
            regions=self.regions, machine=machine, downtime_limit=downtime_limit,
        )
        session.link_Bps = (self.bandwidth_of(target) if self.bandwidth_of else None) or 0.0
        if self.stop_history is not None and downtime_limit is not None:
            session.use_stop_estimate(self.stop_history.estimate(vm), HARD_MAXIMUM)
        self.sessions[migration_id] = self._adopt(session)
        return self._end_step(now, self._session_out(now, session, session.start(now)))

    def _adopt(self, session: SessionBase) -> SessionBase:
        session.wall_offset = self.wall_offset
        return session

    def set_wall_offset(self, offset: float) -> None:
        """Wall-clock seconds minus ``now`` (the node's clock is trio's, with its own
        origin): for the times in abort reasons, also of the sessions already here."""
        self.wall_offset = offset
        for session in self.sessions.values():
            session.wall_offset = offset

    def restore_records(self, now: float, records: dict[str, bytes]) -> list[Action]:
        self.unrestored.update(records)
        return self._end_step(now, self._retry_restore(now))

    def to_session(self, now: float, migration_id: str, event: object) -> list[Action]:
        """Hand ``event`` to the session of ``migration_id`` (from the node's workers)."""
        return self._end_step(now, self._to_session(now, migration_id, event))

    def _to_session(self, now: float, migration_id: str, event: object) -> list[Action]:
        session = self.sessions.get(migration_id)
        if session is None:
            self._count("events_without_session")
            return []
        return self._session_out(now, session, session.handle(now, event))

    # ------------------------------------------------------------------ status (read-only)

    @property
    def ledger(self) -> Ledger:
        """The ledger as this DC's replica executed it."""
        return self.replica.ledger

    def migration_ids(self) -> list[str]:
        """Every migration with a session here or a record in the ledger, sorted."""
        return sorted(set(self.sessions) | set(self.replica.ledger.migrations))

    def recent_migration_ids(self, most: int) -> tuple[list[str], int]:
        """The ids (sorted) of the ``most`` migrations begun last in this DC's ledger and
        of every session here still under way, and how many migrations there are in
        all (:meth:`migration_ids` would list them: the ledger keeps every record). The
        status document shows these, so its size and cost do not grow with history."""
        ledger = self.replica.ledger.migrations
        recent = set(itertools.islice(reversed(ledger), most))
        recent.update(mid for mid, s in self.sessions.items() if not s.done)
        total = len(ledger) + sum(1 for mid in self.sessions if mid not in ledger)
        return sorted(recent), total

    def migration(self, migration_id: str) -> MigrationView | None:
        session = self.sessions.get(migration_id)
        rec = self.replica.ledger.migrations.get(migration_id)
        if session is None and rec is None:
            return None
        return MigrationView(migration_id, rec,
                             None if session is None else SessionStatus.of(session),
                             self.progress.get(migration_id), self.outcomes.get(migration_id))

    def session_view(self, migration_id: str) -> SessionView | None:
        """What the rounds core needs to know of the session (None: no session here)."""
        s = self.sessions.get(migration_id)
        return None if s is None else SessionView(s.vm, s.source, s.target, s.done)

    def outcome_counts(self) -> dict[tuple[str, str], int]:
        """(role, outcome) -> migrations that ended so at this DC."""
        ended = dict(self.forgotten_outcomes)
        for o in self.outcomes.values():
            ended[(o.role, o.outcome)] = ended.get((o.role, o.outcome), 0) + 1
        return ended

    def ended_sessions(self) -> int:
        """Ended sessions still kept here (their status and outcome)."""
        return len(self._ended)

    def forget_ended(self, now: float, keep_for: float, keep_most: int) -> list[str]:
        """Forget the ended sessions (their session, last progress and outcome; their
        outcome stays counted in :meth:`outcome_counts`) that ended ``keep_for`` seconds
        ago or more, and the oldest ended beyond the ``keep_most`` most recent. Returns
        the migration ids forgotten, in the order they ended.

        Only a session whose record in this DC's ledger is decided (committed or
        aborted) goes: the ledger here never shows it begun again (execution and state
        transfer only move forward), so no target session is made again for it. One the
        ledger does not show decided yet (this replica is behind) stays until it does.
        The host deletes the persisted record then (the node: Node._drop_records); one
        left by a crash in between is restored at the next start and forgotten again."""
        excess = len(self._ended) - keep_most
        gone: list[str] = []
        for mid, at in list(self._ended.items()):
            if now - at < keep_for and excess <= 0:
                break
            rec = self.replica.ledger.migrations.get(mid)
            session = self.sessions.get(mid)
            if rec is None or rec.state == "begun" or (session is not None and not session.done):
                continue
            del self._ended[mid]
            self.sessions.pop(mid, None)
            self.progress.pop(mid, None)
            outcome = self.outcomes.pop(mid, None)
            if outcome is not None:
                key = (outcome.role, outcome.outcome)
                self.forgotten_outcomes[key] = self.forgotten_outcomes.get(key, 0) + 1
            excess -= 1
            gone.append(mid)
        return gone

    def active_sessions(self) -> int:
        return sum(1 for s in self.sessions.values() if not s.done)

    def restoring(self) -> list[str]:
        """Persisted migration records waiting for the replica to catch up."""
        return sorted(self.unrestored)

    # ------------------------------------------------------------------ internals

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    def _end_step(self, now: float, out: list[Action]) -> list[Action]:
        """The step's actions, then the submission of what it made ready."""
        return out + self._submit_ready(now)[0]

    def _submit_ready(self, now: float) -> tuple[list[Action], list[int | None]]:
        """Sign what is ready, ``MAX_REQUEST_COMMANDS`` per REQUEST, and the commands
        that the replica's actions make ready in turn. Returns the actions and the request
        ids of the commands that were ready first (None: ClientBusy; a session's own
        resubmission timer, LEDGER_RESUBMIT, tries again). A submission is never sent
        before the step's other actions: its Send only goes later than it would one at a
        time, never ahead of a Persist or effect before it."""
        out: list[Action] = []
        first: list[int | None] | None = None
        while self._ready:
            ready, self._ready = self._ready, []
            ids: list[int | None] = []
            for i in range(0, len(ready), MAX_REQUEST_COMMANDS):
                chunk = ready[i:i + MAX_REQUEST_COMMANDS]
                try:
                    rids, acts = self.replica.submit_many(now, tuple(c for c, _ in chunk))
                except ClientBusy:
                    self._count("submit_busy")
                    ids += [None] * len(chunk)
                    continue
                for (_, owner), rid in zip(chunk, rids, strict=True):
                    if owner is None:
                        self.node_requests.add(rid)
                    else:
                        self._requests[rid] = owner
                ids += rids
                self._count("requests_submitted")
                self.counters["commands_submitted"] = (
                    self.counters.get("commands_submitted", 0) + len(chunk))
                out += self._after_replica(now, acts)
            if first is None:
                first = ids
        return out, first or []

    def _session_out(self, now: float, s: SessionBase, actions: list[Any]) -> list[Action]:
        out: list[Action] = []
        for a in actions:
            if isinstance(a, SubmitLedger):
                self._ready.append((wire.encode(a.command), s.migration_id))
                continue
            if isinstance(a, Notify) and a.kind == "migration.progress":
                self.progress[s.migration_id] = a.detail
            elif isinstance(a, Notify) and a.kind == "migration.done":
                self.outcomes[s.migration_id] = a.detail
                self._ended.pop(s.migration_id, None)  # the order they (last) ended in
                self._ended[s.migration_id] = now
            elif isinstance(a, Notify) and a.kind == "migration.stop-costs":
                if self.stop_history is not None and isinstance(s, SourceSession) \
                        and s.stop_costs is not None:
                    self.stop_history.record(s.vm, s.stop_costs)
            out.append(a)
        return out

    def _after_replica(self, now: float, actions: list[Action]) -> list[Action]:
        out: list[Action] = []
        for a in actions:
            if isinstance(a, Offload) and isinstance(a.key, tuple) and a.key[:2] == RESTORE:
                # the worker that restores the ledger also reads it as _ledger_changes will
                a = Offload(a.key, functools.partial(_restored_view, self.me, a.key[2], a.work))
            out.append(a)
            if isinstance(a, Notify) and a.kind in ("ledger.committed", "ledger.timeout"):
                out += self._request_done(now, a.detail)
        if self.on_ledger_moved is not None and self.replica.last_exec != self._executed:
            self._executed = self.replica.last_exec
            self.on_ledger_moved()
        return out + self._ledger_changes(now)

    def _request_done(self, now: float, detail: dict[str, Any]) -> list[Action]:
        rid = int(detail["request_id"])
        raw = detail.get("result")
        result = None if raw is None else wire.decode(raw, expect=(LedgerResult,))
        if rid in self.node_requests:
            self.node_requests.discard(rid)
            if result is not None and self.replica.ledger.executed_result(self.me, rid) is None:
                # f+1 replicas executed it, this DC's not yet. The caller reads this DC's
                # ledger next (a migration of the VM it just imported, say): it hears of
                # the result once its own ledger holds it (read your writes).
                self._unseen[rid] = result
                return []
            self.on_ledger_done(rid, result)
            return []
        mid = self._requests.pop(rid, None)
        session = self.sessions.get(mid) if mid is not None else None
        if session is None or result is None or result.ok:
            return []  # a timeout is the session's own resubmission timer's business
        command = session.pending
        return self._to_session(now, session.migration_id, LedgerRefused(command, result.error))

    def _ledger_changes(self, now: float) -> list[Action]:
        ledger = self.replica.ledger
        # Most replica steps execute nothing (a vote, a status): then nothing changed,
        # and the migrations, every one the ledger ever recorded, are not compared.
        if self._compared[0] is ledger and self._compared[1] == self.replica.last_exec:
            return []
        self._compared = (ledger, self.replica.last_exec)
        for rid in [r for r in self._unseen if ledger.executed_result(self.me, r) is not None]:
            self.on_ledger_done(rid, self._unseen.pop(rid))
        out: list[Action] = []
        if ledger.policy != self._policy:
            self._policy = ledger.policy
            for mid in list(self.sessions):
                out += self._to_session(now, mid, PolicyChanged(ledger.policy))
        view, self._restored = self._restored, None
        if view is not None and view.ledger is ledger and view.seq == self.replica.last_exec:
            return out + self._restored_changes(now, view)
        changed = [(mid, rec) for mid, rec in ledger.migrations.items()
                   if self._seen.get(mid) != _seen(rec)]
        for mid, rec in changed:
            self._seen[mid] = _seen(rec)
            out += self._on_record(now, rec)
        if changed and self.unrestored:
            out += self._retry_restore(now)
        return out

    def _restored_changes(self, now: float, view: _RestoredView) -> list[Action]:
        """:meth:`_ledger_changes` of a ledger a state transfer just installed (nothing
        executed on it since), from what the restoring worker read of it: the same
        records reported in the same order, without a pass over every one of them on
        the event loop (2 s for 100,000 migrations under load). Only records of a
        session here or a migration begun towards this DC make :meth:`_on_record` act;
        the others are only remembered as seen."""
        old, seen = self._seen, view.seen
        acting = sorted((mid for mid in view.begun_here.union(self.sessions)
                         if mid in seen and old.get(mid) != seen[mid]),
                        key=view.order.__getitem__)
        changed = bool(self.unrestored) and not seen.items() <= old.items()
        for mid in old.keys() - seen.keys():  # (seen of records the ledger no longer has)
            seen[mid] = old[mid]
        self._seen = seen
        migrations = view.ledger.migrations
        out: list[Action] = []
        for mid in acting:
            out += self._on_record(now, migrations[mid])
        if changed:
            out += self._retry_restore(now)
        return out

    def _on_record(self, now: float, rec: MigrationRecord) -> list[Action]:
        mid = rec.migration_id
        if mid not in self.sessions and rec.target == self.me and rec.state == "begun":
            if mid in self.unrestored:
                return []
            limits = limits_for(self.mode_of(rec.source))
            session, acts = TargetSession.from_ledger(
                self.me, mid, rec.vm, rec.source, rec.epoch, limits, now)
            self.sessions[mid] = self._adopt(session)
            out = self._session_out(now, session, acts)
            if rec.announced:
                out += self._to_session(now, mid, LedgerRootAnnounced(mid, rec.announced))
            return out
        if mid not in self.sessions:
            return []
        if rec.state == "begun":
            out = self._to_session(now, mid, LedgerBegun(mid, rec.epoch))
            if rec.announced:
                out += self._to_session(now, mid, LedgerRootAnnounced(mid, rec.announced))
            return out
        if rec.state == "committed":
            return self._to_session(now, mid, LedgerCommitted(mid, rec.epoch + 1, rec.root))
        return self._to_session(now, mid, LedgerAborted(mid))

    def _retry_restore(self, now: float) -> list[Action]:
        out: list[Action] = []
        for mid, data in list(self.unrestored.items()):
            rec = self.replica.ledger.migrations.get(mid)
            try:
                session, acts = restore(data, rec, now, self.replica.ledger.policy,
                                        self.regions)
            except MigrationError as exc:
                if rec is None:
                    continue  # the replica is behind this record: try after the next change
                del self.unrestored[mid]
                out.append(Notify("migration.unrestorable", {"migration_id": mid,
                                                             "error": str(exc)}))
                continue
            del self.unrestored[mid]
            self.sessions[mid] = self._adopt(session)
            if session.done:  # ended before the restart: counts from now
                self._ended[mid] = now
            out += self._session_out(now, session, [*acts, session.progress()])
        return out


class _RestoredView:
    """A ledger restored by a worker (``Offload``), with what it read of it there: each
    migration's :func:`_seen`, its position in the ledger, and those begun towards
    ``me``."""

    def __init__(self, me: str, seq: int, ledger: Ledger) -> None:
        self.ledger = ledger
        self.seq = seq
        migrations = ledger.migrations
        self.seen = {mid: _seen(rec) for mid, rec in migrations.items()}
        self.order = {mid: i for i, mid in enumerate(migrations)}
        self.begun_here = frozenset(mid for mid, rec in migrations.items()
                                    if rec.target == me and rec.state == "begun")


def _restored_view(me: str, seq: int, work: Callable[[], Any]) -> _RestoredView:
    """Run the replica's restore (``work``), then read the ledger as _ledger_changes will."""
    ledger = work()
    if not isinstance(ledger, Ledger):
        raise TypeError(f"a restore returned {type(ledger).__name__}")
    return _RestoredView(me, seq, ledger)


def _seen(rec: MigrationRecord) -> tuple[str, bool]:
    """What of a migration record the sessions hear about: its state, and whether the
    source's root is announced."""
    return rec.state, bool(rec.announced)
