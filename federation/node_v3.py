"""The node's v3 data plane, assembled (:mod:`federation.data_v3`): the AMST listener on
the DC's ``data`` endpoint, the target side, and the source's per-migration state.

Chunks go *directly* to the target's data endpoint. The bulk route the mesh elects
(:mod:`mesh.routing`) may name a detour; AMST has no relay at an intermediate DC, so a
v3 transfer whose direct path is cut fails its round and the session aborts, as a v1
round over a cut control link does.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from federation.data_v3 import V3Hde, V3Round, V3Status, choose_chunk_level
from federation.data_v3_source import SourceState, V3RoundSender
from federation.data_v3_target import V3Receiver
from federation.migration import SendRound
from mesh.channel import SecureChannel
from mesh.hde.image import ImageWriter

if TYPE_CHECKING:
    from federation.node import Node

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
            executor=self.executor)
        self._listeners: list[trio.SocketListener] = []

    def _channel(self, peer: str | None) -> SecureChannel:
        rt = self.node.runtime
        return SecureChannel(identity=rt.identity, name=rt.name, federation=rt.federation,
                             peers=rt.keys, versions=rt.versions, initiator=peer is not None,
                             peer=peer)

    async def bind(self) -> None:
        if not self._listeners:
            self._listeners = await trio.open_tcp_listeners(self.port, host=self.host)

    async def serve(self, nursery: trio.Nursery) -> None:
        """Accept AMST streams on the data endpoint until the node stops."""
        await self.bind()
        self.receiver.nursery = nursery
        listeners, self._listeners = self._listeners, []
        nursery.start_soon(trio.serve_listeners, self.receiver.server.handle_stream, listeners)

    # ------------------------------------------------------------------ target side

    def _session_ok(self, mid: str, peer: str) -> str | None:
        core = self.node.core
        session = core.sessions.get(mid) if core is not None else None
        if session is None or session.source != peer or session.done:
            return None
        return session.vm

    def _incoming(self, mid: str) -> dict[str, ImageWriter] | None:
        return self.node.vm_actions.incoming.get(mid)

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
        dc = self.node.fed.dc(target)
        ctl = self.node.control
        mode = ctl.modes.mode(self.node.name, target)
        view = ctl.table.view(self.node.name, target)
        default = self.node.fed.modes.datacenter_bandwidth_mbps

        def level(sample: list[bytes]) -> tuple[str, int]:
            return choose_chunk_level(sample, None if mode is None else mode.value,
                                      None if view is None else view.bw_mbps, default)

        return V3RoundSender(
            action, target, self.node.backend, state, marks, send=self.node.runtime.send,
            connect=lambda: trio.open_tcp_stream(dc.data.host, dc.data.port),
            new_channel=lambda: self._channel(target), choose_level=level,
            executor=self.executor)

    # ------------------------------------------------------------------ both

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
