"""Four PBFT replicas driven by hypothesis through random event orders, with crashes.

Messages are delivered in any order, dropped or duplicated; timers fire whenever the
test picks them (the clock jumps to their time); replicas crash — also in the middle
of a step, right after one of its synced writes, so the rest of that step's actions
never happen — and restart from what their store kept. Crash faults only: every
replica is correct. After every step:

- nothing a replica signs contradicts what it signed before, across its restarts
  (:class:`sim.hosts.pbft_promises.SignedPromises`: one digest per PRE-PREPARE,
  PREPARE, COMMIT; one NEW-VIEW per view; no vote in a view it asked to leave; every
  VIEW-CHANGE proves each sequence number it sent a COMMIT for);
- no two executions at one sequence number differ (at any replica, any incarnation).
"""

from __future__ import annotations

import random
from collections.abc import Hashable

import attrs
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from consensus.pbft.durable import ReplicaLog
from consensus.pbft.messages import Envelope
from consensus.pbft.replica import Replica
from mesh import wire
from mesh.core import Action, CancelTimer, Notify, Persist, Received, Send, SetTimer, TimerFired
from sim.hosts.pbft_cluster import SIM_CONFIG, identity_for
from sim.hosts.pbft_promises import SignedPromises
from sim.store import SimStore
from tests.harness.ledger import register

NAMES = ("n00", "n01", "n02", "n03")
KEYS = {m: identity_for(m).public for m in NAMES}
#: Checkpoints every 2 seqnos in a window of 4, so a short run passes several.
CONFIG = attrs.evolve(SIM_CONFIG, checkpoint_interval=2, window=4)
#: In a step, crash right after this synced write (None: no crash), as drawn.
CRASH_AFTER = st.one_of(st.none(), st.none(), st.none(), st.integers(1, 3))


def _timer_kind(key: Hashable) -> str:
    """("pbft", "request") -> "request"; ("ledger-client", request id) -> "ledger-client"."""
    assert isinstance(key, tuple)
    return str(key[0] if key[0] == "ledger-client" else key[1])


class CrashRecovery(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.stores = {m: SimStore() for m in NAMES}
        self.replicas: dict[str, Replica | None] = {m: None for m in NAMES}
        self.incarnation = {m: 0 for m in NAMES}
        self.timers: dict[str, dict[Hashable, float]] = {m: {} for m in NAMES}
        self.inflight: list[tuple[str, str, Envelope]] = []
        self.promises = SignedPromises()
        self.executed: dict[int, tuple[bytes, str]] = {}
        self.problem: str | None = None
        self.commands = 0
        for m in NAMES:
            self._boot(m)

    # ------------------------------------------------------------------ driving

    def _boot(self, m: str) -> None:
        self.incarnation[m] += 1
        rng = random.Random(f"{m}/{self.incarnation[m]}")
        replica = Replica(m, identity_for(m), KEYS, ReplicaLog(self.stores[m]), rng, CONFIG)
        self.replicas[m] = replica
        self.timers[m] = {}
        self._do(m, replica.start(self.now), None)

    def _crash(self, m: str) -> None:
        self.stores[m].crash()
        self.replicas[m] = None
        self.timers[m] = {}

    def _do(self, m: str, actions: list[Action], crash_after: int | None) -> None:
        """Execute ``actions`` in order, as a driver does; crash right after the
        ``crash_after``-th synced write (the later actions never happen)."""
        synced = 0
        for a in actions:
            if isinstance(a, Send):
                self.problem = self.problem or self.promises.envelope(m, a.message)
                self.inflight.append((m, a.peer, a.message))
            elif isinstance(a, SetTimer):
                self.timers[m][a.key] = a.at
            elif isinstance(a, CancelTimer):
                self.timers[m].pop(a.key, None)
            elif isinstance(a, Persist):
                self.stores[m].put(a.key, a.value, a.sync)
                synced += a.sync
                if crash_after is not None and synced == crash_after:
                    self._crash(m)
                    return
            elif isinstance(a, Notify) and a.kind == "pbft.executed":
                seq, dig = a.detail["seq"], a.detail["digest"]
                first = self.executed.setdefault(seq, (dig, m))
                if first[0] != dig:
                    self.problem = self.problem or (
                        f"agreement: seq {seq} executed as {first[0].hex()[:12]} at "
                        f"{first[1]} and as {dig.hex()[:12]} at {m}")

    def _up(self) -> list[str]:
        return [m for m in NAMES if self.replicas[m] is not None]

    # ------------------------------------------------------------------ rules

    @initialize(commands=st.integers(0, 6))
    def committed_prefix(self, commands: int) -> None:
        """Start from a federation that has already ordered a few commands (so crashes
        and view changes meet certificates and checkpoints, not an empty log)."""
        for i in range(commands):
            self._submit(NAMES[i % len(NAMES)], 1)
            for _ in range(6):
                self.deliver_rounds(1, None, 1)

    @precondition(lambda self: self._up())
    @rule(data=st.data(), count=st.integers(1, 3))
    def submit(self, data: st.DataObject, count: int) -> None:
        self._submit(data.draw(st.sampled_from(self._up())), count)

    def _submit(self, m: str, count: int) -> None:
        replica = self.replicas[m]
        assert replica is not None
        cmds = []
        for _ in range(count):
            self.commands += 1
            cmds.append(wire.encode(register(f"vm-{self.commands}", m)))
        _rids, actions = replica.submit_many(self.now, tuple(cmds))
        self._do(m, actions, None)

    @precondition(lambda self: self.inflight)
    @rule(data=st.data(), crash_after=CRASH_AFTER)
    def deliver(self, data: st.DataObject, crash_after: int | None) -> None:
        src, dst, msg = self.inflight.pop(data.draw(st.integers(0, len(self.inflight) - 1)))
        replica = self.replicas[dst]
        if replica is not None:
            self._do(dst, replica.handle(self.now, Received(src, msg)), crash_after)

    @precondition(lambda self: self.inflight)
    @rule(rounds=st.integers(1, 6), victim=st.none() | st.sampled_from(NAMES),
          crash_after=st.integers(1, 6))
    def deliver_rounds(self, rounds: int, victim: str | None, crash_after: int) -> None:
        """Every message in flight, in order, then what they caused, ``rounds`` times;
        ``victim`` crashes right after its ``crash_after``-th synced write on the way."""
        writes = 0
        for _ in range(rounds):
            batch, self.inflight = self.inflight, []
            for src, dst, msg in batch:
                replica = self.replicas[dst]
                if replica is None:
                    continue
                actions = replica.handle(self.now, Received(src, msg))
                if dst != victim:
                    self._do(dst, actions, None)
                    continue
                synced = sum(1 for a in actions if isinstance(a, Persist) and a.sync)
                if writes + synced >= crash_after:
                    self._do(dst, actions, crash_after - writes)
                    victim = None
                else:
                    writes += synced
                    self._do(dst, actions, None)

    @precondition(lambda self: any(self.timers[m] for m in NAMES))
    @rule(kind=st.sampled_from(["request", "new-view", "status", "ledger-client"]),
          crash_after=CRASH_AFTER)
    def fire_everywhere(self, kind: str, crash_after: int | None) -> None:
        """Every armed timer of one kind, replica by replica (the clock moves to the
        last): all backups suspect the primary at once, or all resend, ..."""
        due = sorted((t, m, k) for m in NAMES for k, t in self.timers[m].items()
                     if _timer_kind(k) == kind)
        for at, m, key in due:
            replica = self.replicas[m]
            if replica is None or self.timers[m].get(key) != at:
                continue
            self.now = max(self.now, at)
            del self.timers[m][key]
            self._do(m, replica.handle(self.now, TimerFired(key)), crash_after)

    @precondition(lambda self: self.inflight)
    @rule(data=st.data())
    def drop(self, data: st.DataObject) -> None:
        self.inflight.pop(data.draw(st.integers(0, len(self.inflight) - 1)))

    @precondition(lambda self: self.inflight)
    @rule(data=st.data())
    def duplicate(self, data: st.DataObject) -> None:
        self.inflight.append(self.inflight[data.draw(st.integers(0, len(self.inflight) - 1))])

    @precondition(lambda self: any(self.timers[m] for m in NAMES))
    @rule(data=st.data(), crash_after=CRASH_AFTER)
    def fire_timer(self, data: st.DataObject, crash_after: int | None) -> None:
        armed = sorted(((m, repr(k), k) for m in NAMES for k in self.timers[m]),
                       key=lambda t: (t[0], t[1]))
        m, _, key = data.draw(st.sampled_from(armed))
        self.now = max(self.now, self.timers[m].pop(key))
        replica = self.replicas[m]
        assert replica is not None
        self._do(m, replica.handle(self.now, TimerFired(key)), crash_after)

    @precondition(lambda self: self._up())
    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        self._crash(data.draw(st.sampled_from(self._up())))

    @precondition(lambda self: len(self._up()) < len(NAMES))
    @rule(data=st.data())
    def restart(self, data: st.DataObject) -> None:
        self._boot(data.draw(st.sampled_from([m for m in NAMES if self.replicas[m] is None])))

    @invariant()
    def nothing_contradicts_what_was_signed_or_executed(self) -> None:
        assert self.problem is None, self.problem


#: make test: 200 runs of up to 60 steps (~20 s); make chaos (the long profile): 2,500.
CrashRecovery.TestCase.settings = settings(
    settings.default, stateful_step_count=60,
    max_examples=max(200, settings().max_examples // 4))
test_crash_recovery = CrashRecovery.TestCase
#: the long profile's 2,500 runs take several minutes
pytestmark = pytest.mark.timeout(1800)
