"""The retransmit-limited gossip queue (mesh.gossip.transmit_queue) against a plain model: sort
everything queued by (times sent, newest first) for every packet, as memberlist's
TransmitLimitedQueue orders it."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from mesh.gossip.transmit_queue import TransmitQueue
from mesh.links.control_msgs import LinkEntry, MemberUpdate


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
