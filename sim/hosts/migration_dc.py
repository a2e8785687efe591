"""One simulated DC of ``migration-chaos``: the node's cores, hosted over a simulated VM
backend, with the same interpreter of the migration actions a node uses.

:class:`DcHost` is the core the world mounts on a node. It holds the two cores a real
node runs — :class:`federation.migration.dc_core.NodeCore` (the PBFT replica over the
node's crash-consistent store, and the migration sessions) and
:class:`federation.migration.rounds.RoundsCore` (the pre-copy rounds: the v1 window/ack
protocol with its ``PagesChunk``/``PagesAck`` messages over the simulated WAN) — and
wires them the way :mod:`federation.node.assembly` does: the sessions' ``SendRound`` and
``CancelRound`` go to the rounds core, its ``ToSession`` back to the sessions, and every
VM action of either is carried out by :class:`federation.vms.actions.VmActions` on
:class:`sim.hosts.migration_vms.SimBackend` (the page model). The replies of
``Fence`` and ``Verify`` come back after the time hashing the images takes at
``VERIFY_RATE``; a round's page actions are answered at once (the link, not the
copy, is what a round waits for).

At every (re)start the host rebuilds the cores from the store, hands the sessions
every persisted record (the restore rules resume or abort them) and boots the VMs this
DC owns in its ledger that are neither fenced nor retired — what a real node does after
a crash.

``bug`` injects a fault into the host for tests of the oracle: ``"start-before-commit"``
starts the target's copy as soon as it verifies, ``"run-after-fence"`` leaves a fenced
VM running, ``"skip-final-round"`` sends no pages in the final round and has the target
trust the source's root instead of recomputing it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import attrs

from consensus.pbft.replica import Replica
from federation.migration.dc_core import TAGS, NodeCore
from federation.migration.round_events import (
    PAGE_ACTIONS,
    RoundPlanned,
    RoundReport,
    ToSession,
)
from federation.migration.round_messages import ROUND_TAGS
from federation.migration.rounds import RoundsCore, after_vm_action
from federation.migration.vocabulary import (
    VERIFY_RATE,
    ActionFailed,
    CancelRound,
    Fence,
    SendRound,
    TargetVerified,
    Verify,
    record_key,
)
from federation.vms.actions import VM_ACTIONS, VmActions
from federation.vms.backend import VmError
from mesh.core import Action, Event, PeerDown, PeerUp, Received, SetTimer, TimerFired
from mesh.hde.image import PAGE_SIZE
from mesh.links.modes import Mode
from sim.hosts.migration_vms import PAGES, SimBackend, VmWorld

__all__ = ["DcHost", "HOST_TAGS"]

HOST_TAGS = (*TAGS, *ROUND_TAGS)


class DcHost:
    """The core mounted as ``"node"`` on every simulated DC (see the module docstring)."""

    def __init__(self, name: str, replica: Replica, vms: VmWorld,
                 mode_of: Callable[[str], Mode | None], records: dict[str, bytes],
                 bug: str = "") -> None:
        self.me = name
        self.vms = vms
        self.bug = bug
        self.core = NodeCore(name, replica, on_ledger_done=self._done, mode_of=mode_of)
        self.core.unrestored.update(records)
        self.replica = replica
        self.backend = SimBackend(vms, name, lambda vm: replica.ledger.owner(vm))
        self.vm_actions = VmActions(self.backend)
        self.rounds = RoundsCore(name, self.core.session_view)
        self._replies: dict[int, tuple[str, object]] = {}
        self._token = 0
        self._exec = -1
        #: (migration id, round) of final rounds the skip-final-round bug empties
        self._skipped: set[tuple[str, int]] = set()
        self.node_results: dict[int, bool | None] = {}
        self.on_ledger: Callable[[DcHost], None] | None = None

    @staticmethod
    def stored_records(store: Any) -> dict[str, bytes]:
        prefix = record_key("")
        return {k[len(prefix):]: v for k in store.keys(prefix)
                if (v := store.get(k)) is not None}

    def _done(self, request_id: int, result: Any) -> None:
        self.node_results[request_id] = None if result is None else bool(result.ok)

    # ------------------------------------------------------------------ core API

    def start(self, now: float) -> list[Action]:
        return self._run(now, self.core.start(now))

    def handle(self, now: float, event: Event) -> list[Action]:
        if isinstance(event, Received) and event.message.wire_tag.startswith("data."):
            return self._run(now, self.rounds.handle(now, event))
        if isinstance(event, TimerFired) and isinstance(event.key, tuple) and event.key:
            if event.key[0] == "simvm":
                mid, reply = self._replies.pop(int(event.key[1]))
                return self._run(now, self.core.to_session(now, mid, reply))
            if event.key[0] == "rounds":
                return self._run(now, self.rounds.handle(now, event))
        if isinstance(event, (PeerUp, PeerDown)):
            return self._run(now, self.core.handle(now, event)
                             + self.rounds.handle(now, event))
        return self._run(now, self.core.handle(now, event))

    def invoke(self, now: float, fn: Callable[[NodeCore, float], list[Any]]) -> list[Action]:
        """Run ``fn(core, now)`` (a plan, a submit) and carry out what it returns."""
        return self._run(now, fn(self.core, now))

    # ------------------------------------------------------------------ effects

    def _run(self, now: float, actions: list[Any]) -> list[Action]:
        out: list[Action] = []
        for a in actions:
            more = self._effect(now, a)
            if more is None:
                out.append(a)
            else:
                out += self._run(now, more)
        if self.replica.last_exec != self._exec:
            self._exec = self.replica.last_exec
            self._boot()
            if self.on_ledger is not None:
                self.on_ledger(self)
        return out

    def _later(self, now: float, delay: float, mid: str, reply: object) -> list[Action]:
        self._token += 1
        self._replies[self._token] = (mid, reply)
        return [SetTimer(("simvm", self._token), now + delay)]

    def _effect(self, now: float, a: object) -> list[Any] | None:
        """None: a mesh.core action for the world; else the actions carrying out ``a``
        gives (carried out in turn)."""
        if isinstance(a, SendRound):
            if a.final and self.bug == "skip-final-round":
                self._skipped.add((a.migration_id, a.round))
            return self.rounds.handle(now, a)
        if isinstance(a, CancelRound):
            return self.rounds.handle(now, a)
        if isinstance(a, ToSession):
            return self.core.to_session(now, a.migration_id, a.event)
        if isinstance(a, RoundReport):
            return []  # the host's log line in a node; the trace has the round already
        if isinstance(a, PAGE_ACTIONS):
            out: list[Any] = []
            for reply in self.vm_actions.carry_out_pages(a):
                if isinstance(reply, RoundPlanned) and (
                        reply.migration_id, reply.round) in self._skipped:
                    reply = attrs.evolve(reply, pages=())
                out += self.rounds.handle(now, reply)
            return out
        if isinstance(a, VM_ACTIONS):
            return self._vm_action(now, a)
        return None

    def _vm_action(self, now: float, a: Any) -> list[Any]:
        """A session's VM action, carried out by the interpreter a node uses."""
        replies: list[Any] = self.vm_actions.carry_out(a)
        out: list[Any] = []
        for news in after_vm_action(a, replies):
            out += self.rounds.handle(now, news)
        if isinstance(a, Fence) and self.bug == "run-after-fence":
            copy = self.vms.copies.get((self.me, a.vm))
            if copy is not None and copy.fence == a.migration_id:
                self.backend.run(copy)
        if isinstance(a, Verify):
            session = self.core.sessions.get(a.migration_id)
            if self.bug == "skip-final-round" and session is not None:
                replies = [TargetVerified(session.root) if isinstance(r, TargetVerified) else r
                           for r in replies]
            if self.bug == "start-before-commit" and session is not None:
                with contextlib.suppress(VmError):  # a copy that cannot start is no bug
                    self.backend.start(a.vm, session.epoch)
        hashing = isinstance(a, (Fence, Verify)) and not any(
            isinstance(r, ActionFailed) for r in replies)
        delay = PAGES * PAGE_SIZE / VERIFY_RATE if hashing else 0.0
        for reply in replies:
            out += self._later(now, delay, a.migration_id, reply)
        return out

    def _boot(self) -> None:
        ledger = self.replica.ledger
        for copy in self.vms.at(self.me):
            if copy.state == "stopped" and copy.fence is None and ledger.owner(copy.vm) == self.me:
                self.backend.run(copy)
