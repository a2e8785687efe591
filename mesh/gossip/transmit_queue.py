"""The retransmit-limited broadcast queue of gossip dissemination.

Modelled on memberlist's ``TransmitLimitedQueue``: every update is sent at most
``limit`` times (the caller passes ``RetransmitMult * ceil(log10(N + 1))``, the
lambda * log N of SWIM §4.1); the least-sent updates go first, the newest first among
equals; a newer update with the same key replaces the queued one (it invalidates it).

Like memberlist's (a B-tree ordered by transmits, then newest), the queue stays
ordered as it changes rather than being sorted for every packet: at N = 64 a DC holds
thousands of queued link entries and builds a packet several times a second. Member
updates and link entries fill separate halves of a packet, so each kind has its own
lane (the first element of an item's key: ``"m"`` member, ``"l"`` link); a lane keeps,
per transmit count, its items sorted by insertion number. Items are the signed
statements (mesh.gossip.control_msgs.Signed) as their speakers signed them.

Link entries are not sent to a peer known to hold them: the peers that sent us the
same statement, and those we sent it to. A signed entry is ~100 bytes and SWIM's
infection-style spreading sends every entry ``limit`` times from every DC, so by the
time an entry has spread most of those sends would go to DCs that told us the same
thing; here every send goes to a DC not known to have it, and an entry that every
peer is known to hold leaves the queue. Member updates, which failure detection waits
for, keep memberlist's plain rule.
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable
from typing import Any

from mesh.gossip.control_msgs import Signed

__all__ = ["TransmitQueue"]


class _Lane:
    """The queued updates of one kind."""

    def __init__(self) -> None:
        self.items: dict[Hashable, tuple[Any, int, int]] = {}  # key -> (item, sent, number)
        #: sent count -> [(insertion number, key)] in ascending insertion order
        self.by_sent: dict[int, list[tuple[int, Hashable]]] = {}
        #: key -> the peers known to hold the queued item (see the module docstring)
        self.holders: dict[Hashable, set[str]] = {}
        #: the queued keys, oldest put first (what a bounded lane drops)
        self.order: dict[Hashable, None] = {}

    def remove(self, key: Hashable) -> None:
        self.holders.pop(key, None)
        self.order.pop(key, None)
        old = self.items.pop(key, None)
        if old is None:
            return
        _, sent, number = old
        row = self.by_sent[sent]
        del row[bisect.bisect_left(row, (number,))]
        if not row:
            del self.by_sent[sent]

    def add(self, key: Hashable, item: Any, sent: int, number: int) -> None:
        self.items[key] = (item, sent, number)
        row = self.by_sent.setdefault(sent, [])
        if not row or row[-1][0] < number:
            row.append((number, key))
        else:
            bisect.insort(row, (number, key))

    def take(self, count: int, limit: int, to: str | None = None,
             everyone: int = 0) -> list[Any]:
        """The first ``count`` items (least sent, then newest), each counted as sent once
        more; an item sent ``limit`` times leaves the queue. With ``to`` (the peer the
        packet goes to), items it is known to hold are passed over and it becomes a
        holder of those taken; an item held by ``everyone`` peers leaves the queue."""
        out: list[Any] = []
        moved: list[tuple[int, int, Hashable, Any]] = []
        for sent in sorted(self.by_sent):
            if len(out) >= count:
                break
            row = self.by_sent[sent]
            tail = self._newest(row, count - len(out), to)
            if not row:
                del self.by_sent[sent]
            for number, key in tail:
                item = self.items[key][0]
                out.append(item)
                moved.append((max(sent, 0) + 1, number, key, item))
        for sent, number, key, item in moved:
            keep = sent < limit
            if to is not None:
                holders = self.holders.setdefault(key, set())
                holders.add(to)
                keep = keep and len(holders) < everyone
            if keep:
                self.add(key, item, sent, number)
            else:
                del self.items[key]
                self.holders.pop(key, None)
                self.order.pop(key, None)
        return out

    def _newest(self, row: list[tuple[int, Hashable]], count: int,
                to: str | None) -> list[tuple[int, Hashable]]:
        """Remove from ``row`` and return (newest first) its ``count`` newest entries,
        passing over those ``to`` holds."""
        if to is None:
            tail = row[len(row) - min(count, len(row)):]
            del row[len(row) - len(tail):]
            return tail[::-1]
        picked: list[int] = []
        for i in range(len(row) - 1, -1, -1):
            if len(picked) >= count:
                break
            if to not in self.holders.get(row[i][1], ()):
                picked.append(i)
        tail = [row[i] for i in picked]
        for i in picked:  # descending: each deletion leaves the next index in place
            del row[i]
        return tail


class TransmitQueue:
    """``link_depth``: most link entries queued; putting one more drops the oldest put
    (counted in ``pruned``). Member updates are never dropped."""

    def __init__(self, link_depth: int | None = None) -> None:
        self._members = _Lane()
        self._links = _Lane()
        self._counter = 0
        self.link_depth = link_depth
        self.pruned = 0

    def __len__(self) -> int:
        return len(self._members.items) + len(self._links.items)

    def put(self, key: tuple[Hashable, ...], item: Signed, prio: bool = False,
            holder: str | None = None) -> None:
        """Queue ``item`` under ``key`` (``("m", ...)`` a member statement, ``("l", ...)`` a
        link entry); ``prio`` puts it before everything queued (a refutation); ``holder``
        is the peer it came from (a link entry is not sent back there)."""
        if key[0] not in ("m", "l"):
            raise ValueError(f"a transmit key starts with 'm' or 'l', got {key!r}")
        self._counter += 1
        self._members.remove(key)
        self._links.remove(key)
        lane = self._members if key[0] == "m" else self._links
        lane.add(key, item, -1 if prio else 0, self._counter)
        lane.order[key] = None
        if holder is not None and lane is self._links:
            lane.holders[key] = {holder}
        if lane is self._links and self.link_depth is not None:
            while len(lane.order) > self.link_depth:
                lane.remove(next(iter(lane.order)))
                self.pruned += 1

    def held_by(self, key: tuple[Hashable, ...], item: Signed, holder: str,
                everyone: int) -> None:
        """``holder`` sent us ``item`` again: it holds it. A link entry that ``everyone``
        peers hold leaves the queue."""
        lane = self._links
        queued = lane.items.get(key)
        if key[0] != "l" or queued is None or queued[0] != item:
            return
        holders = lane.holders.setdefault(key, set())
        holders.add(holder)
        if len(holders) >= everyone:
            lane.remove(key)

    def take(
        self, max_each: int, limit: int, to: str | None = None, everyone: int = 0,
        link_limit: int | None = None,
    ) -> tuple[list[Signed], list[Signed]]:
        """Up to ``max_each`` member updates and link entries for one packet to peer
        ``to`` (None: no one in particular) of ``everyone`` peers; each member update is
        sent at most ``limit`` times, each link entry at most ``link_limit`` times (default
        ``limit``) and never to a peer known to hold it."""
        links = self._links.take(max_each, limit if link_limit is None else link_limit, to,
                                 everyone)
        return self._members.take(max_each, limit), links
