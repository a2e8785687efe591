"""The retransmit-limited broadcast queue of gossip dissemination.

Modelled on memberlist's ``TransmitLimitedQueue``: every update is sent at most
``limit`` times (the caller passes ``RetransmitMult * ceil(log10(N + 1))``, the
lambda * log N of SWIM §4.1); the least-sent updates go first, the newest first among
equals; a newer update with the same key replaces the queued one (it invalidates it).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from mesh.control_msgs import LinkEntry, MemberUpdate

__all__ = ["TransmitQueue"]


class TransmitQueue:
    def __init__(self) -> None:
        # key -> [item, transmits, insertion number]
        self._items: dict[Hashable, list[Any]] = {}
        self._counter = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, key: Hashable, item: MemberUpdate | LinkEntry, prio: bool = False) -> None:
        """Queue ``item``; ``prio`` puts it before everything queued (a refutation)."""
        self._counter += 1
        self._items.pop(key, None)
        self._items[key] = [item, -1 if prio else 0, self._counter]

    def take(
        self, max_each: int, limit: int
    ) -> tuple[list[MemberUpdate], list[LinkEntry]]:
        """Up to ``max_each`` member updates and link entries for one packet."""
        order = sorted(self._items.items(), key=lambda kv: (kv[1][1], -kv[1][2]))
        members: list[MemberUpdate] = []
        links: list[LinkEntry] = []
        spent: list[Hashable] = []
        for key, slot in order:
            item = slot[0]
            bucket: list[Any] = members if isinstance(item, MemberUpdate) else links
            if len(bucket) >= max_each:
                if len(members) >= max_each and len(links) >= max_each:
                    break
                continue
            bucket.append(item)
            slot[1] = max(slot[1], 0) + 1
            if slot[1] >= limit:
                spent.append(key)
        for key in spent:
            del self._items[key]
        return members, links
