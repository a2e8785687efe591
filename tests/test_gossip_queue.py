"""The retransmit-limited gossip queue (mesh.gossip.transmit_queue) against a plain model: sort
everything queued by (times sent, newest first) for every packet, as memberlist's
TransmitLimitedQueue orders it."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from mesh.gossip.control_msgs import LinkEntry, MemberUpdate
from mesh.gossip.transmit_queue import TransmitQueue


class ModelQueue:
    def __init__(self) -> None:
        self.items: dict[Hashable, list[Any]] = {}  # key -> [item, sent, number]
        self.counter = 0

    def put(self, key: Hashable, item: Any, prio: bool) -> None:
        self.counter += 1
        self.items.pop(key, None)
        self.items[key] = [item, -1 if prio else 0, self.counter]

    def take(self, max_each: int, limit: int) -> tuple[list[Any], list[Any]]:
        order = sorted(self.items.items(), key=lambda kv: (kv[1][1], -kv[1][2]))
        members: list[Any] = []
        links: list[Any] = []
        for key, slot in order:
            bucket = members if isinstance(slot[0], MemberUpdate) else links
            if len(bucket) >= max_each:
                continue
            bucket.append(slot[0])
            slot[1] = max(slot[1], 0) + 1
            if slot[1] >= limit:
                del self.items[key]
        return members, links


def _member(name: str, inc: int) -> MemberUpdate:
    return MemberUpdate(name, inc, 0, name)


def _link(origin: str, peer: str, version: int) -> LinkEntry:
    return LinkEntry(origin=origin, peer=peer, version=version, rtt_ms=1.0, rttvar_ms=0.5,
                     jitter_ms=0.1, loss=0.0, down=False, bw_mbps=None)


NAMES = ["a", "b", "c", "d", "e"]
put_op = st.tuples(st.just("put"), st.booleans(), st.sampled_from(NAMES),
                   st.sampled_from(NAMES), st.booleans())
take_op = st.tuples(st.just("take"), st.integers(0, 4), st.integers(1, 5))


@given(st.lists(st.one_of(put_op, take_op), max_size=120))
def test_queue_sends_what_the_sorted_model_sends(ops: list) -> None:
    queue, model = TransmitQueue(), ModelQueue()
    version = 0
    for op in ops:
        if op[0] == "put":
            _, is_member, x, y, prio = op
            version += 1
            if is_member:
                key: Hashable = ("m", x)
                item: Any = _member(x, version)
            else:
                key, item = ("l", x, y), _link(x, y, version)
            queue.put(key, item, prio=prio)
            model.put(key, item, prio)
        else:
            _, each, limit = op
            assert queue.take(each, limit) == model.take(each, limit)
        assert len(queue) == len(model.items)


def test_least_sent_first_then_newest_and_spent_items_leave() -> None:
    q = TransmitQueue()
    q.put(("m", "a"), _member("a", 1))
    q.put(("m", "b"), _member("b", 1))
    assert [u.name for u in q.take(1, 2)[0]] == ["b"]
    assert [u.name for u in q.take(2, 2)[0]] == ["a", "b"]  # b was sent once already
    assert len(q) == 1  # b was sent twice: gone
    assert [u.name for u in q.take(2, 2)[0]] == ["a"]
    assert len(q) == 0 and q.take(2, 2) == ([], [])


class HoldersModel(ModelQueue):
    """The plain model with the holder rule for link entries: a link item is not taken
    for a peer known to hold it; the peer it goes to holds it; an item every peer holds
    leaves the queue."""

    def __init__(self, everyone: int) -> None:
        super().__init__()
        self.everyone = everyone
        self.holders: dict[Hashable, set[str]] = {}

    def put(self, key: Hashable, item: Any, prio: bool, holder: str | None = None) -> None:
        super().put(key, item, prio)
        self.holders.pop(key, None)
        if holder is not None and not isinstance(item, MemberUpdate):
            self.holders[key] = {holder}

    def held_by(self, key: Hashable, item: Any, holder: str) -> None:
        slot = self.items.get(key)
        if slot is None or slot[0] != item or isinstance(item, MemberUpdate):
            return
        self.holders.setdefault(key, set()).add(holder)
        if len(self.holders[key]) >= self.everyone:
            del self.items[key]
            del self.holders[key]

    def take_to(self, max_each: int, limit: int, to: str) -> tuple[list[Any], list[Any]]:
        order = sorted(self.items.items(), key=lambda kv: (kv[1][1], -kv[1][2]))
        members: list[Any] = []
        links: list[Any] = []
        for key, slot in order:
            is_member = isinstance(slot[0], MemberUpdate)
            bucket = members if is_member else links
            if len(bucket) >= max_each or (not is_member and to in self.holders.get(key, ())):
                continue
            bucket.append(slot[0])
            slot[1] = max(slot[1], 0) + 1
            done = slot[1] >= limit
            if not is_member:
                self.holders.setdefault(key, set()).add(to)
                done = done or len(self.holders[key]) >= self.everyone
            if done:
                del self.items[key]
                self.holders.pop(key, None)
        return members, links


PEER_NAMES = ["p", "q", "r"]
put_from = st.tuples(st.just("put"), st.booleans(), st.sampled_from(NAMES), st.sampled_from(NAMES),
                     st.booleans(), st.none() | st.sampled_from(PEER_NAMES))
take_to = st.tuples(st.just("take"), st.integers(0, 4), st.integers(1, 5),
                    st.sampled_from(PEER_NAMES))
held = st.tuples(st.just("held"), st.sampled_from(NAMES), st.sampled_from(NAMES),
                 st.sampled_from(PEER_NAMES))


@given(st.lists(st.one_of(put_from, take_to, held), max_size=120))
def test_holders_rule_matches_the_model(ops: list) -> None:
    queue, model = TransmitQueue(), HoldersModel(len(PEER_NAMES))
    version = 0
    for op in ops:
        if op[0] == "put":
            _, is_member, x, y, prio, holder = op
            version += 1
            key: Any = ("m", x) if is_member else ("l", x, y)
            item: Any = _member(x, version) if is_member else _link(x, y, version)
            queue.put(key, item, prio=prio, holder=holder)
            model.put(key, item, prio, holder)
        elif op[0] == "take":
            _, each, limit, to = op
            assert queue.take(each, limit, to, len(PEER_NAMES)) == model.take_to(each, limit, to)
        else:
            _, x, y, holder = op
            slot = model.items.get(("l", x, y))
            if slot is not None:
                queue.held_by(("l", x, y), slot[0], holder, len(PEER_NAMES))
                model.held_by(("l", x, y), slot[0], holder)
        assert len(queue) == len(model.items)


def test_a_bounded_link_lane_drops_the_oldest_put_and_never_member_updates() -> None:
    q = TransmitQueue(link_depth=2)
    q.put(("l", "a", "b"), _link("a", "b", 1))
    q.put(("m", "a"), _member("a", 1))
    q.put(("l", "a", "c"), _link("a", "c", 2))
    q.put(("l", "a", "b"), _link("a", "b", 3))  # a newer a->b: now the newest put
    q.put(("l", "b", "c"), _link("b", "c", 4))
    assert q.pruned == 1 and len(q) == 3
    members, links = q.take(16, 4)
    assert [u.name for u in members] == ["a"]
    assert sorted((e.origin, e.peer, e.version) for e in links) == [("a", "b", 3), ("b", "c", 4)]
