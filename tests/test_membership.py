"""SWIM + Lifeguard membership core (mesh.gossip.membership): unit tests of each rule."""

from __future__ import annotations

import random

import pytest

from mesh import wire
from mesh.core import CancelTimer, Notify, Received, Send, SetTimer, TimerFired
from mesh.gossip.control_msgs import Ack, Gossip, MemberUpdate, Nack, Ping, PingReq, Signed, Sync
from mesh.gossip.membership import Membership, MembershipError, State, SwimConfig
from tests.harness.gossip import member_of, said, said_link, statements_for

PEERS = ["b", "c", "d", "e"]


def make(me: str = "a", peers: list[str] | None = None, **kw: object) -> Membership:
    names = peers if peers is not None else PEERS
    return Membership(me, names, random.Random(1), statements=statements_for(me, names),
                      **kw)  # type: ignore[arg-type]


def sends(actions: list, cls: type | None = None) -> list[Send]:
    return [a for a in actions
            if isinstance(a, Send) and (cls is None or isinstance(a.message, cls))]


def timers(actions: list) -> dict:
    return {a.key: a.at for a in actions if isinstance(a, SetTimer)}


def notes(actions: list, kind: str) -> list:
    return [a.detail for a in actions if isinstance(a, Notify) and a.kind == kind]


def upd(name: str, inc: int, state: State, source: str) -> Signed:
    """The update, signed by ``source`` (its speaker)."""
    return said(MemberUpdate(name, inc, int(state), source))


def probe_once(m: Membership, now: float = 10.0) -> tuple[int, str, list]:
    out = m.handle(now, TimerFired(("swim", "probe")))
    (ping,) = sends(out, Ping)
    return ping.message.seq, ping.peer, out


def fail_round(m: Membership, now: float = 10.0) -> tuple[str, list]:
    seq, target, _ = probe_once(m, now)
    out = m.handle(now + 0.5, TimerFired(("swim", "direct", seq)))
    assert len(sends(out, PingReq)) == min(3, len(m.members) - 1)
    return target, m.handle(now + 3.0, TimerFired(("swim", "round", seq)))


def test_start_joins_every_peer_and_sets_timers() -> None:
    m = make()
    out = m.start(0.0)
    syncs = sends(out, Sync)
    assert sorted(s.peer for s in syncs) == PEERS  # every peer hears our own statement
    assert all(s.message.members for s in syncs)
    assert sum(s.message.reply for s in syncs) == min(m.cfg.join_syncs, len(PEERS))
    keys = set(timers(out))
    assert {("swim", "probe"), ("swim", "gossip"), ("swim", "sync")} <= keys


def test_acked_probe_keeps_member_alive_and_lowers_awareness() -> None:
    m = make()
    m.awareness = 2
    seq, target, out = probe_once(m)
    assert ("swim", "direct", seq) in timers(out)
    out = m.handle(10.1, Received(target, Ack(seq, target, 0, (), ())))
    assert CancelTimer(("swim", "direct", seq)) in out
    assert m.awareness == 1
    assert m.state_of(target) == State.ALIVE
    assert m.handle(11.0, TimerFired(("swim", "round", seq))) == []  # the round is over


def test_failed_probe_suspects_and_sets_the_max_suspicion_timeout() -> None:
    m = make()
    target, out = fail_round(m)
    assert m.state_of(target) == State.SUSPECT
    assert notes(out, "member") == [{"name": target, "state": "suspect", "incarnation": 0}]
    key = ("swim", "suspect", target, 0)
    # no confirmation yet: Lifeguard's maximum, SuspicionMaxTimeoutMult * min
    assert timers(out)[key] == pytest.approx(13.0 + m.suspicion_timeout(0))
    assert m.suspicion_timeout(0) == pytest.approx(6 * m.suspicion_timeout(10))
    assert m.awareness == 3  # three helpers asked, no nack came back: our own health


def test_nacks_spare_our_own_health() -> None:
    m = make()
    seq, _, _ = probe_once(m)
    out = m.handle(10.5, TimerFired(("swim", "direct", seq)))
    for s in sends(out, PingReq):
        m.handle(11.0, Received(s.peer, Nack(seq)))
    m.handle(13.0, TimerFired(("swim", "round", seq)))
    assert m.awareness == 0


def test_suspicion_timeout_shrinks_with_independent_confirmations() -> None:
    m = make(peers=[f"p{i:02d}" for i in range(15)], me="me")
    lo = m.cfg.suspicion_mult * 1.2041199826559248 * m.cfg.probe_interval  # log10(16)
    assert m.suspicion_timeout(0) == pytest.approx(6 * lo)
    assert m.suspicion_timeout(1) < m.suspicion_timeout(0)
    assert m.suspicion_timeout(2) == pytest.approx(lo)  # K = SuspicionMult - 2 = 2
    assert m.suspicion_timeout(9) == pytest.approx(lo)
    out = m.handle(5.0, Received("p01", Gossip((upd("p03", 0, State.SUSPECT, "p01"),), ())))
    first = timers(out)[("swim", "suspect", "p03", 0)]
    out = m.handle(6.0, Received("p02", Gossip((upd("p03", 0, State.SUSPECT, "p02"),), ())))
    second = timers(out)[("swim", "suspect", "p03", 0)]
    out = m.handle(6.5, Received("p04", Gossip((upd("p03", 0, State.SUSPECT, "p02"),), ())))
    assert timers(out) == {}  # the same confirmer twice counts once
    out = m.handle(7.0, Received("p05", Gossip((upd("p03", 0, State.SUSPECT, "p05"),), ())))
    third = timers(out)[("swim", "suspect", "p03", 0)]
    assert first > second > third == pytest.approx(5.0 + lo)
    out = m.handle(third, TimerFired(("swim", "suspect", "p03", 0)))
    assert m.state_of("p03") == State.DEAD
    assert notes(out, "member")[0]["state"] == "dead"


def test_refutation_raises_incarnation_and_goes_first() -> None:
    m = make()
    out = m.handle(1.0, Received("b", Gossip((upd("a", 0, State.SUSPECT, "b"),), ())))
    assert m.incarnation == 1
    assert notes(out, "refute") == [{"incarnation": 1, "was": "suspect"}]
    members, _ = m.queue.take(16, 8)
    assert members[0] == upd("a", 1, State.ALIVE, "a")
    m.handle(2.0, Received("c", Gossip((upd("a", 4, State.DEAD, "c"),), ())))
    assert m.incarnation == 5
    m.handle(3.0, Received("c", Gossip((upd("a", 2, State.SUSPECT, "c"),), ())))
    assert m.incarnation == 5  # an old rumour needs no refutation


def test_alive_with_higher_incarnation_clears_suspicion_and_cancels_timer() -> None:
    m = make()
    m.handle(1.0, Received("b", Gossip((upd("c", 3, State.SUSPECT, "b"),), ())))
    assert m.state_of("c") == State.SUSPECT
    out = m.handle(1.5, Received("d", Gossip((upd("c", 3, State.ALIVE, "c"),), ())))
    assert m.state_of("c") == State.SUSPECT  # same incarnation: not a refutation
    out = m.handle(2.0, Received("d", Gossip((upd("c", 4, State.ALIVE, "c"),), ())))
    assert m.state_of("c") == State.ALIVE
    assert CancelTimer(("swim", "suspect", "c", 3)) in out


def test_ack_from_the_suspect_itself_refutes() -> None:
    m = make()
    m.handle(1.0, Received("b", Gossip((upd("c", 0, State.SUSPECT, "b"),), ())))
    out = m.handle(2.0, TimerFired(("swim", "probe")))
    (ping,) = sends(out, Ping)
    assert ping.peer == "c"  # suspects are probed first
    assert ping.message.members[0] == upd("c", 0, State.SUSPECT, "a")  # buddy system
    # the refutation rides first on the suspect's ack
    refute = upd("c", 1, State.ALIVE, "c")
    m.handle(2.1, Received("c", Ack(ping.message.seq, "c", 1, (refute,), ())))
    assert m.state_of("c") == State.ALIVE and m.members["c"].incarnation == 1


def test_an_ack_with_a_bare_higher_incarnation_asks_for_the_signed_state() -> None:
    m = make()
    seq, target, _ = probe_once(m, 1.0)
    out = m.handle(1.1, Received(target, Ack(seq, target, 7, (), ())))
    assert m.members[target].incarnation == 0  # an unsigned number changes nothing...
    assert [s.peer for s in sends(out, Sync)] == [target]  # ...but asks the member


def test_dead_is_final_until_a_higher_incarnation() -> None:
    m = make()
    m.handle(1.0, Received("b", Gossip((upd("c", 2, State.DEAD, "b"),), ())))
    assert m.state_of("c") == State.DEAD
    for u in (upd("c", 2, State.ALIVE, "c"), upd("c", 2, State.SUSPECT, "d"),
              upd("c", 1, State.ALIVE, "c")):
        m.handle(2.0, Received("d", Gossip((u,), ())))
        assert m.state_of("c") == State.DEAD
    m.handle(3.0, Received("d", Gossip((upd("c", 3, State.ALIVE, "c"),), ())))
    assert m.state_of("c") == State.ALIVE and "c" in m.live()


def test_graceful_leave() -> None:
    m = make()
    out = m.leave(5.0)
    assert m.state_of("a") == State.LEFT
    gossip = sends(out, Gossip)
    assert {s.peer for s in gossip} == set(PEERS)
    assert gossip[0].message.members[0] == upd("a", 1, State.LEFT, "a")
    other = make("b", ["a", "c", "d", "e"])
    out = other.handle(5.1, Received("a", gossip[0].message))
    assert other.state_of("a") == State.LEFT
    assert notes(out, "member")[0]["state"] == "left"
    assert m.handle(6.0, TimerFired(("swim", "probe"))) == [
        SetTimer(("swim", "probe"), 6.0 + m.cfg.probe_interval)]  # a leaver no longer probes


def test_helper_relays_ping_req_and_nacks_on_silence() -> None:
    m = make()
    out = m.handle(1.0, Received("b", PingReq(77, "c")))
    (ping,) = sends(out, Ping)
    assert ping.peer == "c"
    my_seq = ping.message.seq
    out = m.handle(1.1, Received("c", Ack(my_seq, "c", 2, (), ())))
    assert sends(out) == [Send("b", Ack(77, "c", 2, (), ()))]
    out = m.handle(2.0, Received("b", PingReq(78, "d")))
    (ping,) = sends(out, Ping)
    (nack_at,) = [a.at for a in out if isinstance(a, SetTimer)]
    out = m.handle(nack_at, TimerFired(("swim", "nack", ping.message.seq)))
    assert sends(out) == [Send("b", Nack(78))]
    out = m.handle(nack_at + 0.1, Received("d", Ack(ping.message.seq, "d", 0, (), ())))
    assert sends(out) == [Send("b", Ack(78, "d", 0, (), ()))]  # a late ack still counts


def test_sync_softens_remote_deaths_and_heeds_direct_evidence() -> None:
    m = make()
    state = Sync(False, (upd("c", 0, State.DEAD, "b"), upd("d", 0, State.DEAD, "b")), (), ())
    m.note_heard(9.0, "d")
    m.handle(10.0, Received("b", state))
    assert m.state_of("c") == State.SUSPECT  # memberlist mergeState: dead -> suspect
    assert m.state_of("d") == State.ALIVE  # we heard from d a second ago


def test_sync_reply_and_reconnect_to_dead_member() -> None:
    m = make()
    heard = tuple(upd(p, 1, State.ALIVE, p) for p in PEERS)
    out = m.handle(1.0, Received("b", Sync(True, heard, (), ())))
    (reply,) = sends(out, Sync)
    assert reply.peer == "b" and not reply.message.reply
    # each member's own statement, passed on as it signed it
    assert {member_of(u).name for u in reply.message.members} == {"a", *PEERS}
    assert set(heard) <= set(reply.message.members)
    m.handle(2.0, Received("c", Gossip((upd("d", 1, State.DEAD, "c"),), ())))
    out = m.note_heard(3.0, "d")
    assert [s.peer for s in sends(out, Sync)] == ["d"]
    assert m.note_heard(4.0, "d") == []  # at most once per reconnect_interval


def test_transmit_limit_bounds_retransmissions() -> None:
    m = make()
    m.handle(1.0, Received("b", Gossip((upd("c", 1, State.ALIVE, "c"),), ())))
    limit = m.transmit_limit()
    assert limit == max(4 * 1, m.cfg.min_transmits)  # RetransmitMult * ceil(log10(5 + 1))
    seen = 0
    for _ in range(limit + 3):
        members, _ = m.queue.take(16, limit)
        seen += sum(1 for u in members if member_of(u).name == "c")
    assert seen == limit


def test_bad_input_is_refused_with_the_peer_named() -> None:
    m = make()
    out = m.handle(1.0, Received("zz", Gossip((), ())))
    assert notes(out, "swim-refused")[0]["peer"] == "zz"
    # b speaking for another, and a DC outside the federation: refused and counted
    assert m.handle(1.0, Received("b", Gossip((upd("nobody", 1, State.ALIVE, "b"),), ()))) == []
    assert m.handle(1.0, Received("b", Gossip((upd("nobody", 1, State.ALIVE, "nobody"),),
                                              ()))) == []
    assert m.statements.refused == {"wrong_speaker": 1, "unknown_speaker": 1}
    with pytest.raises(ValueError, match="itself"):
        Membership("a", ["a", "b"], random.Random(1), statements=statements_for("a", "ab"))
    with pytest.raises(wire.WireError):
        wire.decode(wire.encode(Gossip((upd("b", 1, State.ALIVE, "b"),), ()))[:-1])


def test_an_unknown_state_is_refused_as_malformed() -> None:
    import cbor2

    from tests.harness.gossip import identity_of

    m = make()
    body = cbor2.dumps(["b", 1, 9, "b"], canonical=True)  # state 9 does not exist
    sig = identity_of("b").sign(b"dwcp/1 member statement\x00" + body)
    assert m.handle(1.0, Received("c", Gossip((Signed(body, sig),), ()))) == []
    assert m.statements.refused == {"malformed": 1} and m.state_of("b") == State.ALIVE
    assert MembershipError  # still raised by _apply for a state no decoder lets through


def test_config_constants_are_memberlist_lan_defaults() -> None:
    cfg = SwimConfig()
    assert (cfg.probe_interval, cfg.indirect_checks, cfg.suspicion_mult) == (1.0, 3, 4)
    assert (cfg.suspicion_max_mult, cfg.retransmit_mult, cfg.gossip_nodes) == (6, 4, 3)
    assert (cfg.gossip_interval, cfg.push_pull_interval, cfg.awareness_max) == (0.2, 30.0, 8)


class _BigTable:
    """A LinkSync with more entries than one sync message carries."""

    def __init__(self, n: int) -> None:
        from mesh.gossip.control_msgs import LinkEntry

        self.entries = [said_link(LinkEntry("b", "c", v, 1.0, 0.0, 0.0, 0.0, False, None))
                        for v in range(1, n + 1)]

    def digest(self) -> tuple:
        return ()

    def entries_newer_than(self, digest: object) -> list:
        return list(self.entries)

    def merge(self, now: float, peer: str, entries: object) -> list:
        return []


def test_a_large_table_is_synced_in_chunks_that_fit_a_frame() -> None:
    from mesh.gossip.control_msgs import SYNC_MAX

    m = Membership("a", PEERS, random.Random(1), links=_BigTable(2 * SYNC_MAX + 5),
                   statements=statements_for("a", PEERS))
    out = m.handle(1.0, Received("b", Sync(True, (), (), ())))
    syncs = sends(out, Sync)
    assert [len(s.message.links) for s in syncs] == [SYNC_MAX, SYNC_MAX, 5]
    assert syncs[0].message.digest == () and syncs[0].message.members
    assert all(not s.message.members for s in syncs[1:])
    for s in syncs:
        assert wire.decode(wire.encode(s.message)) == s.message


def test_probe_soon_jumps_the_round_robin_once() -> None:
    m = make()
    m.probe_soon("d")
    m.probe_soon("d")
    _, target, _ = probe_once(m, 1.0)
    assert target == "d"
    m.handle(1.0, Received("b", Gossip((upd("c", 0, State.DEAD, "b"),), ())))
    m.probe_soon("c")  # a dead member is not probed
    seen = {probe_once(m, 2.0 + i)[1] for i in range(3)}
    assert "c" not in seen


class _Links:
    """A LinkSync over a real link table (mesh.links.estimates)."""

    def __init__(self, me: str) -> None:
        from mesh.links.estimates import LinkTable

        self.table = LinkTable(me, ["a", *PEERS], statements_for(me, ["a", *PEERS]))

    def digest(self) -> tuple:
        return self.table.digest()

    def entries_newer_than(self, digest: object) -> list:
        return self.table.entries_newer_than(digest)  # type: ignore[arg-type]

    def lacks(self, digest: object) -> bool:
        return self.table.lacks(digest)  # type: ignore[arg-type]

    def merge(self, now: float, peer: str, statements: object) -> list:
        return self.table.merge(now, self.table.open(now, peer, statements))  # type: ignore


def _link(origin: str, peer: str, version: int) -> Signed:
    from mesh.gossip.control_msgs import LinkEntry

    return said_link(LinkEntry(origin, peer, version, 10.0, 1.0, 0.0, 0.0, False, None))


def test_link_anti_entropy_carries_only_what_the_peer_lacks() -> None:
    a = make(links=_Links("a"))
    b = make("b", ["a", "c", "d", "e"], links=_Links("b"))
    a.handle(0.0, Received("c", Gossip((), (_link("c", "d", 1), _link("d", "c", 2)))))
    b.handle(0.0, Received("c", Gossip((), (_link("c", "d", 1), _link("e", "c", 3)))))
    out = a.handle(2.0, TimerFired(("swim", "link-sync")))
    assert ("swim", "link-sync") in timers(out)
    (req,) = sends(out, Sync)
    assert req.message.reply and not req.message.members and req.message.digest
    # b answers with the entry a lacks and, since a holds one b lacks, its digest
    (rep,) = sends(b.handle(2.1, Received("a", req.message)), Sync)
    assert rep.peer == "a" and not rep.message.members and rep.message.digest
    assert rep.message.links == (_link("e", "c", 3),)
    # a sends back what b lacks; the exchange ends there (no digest)
    (back,) = sends(a.handle(2.2, Received("b", rep.message)), Sync)
    assert back.message.links == (_link("d", "c", 2),) and not back.message.digest
    b.handle(2.3, Received("a", back.message))
    assert a.links.digest() == b.links.digest()  # type: ignore[union-attr]
    # the next round between agreeing tables costs the request alone
    (req,) = sends(a.handle(4.0, TimerFired(("swim", "link-sync"))), Sync)
    assert sends(b.handle(4.1, Received("a", req.message)), Sync) == []
    for s in (req, rep, back):
        assert wire.decode(wire.encode(s.message)) == s.message


def test_link_entries_have_their_own_smaller_retransmit_limit() -> None:
    m = make(links=_Links("a"))
    assert m.link_transmit_limit() == m.cfg.link_transmit_mult * 1  # ceil(log10(5 + 1))
    assert m.link_transmit_limit() < m.transmit_limit()
    m.handle(1.0, Received("c", Gossip((), (_link("c", "d", 1),))))
    seen = 0
    for peer in ["b", "d", "e", "b", "d", "e"]:
        seen += len(m._gossip_for(peer).links)
    assert seen == m.link_transmit_limit()  # never back to c, which sent it


def test_only_the_first_k_confirmations_of_a_suspicion_are_passed_on() -> None:
    m = make(peers=[f"p{i:02d}" for i in range(15)], me="me")
    for i, accuser in enumerate(["p01", "p02", "p04", "p05", "p06"]):
        m.handle(5.0 + i, Received(accuser, Gossip((upd("p03", 0, State.SUSPECT, accuser),), ())))
    members, _ = m.queue.take(16, m.transmit_limit())
    passed = sorted(member_of(u).source for u in members if member_of(u).name == "p03")
    k = m.cfg.suspicion_mult - 2  # Lifeguard's K: the timeout is at its minimum after K
    assert passed == ["p01", "p02", "p04"][: k + 1]  # the suspicion and K confirmations


def test_a_reconnect_to_a_member_back_from_the_dead_pulls_but_pushes_no_table() -> None:
    # Every DC that held d dead reconnects when it hears from d again; d asks its own
    # join_syncs peers for the table, so a reconnect must not push d the whole table.
    a = make(links=_Links("a"))
    a.handle(0.0, Received("c", Gossip((), (_link("c", "b", 1), _link("e", "b", 2)))))
    a.handle(1.0, Received("c", Gossip((upd("d", 0, State.DEAD, "c"),), ())))
    assert a.state_of("d") == State.DEAD
    (ask,) = sends(a.note_heard(10.0, "d"), Sync)
    assert ask.peer == "d" and ask.message.reply and ask.message.digest
    d = make("d", ["a", "b", "c", "e"], links=_Links("d"))  # restarted: an empty table
    d.handle(10.0, Received("e", Gossip((), (_link("e", "c", 5),))))
    (rep,) = sends(d.handle(10.1, Received("a", ask.message)), Sync)
    assert rep.message.digest and not rep.message.reply
    out = a.handle(10.2, Received("d", rep.message))
    assert sends(out, Sync) == []  # nothing pushed back to d...
    assert a.links.table.entries[("e", "c")].version == 5  # ...but what d held, pulled
    # An ordinary push/pull with d (no reconnect pending) still sends back what d lacks.
    ask = a._sync_message(reply=True)
    (rep,) = sends(d.handle(60.1, Received("a", ask)), Sync)
    (back,) = sends(a.handle(60.2, Received("d", rep.message)), Sync)
    assert {_link("c", "b", 1), _link("e", "b", 2)} <= set(back.message.links)
