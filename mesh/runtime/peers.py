"""Which connection is each peer's link: the tie-break, and the PeerUp/PeerDown the cores see.

Every authenticated connection is offered to :meth:`PeerTable.adopt`; it
becomes the peer's link, replaces the current one, or is retired as a
duplicate (:func:`mesh.runtime.link_policy.keep_new_link`). A swap between two live
connections of the same peer process is invisible to the cores; a restarted
peer (a new incarnation) is ``PeerDown`` then ``PeerUp``. One lock orders these
deliveries, so a core never sees a peer's events out of order.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import attrs
import trio

from mesh.core import Event, PeerDown, PeerUp
from mesh.runtime.link import Link
from mesh.runtime.link_policy import keep_new_link
from mesh.runtime.log import JsonLog

__all__ = ["PeerTable", "LinkInfo"]


@attrs.frozen
class LinkInfo:
    peer: str
    version: int  # the highest transfer version both offer (mesh.versions)
    peer_versions: tuple[int, ...]  # the peer's whole offer, from its handshake
    initiator: str
    link_id: int
    since: float  # trio.current_time() when it became the peer's link


class PeerTable:
    def __init__(
        self,
        name: str,
        peer_count: int,
        *,
        log: JsonLog,
        deliver: Callable[[Event], Awaitable[None]],
    ) -> None:
        self.name = name
        self.peer_count = peer_count
        self.log = log
        self._deliver = deliver
        self._active: dict[str, Link] = {}
        self._since: dict[str, float] = {}
        self._lock = trio.Lock()
        #: Set (and replaced) whenever a peer gains or loses its link.
        self.changed = trio.Event()

    def wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def link(self, peer: str) -> Link | None:
        return self._active.get(peer)

    def info(self) -> dict[str, LinkInfo]:
        return {
            peer: LinkInfo(
                peer, link.version, link.peer_versions, link.claim.initiator, link.link_id,
                self._since[peer],
            )
            for peer, link in sorted(self._active.items())
        }

    async def adopt(self, link: Link) -> bool:
        """Offer a new connection; True if it became the peer's link."""
        async with self._lock:
            peer = link.peer
            current = self._active.get(peer)
            if current is not None and not keep_new_link(
                self.name, peer, current.claim, link.claim
            ):
                self.log.event(
                    "link_duplicate", peer=peer, kept=current.link_id, closed=link.link_id
                )
                link.retire(superseded=True)
                return False
            self._active[peer] = link
            self.wake()
            if current is None:
                await self._up(link)
                return True
            current.retire(superseded=True)
            if current.claim.peer_incarnation == link.claim.peer_incarnation:
                self.log.event(
                    "link_replaced", peer=peer, kept=link.link_id, closed=current.link_id,
                    initiator=link.claim.initiator,
                )
                return True
            # The peer restarted: the cores must see it go and come back.
            self.log.event("peer_down", peer=peer, reason="peer_restarted", link=current.link_id)
            await self._deliver(PeerDown(peer))
            await self._up(link)
            return True

    async def _up(self, link: Link) -> None:
        self._since[link.peer] = trio.current_time()
        self.log.event(
            "peer_up",
            peer=link.peer,
            version=link.version,
            peer_versions=list(link.peer_versions),
            framing="frames" if link.framed else "websocket",
            initiator=link.claim.initiator,
            link=link.link_id,
            up=len(self._active),
            of=self.peer_count,
        )
        await self._deliver(PeerUp(link.peer))

    async def ended(self, link: Link, reason: str) -> None:
        """A connection ended; if it was the peer's link, the peer is down."""
        async with self._lock:
            if self._active.get(link.peer) is not link:
                return
            del self._active[link.peer]
            del self._since[link.peer]
            self.wake()
            self.log.event(
                "peer_down",
                peer=link.peer,
                reason=reason,
                link=link.link_id,
                up=len(self._active),
                of=self.peer_count,
            )
            await self._deliver(PeerDown(link.peer))
