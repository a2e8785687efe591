"""Link estimates and the link-state table (mesh.links.estimates)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.core import Notify, Persist, Send
from mesh.gossip.control_msgs import BandwidthProbe, BandwidthReport, LinkEntry, LinkPing
from mesh.links.estimates import LinkConfig, LinkProber, LinkTable
from sim.store import SimStore
from tests.harness.gossip import said_link, statements_for

CFG = LinkConfig()
PERIOD = CFG.ping_interval


def prober(me: str = "a", peers: tuple[str, ...] = ("b", "c"), store: SimStore | None = None
           ) -> LinkProber:
    names = [me, *peers]
    p = LinkProber(me, list(peers), random.Random(3), table(me, names), store=store)
    p.start(0.0)
    return p


def table(me: str, names: list[str]) -> LinkTable:
    return LinkTable(me, names, statements_for(me, names))


def merged(t: LinkTable, batch: list[LinkEntry], peer: str = "b") -> list[LinkEntry]:
    """Pass ``batch``, each entry signed by its origin, to ``t`` from ``peer``; the
    entries adopted."""
    return [e for e, _ in t.merge(0.0, t.open(0.0, peer, [said_link(e) for e in batch]))]


def ping(seq: int, sent_at: float, echo: int | None = None, hold: float = 0.0,
         session: int = 7) -> LinkPing:
    return LinkPing(session, seq, sent_at, echo, hold)


def test_rtt_from_echo_follows_rfc6298() -> None:
    a = prober()
    out = a.ping_due(1.0, "b")
    (send,) = [x for x in out if isinstance(x, Send)]
    assert send.message.seq == 1 and send.message.echo_seq is None
    # b held our ping 0.3 s; the echo arrives 0.5 s after we sent it: RTT 0.2 s
    a.received_ping(1.5, "b", ping(1, 1.4, echo=1, hold=0.3))
    assert a.rto("b") == pytest.approx(0.2 + 4 * 0.1)  # SRTT = R, RTTVAR = R/2 (§2.2)
    a.ping_due(2.0, "b")
    a.received_ping(2.4, "b", ping(2, 2.3, echo=2, hold=0.0))  # R = 0.4 (§2.3)
    rttvar = 0.75 * 0.1 + 0.25 * abs(0.2 - 0.4)
    srtt = 0.875 * 0.2 + 0.125 * 0.4
    assert a.rto("b") == pytest.approx(srtt + 4 * rttvar)
    assert a.rto("c") is None
    # our next ping to b echoes b's last ping and how long we held it
    (send,) = [x for x in a.ping_due(3.0, "b") if isinstance(x, Send)]
    assert (send.message.echo_seq, send.message.echo_hold) == (2, pytest.approx(0.6))


def test_jitter_is_rfc3550_interarrival_jitter() -> None:
    a = prober()
    a.received_ping(1.10, "b", ping(1, 1.0))
    a.received_ping(2.14, "b", ping(2, 2.0))  # transit 0.10 then 0.14: D = 0.04
    assert a.peers["b"].jitter == pytest.approx(0.04 / 16)


def test_loss_counts_missing_sequence_numbers_over_the_window() -> None:
    a = prober()
    t = 0.0
    for seq in range(1, 41):
        t = seq * PERIOD
        if seq % 10 != 0:  # every tenth ping lost
            a.received_ping(t + 0.05, "b", ping(seq, t))
    loss, overdue = a.loss(a.peers["b"], t + 0.1)
    assert overdue == 0
    # pings 1..39 expected, 10, 20 and 30 lost; a window not yet full counts as full
    assert loss == pytest.approx(3 / CFG.loss_window)
    for seq in range(41, 141):
        if seq != 100:
            a.received_ping(seq * PERIOD + 0.05, "b", ping(seq, seq * PERIOD))
    loss, _ = a.loss(a.peers["b"], 140 * PERIOD + 0.1)
    assert loss == pytest.approx(1 / CFG.loss_window)  # 41..140: only 100 lost
    entry = a.entry(140 * PERIOD + 0.1, "b", 1)
    assert not entry.down and entry.loss == pytest.approx(0.01)


def test_silence_marks_down_and_the_next_ping_starts_a_fresh_window() -> None:
    a = prober()
    for seq in range(1, 11):
        a.received_ping(seq * PERIOD, "b", ping(seq, seq * PERIOD))
    last = 10 * PERIOD
    out = a.check(last + 3.0 * PERIOD)
    assert not a.peers["b"].down  # two pings overdue: not down yet, but worth a SWIM probe
    assert a.silent == ["b"]
    a.check(last + 3.1 * PERIOD)
    assert a.silent == ["b"]  # reported once per silence
    out = a.check(last + (CFG.down_misses + CFG.grace_fraction) * PERIOD + 0.01)
    assert a.peers["b"].down
    assert {"from": "b", "to": "a"} in [x.detail for x in out if isinstance(x, Notify)]
    assert a.table.entries[("a", "b")].down and a.table.entries[("a", "b")].loss == 1.0
    a.received_ping(last + 10 * PERIOD, "b", ping(20, last + 10 * PERIOD))
    entry = a.table.entries[("a", "b")]
    assert not entry.down and entry.loss == 0.0


def test_a_restarted_sender_is_a_new_session_and_duplicates_are_ignored() -> None:
    a = prober()
    a.received_ping(1.0, "b", ping(5, 1.0))
    assert a.received_ping(1.1, "b", ping(5, 1.0)) == []
    a.received_ping(2.0, "b", ping(1, 2.0, session=8))
    assert a.peers["b"].session == 8 and a.peers["b"].hi == 1


def test_unknown_peer_is_refused_by_name() -> None:
    a = prober()
    (note,) = a.received_ping(1.0, "zz", ping(1, 1.0))
    assert isinstance(note, Notify) and note.detail["peer"] == "zz"
    with pytest.raises(ValueError, match="zz"):
        a.record_transfer(1.0, "zz", 10, 1.0)
    with pytest.raises(ValueError, match="seconds"):
        a.record_transfer(1.0, "b", 10, 0.0)


def test_bandwidth_is_the_windowed_max_of_transfer_samples() -> None:
    a = prober()
    a.record_transfer(1.0, "b", 125_000_000, 1.0)  # 1000 Mbit/s
    a.record_transfer(2.0, "b", 12_500_000, 1.0)  # 100 Mbit/s
    assert a.table.entries[("a", "b")].bw_mbps == pytest.approx(1000.0)
    for i in range(CFG.bw_samples):
        a.record_transfer(3.0 + i, "b", 12_500_000, 1.0)
    assert a.table.entries[("a", "b")].bw_mbps == pytest.approx(100.0)


def test_packet_train_measures_dispersion() -> None:
    a, b = prober("a", ("b",)), prober("b", ("a",))
    sends = [x for x in a.probe_bandwidth(1.0, "b") if isinstance(x, Send)]
    assert len(sends) == CFG.train_packets
    size = len(sends[0].message.padding) + 32
    per_packet = size * 8 / 500e6  # a 500 Mbit/s bottleneck spaces the packets
    out: list = []
    for i, s in enumerate(sends):
        out = b.received_train(1.05 + i * per_packet, "a", s.message)
    (report,) = out
    assert isinstance(report.message, BandwidthReport)
    assert report.message.mbps == pytest.approx(500.0)
    a.received_report(1.2, "b", report.message)
    assert a.table.entries[("a", "b")].bw_mbps == pytest.approx(500.0)
    bad = b.received_train(2.0, "a", BandwidthProbe(9, 5, 3, b""))
    assert isinstance(bad[0], Notify)


def test_versions_are_leased_from_the_store_and_never_reused() -> None:
    store = SimStore()
    a = prober(store=store)
    out = a.record_transfer(1.0, "b", 1000, 1.0)
    assert any(isinstance(x, Persist) for x in out)
    for x in out:
        if isinstance(x, Persist):
            store.put(x.key, x.value, x.sync)
    v1 = a.table.entries[("a", "b")].version
    again = prober(store=store)  # a restart: the lease survived
    again.record_transfer(1.0, "b", 5000, 1.0)
    assert again.table.entries[("a", "b")].version > v1 + CFG.version_block - 1


def entry(origin: str, peer: str, version: int, loss: float = 0.0, rtt: float = 50.0,
          down: bool = False, bw: float | None = None) -> LinkEntry:
    return LinkEntry(origin, peer, version, rtt, 5.0, 1.0, loss, down, bw)


def test_table_merges_by_version_and_reads_links_from_both_ends() -> None:
    t = table("a", ["a", "b", "c"])
    assert merged(t, [entry("b", "c", 2), entry("b", "c", 1)]) == [entry("b", "c", 2)]
    assert merged(t, [entry("b", "c", 2)]) == []
    assert t.view("b", "c") is None  # b -> c needs c's report (the receiver's)
    v = t.view("c", "b")  # b reported what it receives from c
    assert v is not None and v.rtt_ms == 50.0 and v.bw_mbps is None
    merged(t, [entry("c", "b", 1, rtt=60.0, bw=900.0)])
    v = t.view("c", "b")
    assert v is not None and v.rtt_ms == 60.0 and v.bw_mbps == 900.0  # sender's RTT and bw
    assert t.view("b", "c") is not None
    merged(t, [entry("b", "c", 3, loss=0.2, down=True)])
    v = t.view("c", "b")
    assert v is not None and v.down and v.loss == 0.2


def test_table_refuses_bad_entries_and_our_own_from_others() -> None:
    t = table("a", ["a", "b", "c"])
    bad = [entry("b", "zz", 1), entry("b", "b", 1), entry("b", "c", 1, loss=1.5),
           entry("b", "c", 1, rtt=-1.0), entry("a", "b", 9)]
    assert merged(t, bad) == []
    assert t.refused == 4 and t.entries == {}


def test_digest_exchange_finds_what_the_other_lacks() -> None:
    x, y = table("a", ["a", "b", "c"]), table("c", ["a", "b", "c"])
    merged(x, [entry("b", "a", 3), entry("b", "c", 2)])
    merged(y, [entry("b", "a", 1)])
    missing = x.entries_newer_than(y.digest())
    assert missing == [said_link(entry("b", "a", 3)), said_link(entry("b", "c", 2))]
    assert y.entries_newer_than(x.digest()) == []
    assert y.lacks(x.digest()) and not x.lacks(y.digest())
    y.merge(0.0, y.open(0.0, "a", missing))  # passed on as b signed them
    assert x.digest() == y.digest() and not x.lacks(y.digest())


def test_digest_exchange_sends_only_the_latest_publications_when_there_is_no_gap() -> None:
    # An origin's versions come from one counter: b published 1..6 over its three links.
    x, y = table("a", ["a", "b", "c", "d"]), table("c", ["a", "b", "c", "d"])
    merged(x, [entry("b", "a", 1), entry("b", "c", 2), entry("b", "d", 3)])
    merged(y, [entry("b", "a", 1), entry("b", "c", 2), entry("b", "d", 3)])
    merged(x, [entry("b", "a", 4), entry("b", "c", 5)])  # y missed both republications
    assert x.entries_newer_than(y.digest()) == [said_link(entry("b", "a", 4)),
                                               said_link(entry("b", "c", 5))]
    merged(x, [entry("b", "d", 6)])
    # still only what lies above y's maximum (5 and 6 replaced 2 and 3, which y holds)
    merged(y, [entry("b", "a", 4)])
    assert x.entries_newer_than(y.digest()) == [said_link(entry("b", "c", 5)),
                                               said_link(entry("b", "d", 6))]
    z = table("d", ["a", "b", "c", "d"])
    merged(z, [entry("b", "a", 1), entry("b", "c", 5), entry("b", "d", 3)])
    # z holds 5 but missed 4 below it: a gap, so z gets every entry of b
    assert x.entries_newer_than(z.digest()) == [said_link(entry("b", "a", 4)),
                                               said_link(entry("b", "c", 5)),
                                               said_link(entry("b", "d", 6))]
    merged(y, [entry("b", "c", 5), entry("b", "d", 6)])
    assert x.entries_newer_than(y.digest()) == [] and x.digest() == y.digest()


entries = st.builds(
    entry, st.sampled_from(["a", "b", "c"]), st.sampled_from(["a", "b", "c"]),
    st.integers(1, 20), st.floats(0.0, 1.0), st.floats(0.0, 500.0), st.booleans())


@given(st.lists(entries, max_size=30), st.randoms())
def test_merge_is_order_independent(batch: list[LinkEntry], rnd: random.Random) -> None:
    # Entries with equal key and version carry equal contents (one origin wrote them).
    canon = {(e.origin, e.peer, e.version): e for e in batch}
    batch = [canon[(e.origin, e.peer, e.version)] for e in batch]
    one, two = table("z", ["a", "b", "c"]), table("z", ["a", "b", "c"])
    merged(one, batch)
    shuffled = list(batch)
    rnd.shuffle(shuffled)
    for e in shuffled:
        merged(two, [e])
    assert one.entries == two.entries
    assert one.digest() == two.digest()


def test_loss_is_republished_only_for_a_step_of_several_pings() -> None:
    p = prober()
    cfg = p.cfg
    old = LinkEntry("a", "b", 1, 10.0, 1.0, 0.0, 0.0, False, None)
    one, two, three = (1 / cfg.loss_window, 2 / cfg.loss_window, 3 / cfg.loss_window)
    for loss, expected in ((one, False), (two, False), (three, True)):
        new = LinkEntry("a", "b", 2, 10.0, 1.0, 0.0, loss, False, None)
        assert p.significant(old, new) is expected, loss
    was = LinkEntry("a", "b", 1, 10.0, 1.0, 0.0, three, False, None)
    assert not p.significant(was, LinkEntry("a", "b", 2, 10.0, 1.0, 0.0, one, False, None))
    assert p.significant(was, LinkEntry("a", "b", 2, 10.0, 1.0, 0.0, 0.0, False, None))
    # down is never held back
    assert p.significant(old, LinkEntry("a", "b", 2, 10.0, 1.0, 0.0, one, True, None))
