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
statements (mesh.links.control_msgs.Signed) as their speakers signed them.
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable
from typing import Any

from mesh.links.control_msgs import Signed

__all__ = ["TransmitQueue"]


class _Lane:
    """The queued updates of one kind."""

    def __init__(self) -> None:
        self.items: dict[Hashable, tuple[Any, int, int]] = {}  # key -> (item, sent, number)
        #: sent count -> [(insertion number, key)] in ascending insertion order
        self.by_sent: dict[int, list[tuple[int, Hashable]]] = {}

    def remove(self, key: Hashable) -> None:
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

    def take(self, count: int, limit: int) -> list[Any]:
        """The first ``count`` items (least sent, then newest), each counted as sent once
        more; an item sent ``limit`` times leaves the queue."""
        out: list[Any] = []
        moved: list[tuple[int, int, Hashable, Any]] = []
        for sent in sorted(self.by_sent):
            if len(out) >= count:
                break
            row = self.by_sent[sent]
            tail = row[len(row) - min(count - len(out), len(row)):]  # the newest of the row
            del row[len(row) - len(tail):]
            if not row:
                del self.by_sent[sent]
            for number, key in reversed(tail):
                item = self.items[key][0]
                out.append(item)
                moved.append((max(sent, 0) + 1, number, key, item))
        for sent, number, key, item in moved:
            if sent < limit:
                self.add(key, item, sent, number)
            else:
                del self.items[key]
        return out


class TransmitQueue:
    def __init__(self) -> None:
        self._members = _Lane()
        self._links = _Lane()
        self._counter = 0

    def __len__(self) -> int:
        return len(self._members.items) + len(self._links.items)

    def put(self, key: tuple[Hashable, ...], item: Signed, prio: bool = False) -> None:
        """Queue ``item`` under ``key`` (``("m", ...)`` a member statement, ``("l", ...)`` a
        link entry); ``prio`` puts it before everything queued (a refutation)."""
        if key[0] not in ("m", "l"):
            raise ValueError(f"a transmit key starts with 'm' or 'l', got {key!r}")
        self._counter += 1
        self._members.remove(key)
        self._links.remove(key)
        lane = self._members if key[0] == "m" else self._links
        lane.add(key, item, -1 if prio else 0, self._counter)

    def take(
        self, max_each: int, limit: int, link_limit: int | None = None
    ) -> tuple[list[Signed], list[Signed]]:
        """Up to ``max_each`` member updates and link entries for one packet; a member
        update is sent at most ``limit`` times, a link entry ``link_limit`` (default the
        same)."""
        links = self._links.take(max_each, limit if link_limit is None else link_limit)
        return self._members.take(max_each, limit), links
