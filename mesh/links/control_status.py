"""What the mesh control plane of one DC reports: a read-only record per peer (membership,
the link's estimate and mode, the elected routes), so status pages and metrics need none
of the control plane's tables (:meth:`mesh.links.control_plane.MeshControl.status`)."""

from __future__ import annotations

import attrs

from mesh.gossip.members import State
from mesh.links.modes import Mode

__all__ = ["PeerStatus", "MeshStatus"]


@attrs.frozen
class PeerStatus:
    peer: str
    member: State
    #: this DC's view of the link to the peer once both ends reported (else this DC's own
    #: measurements, before the peer's report): None where nothing is known yet
    rtt_ms: float | None
    loss: float | None
    bandwidth_mbps: float | None
    down: bool | None
    mode: Mode | None
    #: route kind (control, bulk) -> the elected hops to the peer (None: no route)
    routes: tuple[tuple[str, tuple[str, ...] | None], ...]

    def route(self, kind: str) -> tuple[str, ...] | None:
        return dict(self.routes).get(kind)


@attrs.frozen
class MeshStatus:
    me: str
    #: one per peer, in name order
    peers: tuple[PeerStatus, ...]
    #: gossip statements refused so far, by reason (mesh.gossip.statements.REFUSALS)
    gossip_refused: tuple[tuple[str, int], ...] = ()
