"""The node's v3 data plane, assembled (:mod:`federation.dataplane.v3_protocol`): the AMST
listener on the DC's ``data`` endpoint (which also relays other DCs' streams,
:mod:`federation.dataplane.relay`), the target side, and the source's per-migration state.

Chunks follow the bulk route the mesh elects (:mod:`mesh.links.routes`): directly to the
target's data endpoint, or, when the route is a detour through DC X, over streams that X
splices to the target (end-to-end encrypted; X only copies bytes). A stream X refuses or
cannot carry goes direct instead. A round's route is read when the round starts.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from federation.config import ConfigError
from federation.dataplane.relay import RELAY_ERRORS, DataRelay, RelayOpen, open_relayed
from federation.dataplane.v3_protocol import (
    V3Hde,
    V3Round,
    V3Status,
    choose_chunk_level,
    connect_data,
)
from federation.dataplane.v3_source import RESUME_BUDGET_S, SourceState, V3RoundSender
from federation.dataplane.v3_target import V3Receiver
from federation.migration.vocabulary import SendRound
from mesh.channel import SecureChannel
from mesh.hde.image import ImageWriter
from mesh.links.routes import BULK

if TYPE_CHECKING:
    from federation.node.assembly import Node

__all__ = ["NodeV3"]


class NodeV3:
    def __init__(self, node: Node) -> None:
        self.node = node
        me = node.fed.dc(node.name)
        self.host, self.port = me.data.host, me.data.port
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hde")
        self.sources: dict[str, SourceState] = {}
        self.receiver = V3Receiver(
            backend=node.backend, new_channel=lambda: self._channel(None),
            send=node.runtime.send, session_ok=self._session_ok, incoming=self._incoming,
            note_pages=self._note_pages, log=node.log, stats=node.transfer_stats,
            executor=self.executor, note_chunk=self._note_chunk)
        self.relay = DataRelay(node.name, self._address, node.log)
        self.receiver.server.openers[RelayOpen] = self.relay.serve
        #: how long a round's data path may stay cut before the round fails
        self.resume_budget = RESUME_BUDGET_S
        #: streams opened through a relay, and relays that refused (then the stream went
        #: direct), as the source
        self.path_stats = {"relayed_streams": 0, "relay_fallbacks": 0}
        self._listeners: list[trio.SocketListener] = []

    def _channel(self, peer: str | None) -> SecureChannel:
        rt = self.node.runtime
        return SecureChannel(identity=rt.identity, name=rt.name, federation=rt.federation,
                             peers=rt.keys, versions=rt.versions, initiator=peer is not None,
                             peer=peer)

    def _address(self, dc: str) -> tuple[str, int] | None:
        try:
            d = self.node.fed.dc(dc)
        except ConfigError:
            return None
        return d.data.host, d.data.port

    def bulk_via(self, target: str) -> str | None:
        """The intermediate DC of the elected bulk route to ``target`` (None: direct)."""
        route = self.node.control.route(BULK, target)
        return route.via if route is not None else None

    async def bind(self) -> None:
        if not self._listeners:
            self._listeners = await trio.open_tcp_listeners(self.port, host=self.host)

    async def serve(self, nursery: trio.Nursery) -> None:
        """Accept AMST streams on the data endpoint until the node stops."""
        await self.bind()
        self.receiver.nursery = nursery
        listeners, self._listeners = self._listeners, []
        nursery.start_soon(self.receiver.server.serve, listeners, self.node.log)

    # ------------------------------------------------------------------ target side

    def _session_ok(self, mid: str, peer: str) -> str | None:
        core = self.node.core
        session = core.sessions.get(mid) if core is not None else None
        if session is None or session.source != peer or session.done:
            return None
        return session.vm

    def _incoming(self, mid: str) -> dict[str, ImageWriter] | None:
        return self.node.vm_actions.incoming.get(mid)

    def _note_chunk(self, mid: str, round_: int) -> None:
        # no page bytes yet (they are counted when the image is verified): only the news that
        # the round moves, for the target session's stall timer
        self.node._note_received(mid, round_, 0)

    def _note_pages(self, mid: str, round_: int, nbytes: int) -> None:
        self.node.transfer_stats["bytes_received"] += nbytes
        self.node.received_bytes[mid] = self.node.received_bytes.get(mid, 0) + nbytes

    # ------------------------------------------------------------------ source side

    def sender(self, action: SendRound, target: str, marks: dict[str, int]) -> V3RoundSender:
        state = self.sources.get(action.migration_id)
        if state is None:
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", action.migration_id)
            state = self.sources[action.migration_id] = SourceState(
                Path(self.node.data_dir) / "v3-shadow" / safe)
        ctl = self.node.control
        mode = ctl.modes.mode(self.node.name, target)
        view = ctl.table.view(self.node.name, target)
        default = self.node.fed.modes.datacenter_bandwidth_mbps

        def level(sample: list[bytes]) -> tuple[str, int]:
            return choose_chunk_level(sample, None if mode is None else mode.value,
                                      None if view is None else view.bw_mbps, default)

        return V3RoundSender(
            action, target, self.node.backend, state, marks, send=self.node.runtime.send,
            connect=self._connector(action.migration_id, target),
            new_channel=lambda: self._channel(target), choose_level=level,
            executor=self.executor, resume_budget=self.resume_budget)

    def _connector(self, mid: str, target: str) -> Callable[[], Awaitable[trio.abc.Stream]]:
        """How a round's streams reach ``target``: through the bulk route's relay if it
        names one, direct once the relay failed (for the rest of the round)."""
        via = self.bulk_via(target)
        direct = self._address(target)
        assert direct is not None, f"{target} is a DC of the federation"
        state = {"via": via}
        paths = self.node.stream_paths.setdefault(mid, {})

        async def connect() -> trio.abc.Stream:
            hop = state["via"]
            address = self._address(hop) if hop is not None else None
            if hop is not None and address is not None:
                try:
                    stream = await open_relayed(hop, address, self._channel(hop), target)
                except RELAY_ERRORS as exc:
                    state["via"] = None
                    self.path_stats["relay_fallbacks"] += 1
                    self.node.log.event("relay_fallback", migration_id=mid, via=hop,
                                        target=target, error=str(exc))
                else:
                    self.path_stats["relayed_streams"] += 1
                    paths[hop] = paths.get(hop, 0) + 1
                    return stream
            stream = await connect_data(*direct)
            paths["direct"] = paths.get("direct", 0) + 1
            return stream

        return connect

    # ------------------------------------------------------------------ both

    def metrics(self) -> Iterator[Metric]:
        """The data plane's own Prometheus families (the relay, the bulk paths taken)."""
        relayed = CounterMetricFamily("dwcp_relayed_bytes", "Bytes this DC spliced between "
                                      "other DCs' AMST streams (both ways; end-to-end "
                                      "encrypted, never decrypted here)")
        relayed.add_metric([], self.relay.relayed_bytes)
        yield relayed
        active = GaugeMetricFamily("dwcp_relays_active", "Connections this DC relays now")
        active.add_metric([], self.relay.active)
        yield active
        asked = CounterMetricFamily("dwcp_relay_requests", "Relay requests to this DC, by "
                                    "answer", labels=["answer"])
        asked.add_metric(["accepted"], self.relay.accepted)
        for kind, count in sorted(self.relay.refused.items()):
            asked.add_metric([kind], count)
        yield asked
        paths = CounterMetricFamily("dwcp_bulk_streams", "AMST streams this DC opened "
                                    "through a relay, and relay attempts that fell back to "
                                    "the direct path", labels=["path"])
        paths.add_metric(["relayed"], self.path_stats["relayed_streams"])
        paths.add_metric(["fallback_direct"], self.path_stats["relay_fallbacks"])
        yield paths

    def on_message(self, peer: str, msg: Any, sender: Any) -> None:
        """A ``data.v3.*`` message; ``sender`` is this node's running round of its migration
        (if any): a message from that round's target goes to it, others to the receiver."""
        if isinstance(sender, V3RoundSender) and sender.target == peer and isinstance(
                msg, (V3Hde, V3Status)):
            sender.deliver(msg)
        elif isinstance(msg, (V3Round, V3Hde)):
            self.receiver.on_message(peer, msg)

    def finish(self, mid: str) -> None:
        self.receiver.finish(mid)
        state = self.sources.pop(mid, None)
        if state is not None:
            state.close()

    def close(self) -> None:
        for mid in list(self.sources):
            self.finish(mid)
        self.executor.shutdown(wait=False)
