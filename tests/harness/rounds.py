"""Two DCs' rounds cores (federation.migration.rounds) over the simulator's page model, with
the network and the clock in the test's hands.

DC ``a`` holds VM ``vm`` (running, owned by ``a``) and sends its rounds to DC ``b``. Page
actions are carried out at once by :class:`federation.vms.actions.VmActions` on
:class:`sim.hosts.migration_vms.SimBackend`; every message sent is kept in ``net`` (as
the frame decodes, after a round trip through the wire codec) until the test delivers,
duplicates, reorders or drops it; timers wait in ``timers`` until the test fires them.
"""

from __future__ import annotations

from typing import Any

from federation.migration.round_events import (
    PAGE_ACTIONS,
    V3_ACTIONS,
    RoundReport,
    SessionView,
    ToSession,
)
from federation.migration.rounds import RoundsCore, after_vm_action
from federation.migration.vocabulary import (
    ActionFailed,
    PrepareIncoming,
    RoundSent,
    SendRound,
)
from federation.vms.actions import VmActions
from mesh import wire
from mesh.core import CancelTimer, Notify, Received, Send, SetTimer, TimerFired
from sim.hosts.migration_vms import LAYOUT, SimBackend, VmWorld

__all__ = ["RoundPair", "VM", "MID", "SRC", "TGT"]

VM, MID, SRC, TGT = "vm", "m-1", "a", "b"


class RoundPair:
    def __init__(self, version: int = 1) -> None:
        self.now = 0.0
        self.version = version
        self.world = VmWorld(lambda: self.now)
        self.backends = {dc: SimBackend(self.world, dc, lambda vm: SRC) for dc in (SRC, TGT)}
        copy = self.world.create(SRC, VM)
        self.backends[SRC].run(copy)
        self.vm = {dc: VmActions(b) for dc, b in self.backends.items()}
        self.done = {SRC: False, TGT: False}
        self.cores = {dc: RoundsCore(dc, lambda mid, dc=dc: self.view(dc, mid))
                      for dc in (SRC, TGT)}
        #: (from, to, message) sent and not delivered yet
        self.net: list[tuple[str, str, Any]] = []
        self.timers: dict[str, dict[Any, float]] = {SRC: {}, TGT: {}}
        self.to_session: dict[str, list[object]] = {SRC: [], TGT: []}
        self.reports: list[RoundReport] = []
        #: the V3 actions the cores asked of their data planes
        self.v3: dict[str, list[object]] = {SRC: [], TGT: []}

    def view(self, dc: str, mid: str) -> SessionView | None:
        return SessionView(VM, SRC, TGT, self.done[dc]) if mid == MID else None

    # ------------------------------------------------------------------ driving

    def feed(self, dc: str, event: object) -> None:
        self.run(dc, self.cores[dc].handle(self.now, event))

    def run(self, dc: str, actions: list[Any]) -> None:
        for a in actions:
            if isinstance(a, Send):
                raw = wire.encode(a.message)
                self.net.append((dc, a.peer, wire.decode(raw)))
            elif isinstance(a, SetTimer):
                self.timers[dc][a.key] = a.at
            elif isinstance(a, CancelTimer):
                self.timers[dc].pop(a.key, None)
            elif isinstance(a, ToSession):
                assert a.migration_id == MID
                self.to_session[dc].append(a.event)
            elif isinstance(a, PAGE_ACTIONS):
                for reply in self.vm[dc].carry_out_pages(a):
                    self.feed(dc, reply)
            elif isinstance(a, RoundReport):
                self.reports.append(a)
            elif isinstance(a, V3_ACTIONS):
                self.v3[dc].append(a)
            else:
                assert isinstance(a, Notify), f"unexpected action {a!r}"

    def prepare(self, error: str = "") -> None:
        """The target's incoming images are prepared (or could not be: ``error``)."""
        action = PrepareIncoming(VM, MID, LAYOUT, self.version)
        replies: list[Any] = ([ActionFailed("PrepareIncoming", error)] if error
                              else self.vm[TGT].carry_out(action))
        for news in after_vm_action(action, replies):
            self.feed(TGT, news)

    def send_round(self, round_: int, *, final: bool = False) -> None:
        self.feed(SRC, SendRound(MID, VM, round_, round_ > 1, final, self.version))

    def deliver(self, i: int = 0, *, duplicate: bool = False) -> None:
        src, dst, msg = self.net[i] if duplicate else self.net.pop(i)
        self.feed(dst, Received(src, msg))

    def deliver_all(self, limit: int = 10_000) -> None:
        for _ in range(limit):
            if not self.net:
                return
            self.deliver(0)
        raise AssertionError("the network never went quiet")

    def fire(self, dc: str, what: str) -> bool:
        """Fire ``dc``'s rounds timers named ``what`` (the clock moves to them)."""
        due = [(at, k) for k, at in self.timers[dc].items()
               if isinstance(k, tuple) and k[-1] == what]
        for at, key in sorted(due, key=repr):
            if key in self.timers[dc]:
                del self.timers[dc][key]
                self.now = max(self.now, at)
                self.feed(dc, TimerFired(key))
        return bool(due)

    # ------------------------------------------------------------------ reading

    def sent(self) -> list[RoundSent]:
        return [e for e in self.to_session[SRC] if isinstance(e, RoundSent)]

    def failures(self) -> list[ActionFailed]:
        return [e for e in self.to_session[SRC] if isinstance(e, ActionFailed)]

    def source_pages(self) -> list[int]:
        return list(self.world.copies[(SRC, VM)].pages)

    def target_pages(self) -> list[int]:
        return self.world.incoming[(TGT, VM)].pages()

    def write(self, page: int) -> None:
        """The guest writes ``page`` (a new value, dirty in the current generation)."""
        self.world.write(self.world.copies[(SRC, VM)], page)
