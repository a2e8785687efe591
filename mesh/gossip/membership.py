"""SWIM membership with the Lifeguard refinements, as a sans-I/O core.

Sources: Das, Gupta, Motivala, "SWIM: Scalable Weakly-consistent Infection-style
Process Group Membership Protocol", DSN 2002 (probe, ping-req through k members,
suspicion, incarnations, piggybacked dissemination); Dadgar, Phillips, Currey,
"Lifeguard: Local Health Awareness for More Accurate Failure Detection",
arXiv:1707.00788 (local health multiplier, nacks, suspicion timeouts that shrink with
independent confirmations, the buddy system); HashiCorp memberlist, whose
``DefaultLANConfig``/``DefaultWANConfig`` give the constants of
:class:`~mesh.gossip.members.SwimConfig` (the states, config and member record live there).

One protocol period: ping the next member of a shuffled round; no ack within the
probe timeout -> ask ``indirect_checks`` members to ping it (they nack if it stays
silent); nothing by the end of the round -> suspect it. A suspicion becomes a death
after a timeout that starts at ``suspicion_max_mult`` times the minimum and falls
towards the minimum as other members independently suspect the same incarnation.
A member that hears it is suspected or dead refutes with a higher incarnation.
Updates ride on every ping, ack and gossip packet, each retransmitted
``retransmit_mult * ceil(log10(N + 1))`` times; a full-state sync with a random member
every ``push_pull_interval`` repairs whatever gossip missed.

The link-state table (mesh.links.estimates) rides on the same packets with its own
budget, sized for issue 18's N = 64 (control traffic <= 50 kbit/s per DC, update
convergence p99.9 <= 5 s): a link entry is passed on ``link_transmit_mult *
ceil(log10(N + 1))`` times, at most ``link_queue_mult * N`` of them wait in the queue
(the oldest leave it), and every ``link_sync_interval`` a DC sends a random member its
link digest alone (a ``Sync`` with no member statements) and gets back only the entries
it lacks: the (entry, DC) pairs gossip misses wait seconds, not a push/pull. A joining
DC asks ``join_syncs`` peers, not all, for their whole state; a suspicion's
confirmations are passed on only up to Lifeguard's K (more do not shorten a timeout).

Departures from memberlist, each for a reason stated where it is made: a member
probes suspects before its round-robin (faster independent confirmations, and the
buddy system reaches the suspect sooner); an ack straight from a member carrying a
higher incarnation than we hold asks it for its signed state (a sync); a member heard
from directly in the last ``evidence_window`` seconds is not suspected on the word of a
stale sync, and a dead member heard from directly is sent a sync at once so it can
refute (reconnect).

Gossip speaks only for its origin (:mod:`mesh.gossip.statements`): every update is a
statement signed by its speaker and passed on unchanged: a member's ``ALIVE``/``LEFT``
by the member, an accusation by its accuser (named in ``source``). A DC raises only its
own incarnation; an accusation may name at most ``ACCUSATION_STEP`` above the accused's
incarnation and the refutation (one above the accusation) always fits the range and
always wins. A ``DEAD`` heard in a sync only makes us suspect, credited to the DC that
signed it, and is not gossiped on. A peer's sync requests are answered at most
``SYNC_REPLY_BURST`` at once and one per ``SYNC_REPLY_EVERY`` seconds after that.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from mesh.core import Action, CancelTimer, Event, Notify, Received, Send, SetTimer, TimerFired
from mesh.gossip.control_msgs import (
    PIGGYBACK_MAX,
    SYNC_MAX,
    Ack,
    Gossip,
    LinkEntry,
    MemberUpdate,
    Nack,
    Ping,
    PingReq,
    Signed,
    Sync,
)
from mesh.gossip.members import LinkSync, Member, MembershipError, State, SwimConfig
from mesh.gossip.statements import (
    ACCUSATION_STEP,
    COUNTER_MAX,
    SELF_STEP,
    Statements,
    TokenBucket,
)
from mesh.gossip.transmit_queue import TransmitQueue

__all__ = ["State", "SwimConfig", "Member", "Membership", "LinkSync", "MembershipError"]


_DEFAULTS = SwimConfig()
#: Sync replies a peer gets at once, then one per SYNC_REPLY_EVERY seconds. An honest
#: peer asks when it starts, every push_pull_interval (30 s, one random member), and
#: when it hears from a member it holds dead (at most every reconnect_interval, 5 s): a
#: burst of 4 and one every 2 s never holds it back, and bounds what a liar's requests
#: make us send (a sync reply can be several messages of up to 1 MiB).
SYNC_REPLY_BURST = 4
SYNC_REPLY_EVERY = 2.0


@attrs.define
class _Round:
    target: str
    started: float
    helpers: int = 0
    nacks: int = 0


class Membership:
    """The SWIM core of DC ``me`` among ``peers`` (the federation's other DCs)."""

    def __init__(
        self,
        me: str,
        peers: Sequence[str],
        rng: random.Random,
        config: SwimConfig = _DEFAULTS,
        links: LinkSync | None = None,
        probe_timeout: Callable[[str], float | None] | None = None,
        peer_rtt: Callable[[str, str], float | None] | None = None,
        *,
        statements: Statements,
    ) -> None:
        if me in peers:
            raise ValueError(f"membership of {me!r}: the peer list contains itself")
        if statements.me != me:
            raise ValueError(f"membership of {me!r} with the statements of {statements.me!r}")
        self.me = me
        self.statements = statements
        self.cfg = config
        self.rng = rng
        self.links = links
        self._rto = probe_timeout
        self._peer_rtt = peer_rtt
        self.incarnation = 0
        self.leaving = False
        self.members: dict[str, Member] = {p: Member(p) for p in sorted(peers)}
        self.awareness = 0
        #: link entries queued at most link_queue_mult * N (see SwimConfig)
        self.queue = TransmitQueue(link_depth=config.link_queue_mult * (len(peers) + 1))
        self.counters: dict[str, int] = {
            "probes": 0, "probe_failures": 0, "suspicions": 0, "deaths": 0, "refutes": 0,
        }
        self._seq = 0
        self._order: list[str] = []
        self._rounds: dict[int, _Round] = {}
        # my seq -> (requester, its seq, target, since)
        self._relays: dict[int, tuple[str, int, str, float]] = {}
        self._heard: dict[str, float] = {}
        self._soon: list[str] = []
        self._reconnect: dict[str, float] = {}
        #: peers sent a reconnect sync (note_heard) whose reply we push nothing back to
        self._pull_only: dict[str, float] = {}
        self._sync_replies: dict[str, TokenBucket] = {}
        self._said: tuple[tuple[int, bool], Signed] | None = None

    # ------------------------------------------------------------------ queries

    def state_of(self, name: str) -> State:
        if name == self.me:
            return State.LEFT if self.leaving else State.ALIVE
        return self.members[name].state

    def live(self) -> list[str]:
        """Members alive or suspect (a suspect may be alive: SWIM keeps talking to it)."""
        return [m.name for m in self.members.values() if m.state <= State.SUSPECT]

    def n_estimate(self) -> int:
        return 1 + len(self.live())

    def transmit_limit(self) -> int:
        """memberlist retransmitLimit: RetransmitMult * ceil(log10(N + 1))."""
        limit = self.cfg.retransmit_mult * math.ceil(math.log10(self.n_estimate() + 1))
        return max(limit, self.cfg.min_transmits)

    def link_transmit_limit(self) -> int:
        """How many times this DC passes on one link entry: link_transmit_mult *
        ceil(log10(N + 1)), the lambda * log N of SWIM §4.1 with a smaller lambda than
        member updates get (see SwimConfig.link_transmit_mult)."""
        return self.cfg.link_transmit_mult * math.ceil(math.log10(self.n_estimate() + 1))

    # ------------------------------------------------------------------ driver entry

    def start(self, now: float) -> list[Action]:
        """Join: announce ourselves to every configured peer (our own statement in a sync
        that asks for nothing back) and sync fully with ``join_syncs`` of them."""
        self._broadcast_self()
        names = list(self.members)
        full = set(self.rng.sample(names, min(self.cfg.join_syncs, len(names))))
        out: list[Action] = [
            SetTimer(("swim", "probe"), now + self.rng.uniform(0, self.cfg.probe_interval)),
            SetTimer(("swim", "gossip"), now + self.rng.uniform(0, self.cfg.gossip_interval)),
            SetTimer(("swim", "sync"), now + self._push_pull_interval()),
        ]
        if self.links is not None:
            out.append(SetTimer(("swim", "link-sync"),
                                now + self.rng.uniform(0, self.cfg.link_sync_interval)))
        hello = Sync(False, (self._own_statement(),), (), ())
        for name in self.members:
            out.append(Send(name, self._sync_message(reply=True) if name in full else hello))
        return out

    def leave(self, now: float) -> list[Action]:
        """Graceful leave: a higher incarnation in state LEFT, gossiped to everyone."""
        self.leaving = True
        self.incarnation += 1
        self.queue.put(("m", self.me), self._own_statement(), prio=True)
        out: list[Action] = [Notify("member", {"name": self.me, "state": "left"})]
        for name in self.live():
            out.append(Send(name, self._gossip_for(name)))
        return out

    def handle(self, now: float, event: Event) -> list[Action]:
        if isinstance(event, TimerFired):
            key = event.key
            if not (isinstance(key, tuple) and key and key[0] == "swim"):
                return []
            return self._timer(now, key)
        if isinstance(event, Received):
            return self._received(now, event.peer, event.message)
        return []

    def note_heard(self, now: float, peer: str) -> list[Action]:
        """Any message straight from ``peer`` (also a link probe) is evidence it lives."""
        member = self.members.get(peer)
        if member is None:
            return []
        self._heard[peer] = now
        if member.state >= State.DEAD and not self.leaving:
            last = self._reconnect.get(peer)
            if last is None or now - last >= self.cfg.reconnect_interval:
                self._reconnect[peer] = now
                # A member back from the dead is heard by every DC at once, and each
                # reconnects; it asks join_syncs of them for the whole link table itself,
                # so this exchange pulls what we lack but pushes nothing back (_sync).
                self._pull_only[peer] = now
                return [Send(peer, self._sync_message(reply=True))]
        return []

    def probe_soon(self, name: str) -> None:
        """Probe ``name`` at the next protocol period, before the round-robin: other
        evidence (its link probes fell silent) says it may have failed. An early probe
        only moves SWIM's own check forward; the verdict is still SWIM's."""
        member = self.members.get(name)
        if member is not None and member.state == State.ALIVE and name not in self._soon:
            self._soon.append(name)

    def broadcast_link(self, entry: LinkEntry, signed: Signed, holder: str | None = None
                       ) -> None:
        """Pass on ``signed`` (``entry`` as its origin signed it) by gossip; ``holder`` is
        the peer it came from."""
        self.queue.put(("l", entry.origin, entry.peer), signed, holder=holder)

    # ------------------------------------------------------------------ timers

    def _timer(self, now: float, key: tuple[Any, ...]) -> list[Action]:
        kind = key[1]
        if kind == "probe":
            return self._probe(now)
        if kind == "gossip":
            return self._gossip(now)
        if kind == "sync":
            return self._push_pull(now)
        if kind == "link-sync":
            return self._link_sync(now)
        if kind == "direct":
            return self._indirect(now, key[2])
        if kind == "round":
            return self._round_end(now, key[2])
        if kind == "nack":
            relay = self._relays.get(key[2])
            return [] if relay is None else [Send(relay[0], Nack(relay[1]))]
        if kind == "suspect":
            return self._suspicion_expired(now, key[2], key[3])
        return []

    def _scale(self) -> int:
        """Lifeguard local health multiplier: timeouts and periods grow with awareness."""
        return self.awareness + 1

    def _timeout(self, target: str) -> float:
        value = self._rto(target) if self._rto is not None else None
        if value is None:
            value = self.cfg.probe_timeout_initial
        value = min(max(value, self.cfg.probe_timeout_min), self.cfg.probe_timeout_max)
        return value * self._scale()

    def _prune_relays(self, now: float) -> None:
        # No requester waits longer than two maximal probe timeouts at full awareness.
        horizon = 2 * self.cfg.probe_timeout_max * self.cfg.awareness_max
        for seq in [s for s, r in self._relays.items() if now - r[3] > horizon]:
            del self._relays[seq]

    def _relay_time(self, helper: str, target: str) -> float:
        """How long ``helper``'s probe of ``target`` may take: its RTT there (from the
        link table) with RFC 6298's initial-RTO floor of safety, else our own timeout."""
        rtt = self._peer_rtt(helper, target) if self._peer_rtt is not None else None
        if rtt is None:
            return self._timeout(target)
        value = min(max(2 * rtt, self.cfg.probe_timeout_min), self.cfg.probe_timeout_max)
        return value * self._scale()

    def _next_target(self) -> str | None:
        # Suspects first: each such probe is an independent confirmation or a chance for
        # the suspect to refute (Lifeguard's buddy system), instead of waiting N periods.
        for m in self.members.values():
            if m.state == State.SUSPECT and not m.probed_in_suspicion:
                m.probed_in_suspicion = True
                return m.name
        while self._soon:
            name = self._soon.pop(0)
            if self.members[name].state <= State.SUSPECT:
                return name
        for _ in range(2):
            while self._order:
                name = self._order.pop()
                if self.members[name].state <= State.SUSPECT:
                    return name
            # SWIM §4.3: a new round-robin over a fresh random permutation.
            self._order = sorted(self.members)
            self.rng.shuffle(self._order)
        return None

    def _probe(self, now: float) -> list[Action]:
        out: list[Action] = [
            SetTimer(("swim", "probe"), now + self.cfg.probe_interval * self._scale())
        ]
        if self.leaving:
            return out
        target = self._next_target()
        if target is None:
            return out
        self._seq += 1
        seq = self._seq
        self.counters["probes"] += 1
        self._rounds[seq] = _Round(target, now)
        members, links = self._piggyback(target)
        if self.members[target].state == State.SUSPECT:
            # Lifeguard buddy system: tell the suspect first, so it can refute.
            suspect = self.members[target]
            buddy = self.statements.sign_member(
                MemberUpdate(target, suspect.incarnation, int(State.SUSPECT), self.me))
            members = (buddy, *members)[:PIGGYBACK_MAX]
        out.append(Send(target, Ping(seq, target, members, links)))
        out.append(SetTimer(("swim", "direct", seq), now + self._timeout(target)))
        return out

    def _indirect(self, now: float, seq: int) -> list[Action]:
        rnd = self._rounds.get(seq)
        if rnd is None:
            return []
        helpers = [n for n in self.live()
                   if n != rnd.target and self.members[n].state == State.ALIVE]
        self.rng.shuffle(helpers)
        helpers = helpers[: self.cfg.indirect_checks]
        rnd.helpers = len(helpers)
        out: list[Action] = [Send(h, PingReq(seq, rnd.target)) for h in helpers]
        # Wait for the slowest helper: our round trip to it plus its probe of the target.
        wait = max([self._timeout(h) + self._relay_time(h, rnd.target) for h in helpers],
                   default=0.0)
        end = max(now + wait, rnd.started + self.cfg.probe_interval * self._scale())
        out.append(SetTimer(("swim", "round", seq), end))
        return out

    def _round_end(self, now: float, seq: int) -> list[Action]:
        rnd = self._rounds.pop(seq, None)
        if rnd is None:
            return []
        self.counters["probe_failures"] += 1
        # memberlist probeNode: missed nacks point at our own health, else +1.
        delta = max(rnd.helpers - rnd.nacks, 0) if rnd.helpers else 1
        self._set_awareness(self.awareness + delta)
        member = self.members[rnd.target]
        if member.state != State.ALIVE and member.state != State.SUSPECT:
            return []
        return self._say(now, MemberUpdate(rnd.target, member.incarnation, int(State.SUSPECT),
                                           self.me))

    def _gossip(self, now: float) -> list[Action]:
        out: list[Action] = [SetTimer(("swim", "gossip"), now + self.cfg.gossip_interval)]
        if not len(self.queue):
            return out
        targets = [
            m.name for m in self.members.values()
            if m.state <= State.SUSPECT
            or (m.state == State.DEAD and now - m.since < self.cfg.gossip_to_dead)
        ]
        self.rng.shuffle(targets)
        for name in targets[: self.cfg.gossip_nodes]:
            msg = self._gossip_for(name)
            if msg.members or msg.links:
                out.append(Send(name, msg))
        return out

    def _push_pull_interval(self) -> float:
        # memberlist pushPullScale: beyond 32 members the interval grows with log2(N/32).
        n = self.n_estimate()
        scale = 1 if n <= 32 else math.ceil(math.log2(n) - math.log2(32)) + 1
        return self.cfg.push_pull_interval * scale

    def _push_pull(self, now: float) -> list[Action]:
        out: list[Action] = [SetTimer(("swim", "sync"), now + self._push_pull_interval())]
        live = self.live()
        if live and not self.leaving:
            out.append(Send(self.rng.choice(live), self._sync_message(reply=True)))
        return out

    def _link_sync(self, now: float) -> list[Action]:
        """Link-state anti-entropy: our link digest alone to a random live member, which
        answers with the entries we lack (and its digest if we hold some it lacks)."""
        out: list[Action] = [SetTimer(("swim", "link-sync"), now + self.cfg.link_sync_interval)]
        live = [n for n in self.live() if self.members[n].state == State.ALIVE]
        if live and not self.leaving and self.links is not None:
            digest = self.links.digest()
            if digest:
                out.append(Send(self.rng.choice(live), Sync(True, (), digest[:SYNC_MAX], ())))
        return out

    def _suspicion_expired(self, now: float, name: str, incarnation: int) -> list[Action]:
        member = self.members.get(name)
        if member is None or member.state != State.SUSPECT or member.incarnation != incarnation:
            return []
        return self._say(now, MemberUpdate(name, incarnation, int(State.DEAD), self.me))

    # ------------------------------------------------------------------ messages

    def _received(self, now: float, peer: str, msg: Any) -> list[Action]:
        if peer not in self.members:
            return [Notify("swim-refused", {"peer": peer, "why": "not a federation member"})]
        out = self.note_heard(now, peer)
        if isinstance(msg, Ping):
            if msg.target != self.me:
                return out + [Notify("swim-refused", {"peer": peer, "why": "ping for another"})]
            out += self._absorb(now, peer, msg.members, msg.links)
            members, links = self._piggyback(peer)
            out.append(Send(peer, Ack(msg.seq, self.me, self.incarnation, members, links)))
        elif isinstance(msg, PingReq):
            if msg.target not in self.members or msg.target == peer:
                return out + [Notify("swim-refused", {"peer": peer, "why": "bad ping-req target"})]
            self._seq += 1
            self._relays[self._seq] = (peer, msg.seq, msg.target, now)
            out.append(Send(msg.target, Ping(self._seq, msg.target, (), ())))
            # memberlist handleIndirectPing: nack when our own probe times out; an ack
            # that comes later is still relayed (until the relay is pruned).
            self._prune_relays(now)
            out.append(SetTimer(("swim", "nack", self._seq), now + self._timeout(msg.target)))
        elif isinstance(msg, Ack):
            out += self._absorb(now, peer, msg.members, msg.links)
            out += self._ack(now, peer, msg)
        elif isinstance(msg, Nack):
            rnd = self._rounds.get(msg.seq)
            if rnd is not None:
                rnd.nacks += 1
        elif isinstance(msg, Gossip):
            out += self._absorb(now, peer, msg.members, msg.links)
        elif isinstance(msg, Sync):
            out += self._sync(now, peer, msg)
        return out

    def _ack(self, now: float, peer: str, msg: Ack) -> list[Action]:
        relay = self._relays.pop(msg.seq, None)
        if relay is not None:
            requester, seq, target, _ = relay
            if peer != target:
                return [Notify("swim-refused", {"peer": peer, "why": "ack for another target"})]
            return [
                CancelTimer(("swim", "nack", msg.seq)),
                Send(requester, Ack(seq, target, msg.incarnation, (), ())),
            ]
        rnd = self._rounds.get(msg.seq)
        if rnd is None or msg.target != rnd.target:
            return []
        del self._rounds[msg.seq]
        self._set_awareness(self.awareness - 1)
        out: list[Action] = [CancelTimer(("swim", "direct", msg.seq)),
                             CancelTimer(("swim", "round", msg.seq))]
        member = self.members[rnd.target]
        if peer == rnd.target and msg.incarnation > member.incarnation:
            # The member is further along than we know, and its signed word on that did
            # not come with this ack (a refutation rides first on it): ask for its state.
            last = self._reconnect.get(peer)
            if last is None or now - last >= self.cfg.reconnect_interval:
                self._reconnect[peer] = now
                out.append(Send(peer, self._sync_message(reply=True)))
        return out

    def _absorb(
        self, now: float, peer: str, members: Sequence[Signed], links: Sequence[Signed]
    ) -> list[Action]:
        out: list[Action] = []
        for signed in members:
            upd = self.statements.open_member(now, peer, signed)
            if upd is not None:
                out += self._apply(now, upd, signed, via=peer)
        self._merge_links(now, peer, links)
        return out

    def _merge_links(self, now: float, peer: str, links: Sequence[Signed]) -> None:
        if not links or self.links is None:
            return
        adopted = self.links.merge(now, peer, links)
        for entry, signed in adopted:
            self.broadcast_link(entry, signed, holder=peer)
        if len(adopted) < len(links):  # the others ``peer`` holds too: no need to send them
            for signed in links:
                known = self.statements.known(signed)
                if isinstance(known, LinkEntry):
                    self.queue.held_by(("l", known.origin, known.peer), signed, peer,
                                       len(self.members))

    def _sync(self, now: float, peer: str, msg: Sync) -> list[Action]:
        out: list[Action] = []
        for signed in msg.members:
            upd = self.statements.open_member(now, peer, signed)
            if upd is None:
                continue
            if upd.name == self.me or upd.name not in self.members:
                out += self._apply(now, upd, signed, via=peer)
                continue
            state = State(upd.state)
            if state >= State.DEAD and state != State.LEFT:
                # memberlist mergeState: a remote "dead" only makes us suspect...
                if now - self._heard.get(upd.name, -math.inf) < self.cfg.evidence_window:
                    continue  # ...and not even that if we heard from it just now.
                # ...credited to the DC that signed the death; not gossiped on (we hold
                # no signed suspicion to pass), but said in our own syncs as it was said.
                upd = MemberUpdate(upd.name, upd.incarnation, int(State.SUSPECT), upd.source)
                out += self._apply(now, upd, signed, via=peer, forward=False)
                continue
            out += self._apply(now, upd, signed, via=peer)
        self._merge_links(now, peer, msg.links)
        if msg.reply and not self._may_reply(now, peer):
            self.statements.refuse("rate_limited")
        elif msg.reply and not msg.members and msg.digest and self.links is not None:
            # A link-only anti-entropy request (_link_sync): the entries it lacks, and our
            # digest only if it holds some we lack; nothing at all when both agree.
            links = self.links.entries_newer_than(msg.digest)
            digest = self.links.digest() if self.links.lacks(msg.digest) else ()
            if links or digest:
                out.append(Send(peer, Sync(False, (), digest[:SYNC_MAX],
                                           tuple(links[:SYNC_MAX]))))
            for i in range(SYNC_MAX, len(links), SYNC_MAX):
                out.append(Send(peer, Sync(False, (), (), tuple(links[i : i + SYNC_MAX]))))
        elif msg.reply:
            reply = self._sync_message(reply=False)
            links = self.links.entries_newer_than(msg.digest) if self.links is not None else []
            out.append(Send(peer, Sync(False, reply.members, reply.digest,
                                       tuple(links[:SYNC_MAX]))))
            # The rest of a large table follows without a digest (which ends the exchange).
            for i in range(SYNC_MAX, len(links), SYNC_MAX):
                out.append(Send(peer, Sync(False, (), (), tuple(links[i : i + SYNC_MAX]))))
        elif self.links is not None and msg.digest:
            # The reply to our sync: send back what the replier lacks (a message without
            # a digest ends the exchange), unless ours was a reconnect to a member back
            # from the dead: every DC that held it dead reconnects as soon as it hears
            # from it, and each pushed it the whole link table (at N = 64 ~4,000 signed
            # entries, ~400 kB a copy). Measured in crash-one N = 64 seed 20: 12.3 MB of
            # link entries in sync messages in the second after the crashed DC's restart,
            # 60 of the run's 92 kbit/s per DC (docs/BENCHMARKS.md). It gets the table
            # from its own join_syncs and from link anti-entropy instead.
            asked = self._pull_only.pop(peer, None)
            if asked is not None and now - asked <= self.cfg.reconnect_interval:
                return out
            extra = self.links.entries_newer_than(msg.digest)
            for i in range(0, len(extra), SYNC_MAX):
                out.append(Send(peer, Sync(False, (), (), tuple(extra[i : i + SYNC_MAX]))))
        return out

    def _may_reply(self, now: float, peer: str) -> bool:
        bucket = self._sync_replies.get(peer)
        if bucket is None:
            bucket = self._sync_replies[peer] = TokenBucket(
                SYNC_REPLY_BURST, 1 / SYNC_REPLY_EVERY, at=now)
        return bucket.take(now)

    def _sync_message(self, reply: bool) -> Sync:
        members = [self._own_statement()]
        for m in self.members.values():
            members.extend(m.statements())
        digest = self.links.digest() if self.links is not None else ()
        return Sync(reply, tuple(members[:SYNC_MAX]), digest[:SYNC_MAX], ())

    # ------------------------------------------------------------------ state machine

    def _own_statement(self) -> Signed:
        """Our own ALIVE (or LEFT) at our incarnation, signed once per change."""
        key = (self.incarnation, self.leaving)
        if self._said is None or self._said[0] != key:
            state = State.LEFT if self.leaving else State.ALIVE
            update = MemberUpdate(self.me, self.incarnation, int(state), self.me)
            self._said = (key, self.statements.sign_member(update))
        return self._said[1]

    def _broadcast_self(self) -> None:
        self.queue.put(("m", self.me), self._own_statement())

    def _say(self, now: float, update: MemberUpdate) -> list[Action]:
        """Sign an accusation of our own and act on it as on anyone's."""
        return self._apply(now, update, self.statements.sign_member(update), via=self.me)

    def _in_range(self, upd: MemberUpdate, state: State, known: int) -> bool:
        """The bounds of mesh.gossip.statements: a member's own statement steps at most
        SELF_STEP above what we hold, an accusation ACCUSATION_STEP; nothing reaches the
        top of the range, and an accusation stays below it so its refutation fits."""
        own = state in (State.ALIVE, State.LEFT)
        step, top = (SELF_STEP, COUNTER_MAX) if own else (ACCUSATION_STEP, COUNTER_MAX - 1)
        if upd.incarnation > min(known + step, top):
            self.statements.refuse("out_of_range")
            return False
        return True

    def _set_awareness(self, value: int) -> None:
        self.awareness = min(max(value, 0), self.cfg.awareness_max - 1)

    def _apply(
        self, now: float, upd: MemberUpdate, signed: Signed, via: str, forward: bool = True
    ) -> list[Action]:
        """SWIM/memberlist precedence rules for one update (``signed`` is it as its speaker
        signed it, checked); returns what follows. ``forward``: pass it on by gossip."""
        try:
            state = State(upd.state)
        except ValueError:
            raise MembershipError(f"peer {via}: unknown member state {upd.state}") from None
        if upd.name == self.me:
            if not self._in_range(upd, state, self.incarnation):
                return [Notify("swim-refused", {"peer": via, "why": "incarnation out of range"})]
            return self._about_me(upd, state)
        member = self.members.get(upd.name)
        if member is None:
            return [Notify("swim-refused", {"peer": via, "why": f"unknown member {upd.name!r}"})]
        if not self._in_range(upd, state, member.incarnation):
            return [Notify("swim-refused", {"peer": via, "why": "incarnation out of range"})]
        if state == State.ALIVE:
            if upd.incarnation <= member.incarnation:
                return []
            return self._transition(now, member, State.ALIVE, upd.incarnation, signed)
        if state == State.SUSPECT:
            if upd.incarnation < member.incarnation or member.state >= State.DEAD:
                return []
            if member.state == State.SUSPECT and upd.incarnation == member.incarnation:
                return self._confirm(now, member, upd.source, signed if forward else None)
            out = self._transition(now, member, State.SUSPECT, upd.incarnation, signed)
            member.confirmations = [upd.source]
            member.suspected_at = now
            member.probed_in_suspicion = upd.source == self.me
            self.counters["suspicions"] += 1
            if forward:
                self.queue.put(("m", member.name), signed)
            out.append(self._suspicion_timer(member))
            return out
        # DEAD or LEFT; a dead member may still be learned to have left.
        if upd.incarnation < member.incarnation or member.state == State.LEFT:
            return []
        if member.state == State.DEAD and state == State.DEAD:
            return []
        return self._transition(now, member, state, upd.incarnation, signed)

    def _about_me(self, upd: MemberUpdate, state: State) -> list[Action]:
        if upd.source == self.me:
            # Our own word from before a restart (others kept it): continue above it.
            if upd.incarnation > self.incarnation:
                self.incarnation = upd.incarnation
            if state != State.LEFT or self.leaving or upd.incarnation < self.incarnation:
                return []
        elif self.leaving or upd.incarnation < self.incarnation:
            return []
        # SWIM §4.2: refute with a higher incarnation. Lifeguard: a suspicion of us is a
        # hint that we are the slow one, so raise our local health multiplier.
        self.incarnation = upd.incarnation + 1
        self.counters["refutes"] += 1
        self._set_awareness(self.awareness + 1)
        self.queue.put(("m", self.me), self._own_statement(), prio=True)
        was = State(state).name.lower()
        return [Notify("refute", {"incarnation": self.incarnation, "was": was})]

    def _transition(
        self, now: float, member: Member, state: State, inc: int, signed: Signed
    ) -> list[Action]:
        old, old_inc = member.state, member.incarnation
        member.incarnation = inc
        member.state = state
        if state in (State.ALIVE, State.LEFT):
            member.said, member.charge = signed, None
        else:
            member.charge = signed
        out: list[Action] = []
        if old == State.SUSPECT:
            out.append(CancelTimer(("swim", "suspect", member.name, old_inc)))
        if old != state:
            member.since = now
        if state != State.SUSPECT:
            self.queue.put(("m", member.name), signed)
        if state == State.DEAD and old != State.DEAD:
            self.counters["deaths"] += 1
        if old != state:
            out.append(Notify("member", {"name": member.name, "state": state.name.lower(),
                                         "incarnation": inc}))
        return out

    def _suspicion_bounds(self) -> tuple[float, float, int]:
        n = self.n_estimate()
        # memberlist suspicionTimeout: SuspicionMult * max(1, log10(N)) * ProbeInterval.
        lo = self.cfg.suspicion_mult * max(1.0, math.log10(max(1, n))) * self.cfg.probe_interval
        hi = self.cfg.suspicion_max_mult * lo
        # memberlist: k = SuspicionMult - 2 confirmations expected, none in tiny clusters.
        k = self.cfg.suspicion_mult - 2
        return lo, hi, (k if n - 2 >= k else 0)

    def suspicion_timeout(self, confirmations: int) -> float:
        """Lifeguard §IV-B: max - (max - min) * log(C + 1) / log(K + 1), floored at min."""
        lo, hi, k = self._suspicion_bounds()
        if k < 1:
            return lo
        frac = math.log(confirmations + 1) / math.log(k + 1)
        return max(lo, hi - (hi - lo) * frac)

    def _suspicion_timer(self, member: Member) -> SetTimer:
        extra = len(member.confirmations) - 1  # the first suspector is not a confirmation
        at = member.suspected_at + self.suspicion_timeout(extra)
        return SetTimer(("swim", "suspect", member.name, member.incarnation), at)

    def _confirm(
        self, now: float, member: Member, source: str, signed: Signed | None
    ) -> list[Action]:
        """Another accuser of the same incarnation (``signed``: its accusation, to pass
        on; None for one heard in a sync)."""
        if source in member.confirmations:
            return []
        member.confirmations.append(source)
        # Lifeguard: the timeout reaches its minimum at K independent confirmations, so
        # more carry nothing; pass on the first K only (memberlist passes on every one:
        # at N = 64 a crash made each of 63 accusations be sent 12 times by every DC).
        _, _, k = self._suspicion_bounds()
        if signed is not None and len(member.confirmations) <= k + 1:
            self.queue.put(("m", member.name, source), signed)
        return [self._suspicion_timer(member)]

    # ------------------------------------------------------------------ dissemination

    def _piggyback(self, peer: str) -> tuple[tuple[Signed, ...], tuple[Signed, ...]]:
        members, links = self.queue.take(PIGGYBACK_MAX, self.transmit_limit(), peer,
                                         len(self.members), self.link_transmit_limit())
        return tuple(members), tuple(links)

    def _gossip_for(self, peer: str) -> Gossip:
        members, links = self._piggyback(peer)
        return Gossip(members, links)
