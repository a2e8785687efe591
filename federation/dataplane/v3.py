"""The node's v3 data plane, assembled (:mod:`federation.dataplane.v3_protocol`): the AMST
listener on the DC's ``data`` endpoint (which also relays other DCs' streams,
:mod:`federation.dataplane.relay`), the target side and the source side. The rounds core
(:mod:`federation.migration.rounds`) drives both; :meth:`V3DataPlane.carry_out` takes
its ``V3*`` actions.

Chunks follow the bulk route the mesh elects (:mod:`mesh.links.routes`): directly to the
target's data endpoint, or, when the route is a detour through DC X, over streams that X
splices to the target (end-to-end encrypted; X only copies bytes). A stream X refuses or
cannot carry goes direct instead. A round's route is read when the round starts.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nacl.utils
import trio

from federation import config
from federation.dataplane.relay import RELAY_ERRORS, DataRelay, RelayOpen, open_relayed
from federation.dataplane.v3_protocol import choose_chunk_level, connect_data
from federation.dataplane.v3_source import Connect, V3Sender
from federation.dataplane.v3_target import V3Receiver
from federation.migration.round_events import (
    V3Accept,
    V3Cancel,
    V3Drop,
    V3Prepare,
    V3RelayFallback,
    V3Resume,
    V3StreamOpened,
    V3Transfer,
)
from federation.migration.round_messages import V3Hde
from federation.vms.backend import VmBackend
from federation.vms.sealing import KEY_SIZE, SealKey
from mesh import versions
from mesh.channel import SecureChannel
from mesh.hde.image import ImageWriter
from mesh.hde.index import PageIndex
from mesh.links.control_plane import MeshControl
from mesh.links.routes import BULK
from mesh.runtime.log import JsonLog
from mesh.runtime.node_runtime import Runtime

__all__ = ["V3DataPlane"]


class V3DataPlane:
    """``incoming(mid)`` gives a migration's prepared incoming images (the VM actions'
    interpreter holds them); ``report`` takes the drivers' reports for the rounds core."""

    def __init__(
        self,
        *,
        fed: config.Federation,
        name: str,
        runtime: Runtime,
        control: MeshControl,
        backend: VmBackend,
        incoming: Callable[[str], dict[str, ImageWriter] | None],
        data_dir: Path,
        index_of: Callable[[str, str], PageIndex] | None = None,
        fenced_indexes: Callable[[str], dict[str, PageIndex] | None] | None = None,
        log: JsonLog,
        report: Callable[[object], None],
        seal_shadows: bool = False,
    ) -> None:
        self.fed = fed
        self.name = name
        self.runtime = runtime
        #: capabilities this DC's data channels offer besides its transfer versions
        self.capabilities: tuple[int, ...] = (versions.AMST_SEALED, versions.HDE_COPIES)
        self.control = control
        self.log = log
        self.report = report
        me = fed.dc(name)
        self.host, self.port = me.data.host, me.data.port
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hde")
        self.receiver = V3Receiver(
            backend=backend, new_channel=lambda: self._channel(None), send=runtime.send,
            incoming=incoming, report=report, log=log, executor=self.executor,
            index_of=index_of, peer_offer=self._peer_offer)
        self.sender = V3Sender(
            shadow_dir=data_dir / "v3-shadow", backend=backend, send=runtime.send,
            connector=self._connector, new_channel=self._channel, level_for=self._level_for,
            report=report, executor=self.executor, fenced_indexes=fenced_indexes,
            # the shadows' key lives in this process only (federation.dataplane.v3_shadow)
            scratch_key=SealKey(nacl.utils.random(KEY_SIZE)) if seal_shadows else None)
        self.relay = DataRelay(name, self._address, log)
        self.receiver.server.openers[RelayOpen] = self.relay.serve
        self._listeners: list[trio.SocketListener] = []

    def _channel(self, peer: str | None) -> SecureChannel:
        """A data channel: the DC's transfer versions and :attr:`capabilities` (AMST's
        sealed chunks, HDE's chunk copies; each used when the peer offers it too,
        mesh.versions)."""
        rt = self.runtime
        offer = (*rt.versions, *self.capabilities)
        return SecureChannel(identity=rt.identity, name=rt.name, federation=rt.federation,
                             peers=rt.keys, versions=offer, initiator=peer is not None,
                             peer=peer)

    def _peer_offer(self, peer: str) -> tuple[int, ...]:
        """``peer``'s whole offer on its control link (none while no link is up)."""
        link = self.runtime.links.get(peer)
        return () if link is None else tuple(link.peer_versions)

    def _address(self, dc: str) -> tuple[str, int] | None:
        try:
            d = self.fed.dc(dc)
        except config.ConfigError:
            return None
        return d.data.host, d.data.port

    def bulk_via(self, target: str) -> str | None:
        """The intermediate DC of the elected bulk route to ``target`` (None: direct)."""
        route = self.control.route(BULK, target)
        return route.via if route is not None else None

    async def bind(self) -> None:
        if not self._listeners:
            self._listeners = await trio.open_tcp_listeners(self.port, host=self.host)

    async def serve(self, nursery: trio.Nursery) -> None:
        """Accept AMST streams on the data endpoint until the node stops."""
        await self.bind()
        self.receiver.nursery = self.sender.nursery = nursery
        listeners, self._listeners = self._listeners, []
        nursery.start_soon(self.receiver.server.serve, listeners, self.log)

    # ------------------------------------------------------------------ the rounds core

    def carry_out(self, action: object) -> None:
        """A ``V3*`` action of the rounds core."""
        if isinstance(action, V3Prepare):
            self.sender.prepare(action)
        elif isinstance(action, V3Transfer):
            self.sender.go(action.migration_id, action.round)
        elif isinstance(action, V3Resume):
            self.sender.resume(action.migration_id, action.round)
        elif isinstance(action, V3Cancel):
            self.sender.cancel(action.migration_id)
        elif isinstance(action, V3Accept):
            self.receiver.accept(action)
        elif isinstance(action, V3Drop):
            self.receiver.finish(action.migration_id)
            self.sender.drop(action.migration_id)
        else:
            raise TypeError(f"the v3 data plane takes no {type(action).__name__}")

    def on_diff(self, peer: str, msg: V3Hde) -> None:
        """A diff message: for the round this DC sends to ``peer``, else for one it
        receives from ``peer``."""
        if not self.sender.deliver(peer, msg):
            self.receiver.on_diff(peer, msg)

    # ------------------------------------------------------------------ source side

    def _level_for(self, target: str) -> Callable[[list[bytes]], tuple[str, int]]:
        """How a migration's chunk level is chosen: encode rates measured here against the
        link rate measured for ``target`` (the mesh's estimate when the level is chosen,
        after the round's preparation). A link not measured yet (no transfer to that peer
        so far) is taken at the slowest rate DESIGN's hybrid range allows, the internet
        threshold (100 Mbit/s by default): a level too slow for a faster link costs the
        first second of the transfer, until the chunk-by-chunk governor steps down
        (mesh.hde.level.LevelGovernor); a level too fast for a slow link costs bytes that
        are never won back, and decides whether pages are chunked by similarity."""
        default = self.fed.modes.internet_bandwidth_mbps

        def level(sample: list[bytes]) -> tuple[str, int]:
            mode = self.control.modes.mode(self.name, target)
            view = self.control.table.view(self.name, target)
            return choose_chunk_level(sample, None if mode is None else mode.value,
                                      None if view is None else view.bw_mbps, default)

        return level

    def _connector(self, mid: str, target: str) -> Connect:
        """How a round's streams reach ``target``: through the bulk route's relay if it
        names one, direct once the relay failed (for the rest of the round)."""
        via = self.bulk_via(target)
        direct = self._address(target)
        assert direct is not None, f"{target} is a DC of the federation"
        state = {"via": via}

        async def connect() -> trio.abc.Stream:
            hop = state["via"]
            address = self._address(hop) if hop is not None else None
            if hop is not None and address is not None:
                try:
                    stream = await open_relayed(hop, address, self._channel(hop), target)
                except RELAY_ERRORS as exc:
                    state["via"] = None
                    self.report(V3RelayFallback(mid, hop))
                    self.log.event("relay_fallback", migration_id=mid, via=hop,
                                   target=target, error=str(exc))
                else:
                    self.report(V3StreamOpened(mid, hop))
                    return stream
            stream = await connect_data(*direct)
            self.report(V3StreamOpened(mid, None))
            return stream

        return connect

    def close(self) -> None:
        self.sender.close()
        for mid in list(self.receiver.stores):
            self.receiver.finish(mid)
        self.executor.shutdown(wait=False)
