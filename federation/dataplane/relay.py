"""Bulk data through a third DC: the mesh may elect a bulk route ``source -> X -> target``
(:mod:`mesh.links.routes`, a one-hop detour as in RON), and then the AMST streams of a transfer
go through X.

X only splices TCP. A stream that wants a detour opens a connection to X's data endpoint
and a secure channel *with X* on it (so X knows a federation member asks), sends
:class:`RelayOpen` naming the final target, and X answers :class:`RelayAnswer`: refused
(why), or accepted once X has a TCP connection to the target's data endpoint. From then on
X copies bytes both ways and never looks at them: the source runs the AMST stream's own
secure channel over the splice, end to end with the target (X25519 + Ed25519 handshake
bound to both DC names, then secretstream; :mod:`mesh.channel`), so X can neither read
the VM state nor change a byte of it without the target refusing the stream.

The source falls back to the direct path when X refuses or cannot be reached.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import trio

from federation.dataplane.v3_protocol import connect_data
from mesh import wire
from mesh.channel import SecureChannel
from mesh.runtime.amst_stream import HANDSHAKE_TIMEOUT_S, NET_ERRORS, Link
from mesh.runtime.log import JsonLog
from mesh.wire import Bool, Text, field

__all__ = ["RelayOpen", "RelayAnswer", "RelayRefused", "DataRelay", "open_relayed",
           "MAX_RELAYS", "SPLICE_BYTES", "RELAY_ERRORS"]

#: Connections a DC relays at once. One transfer opens at most 16 streams (AMST's internet
#: bound, mesh.amst.policy.STREAM_BOUNDS); 32 lets two detoured transfers run at their
#: widest through one DC, while a relay's buffers stay at 32 x 2 x SPLICE_BYTES (4 MiB).
MAX_RELAYS = 32
#: Bytes read per splice step: 64 KiB, the largest TCP segment offload unit Linux hands to
#: a socket read (GSO/GRO max 64 KiB), so one read takes what one wake-up of the kernel has.
SPLICE_BYTES = 64 * 1024


@wire.message("data.relay.open")
class RelayOpen:
    """Source -> relay, on a secure channel with the relay: splice me to ``target``'s data
    endpoint."""

    target: str = field(Text(64))


@wire.message("data.relay.answer")
class RelayAnswer:
    """Relay -> source: ``ok`` (the splice starts after this frame) or why not."""

    ok: bool = field(Bool())
    reason: str = field(Text(256), default="")


class RelayRefused(Exception):
    """The relay DC refused to splice (busy, unknown target, target unreachable)."""


class DataRelay:
    """The relay end in a node's data listener. ``address(dc)`` is a DC's data endpoint
    (None for a name outside the federation)."""

    def __init__(self, me: str, address: Callable[[str], tuple[str, int] | None], log: JsonLog,
                 limit: int = MAX_RELAYS) -> None:
        self.me = me
        self.address = address
        self.log = log
        self.limit = limit
        self.active = 0
        self.relayed_bytes = 0
        self.accepted = 0
        self.refused: dict[str, int] = {}

    def _refusal(self, peer: str | None, target: str) -> tuple[str, str] | None:
        """(reason kind, message) when the request is refused."""
        if peer is None or self.address(peer) is None:
            return "not_member", "the requester is not a member of the federation"
        if target in (self.me, peer) or self.address(target) is None:
            return "bad_target", f"{target!r} is not a third DC of the federation"
        if self.active >= self.limit:
            return "busy", f"{self.me} relays {self.active} connections already"
        return None

    async def serve(self, link: Link, request: RelayOpen) -> None:
        """Answer ``request`` on ``link`` (a channel with a federation member, handshake
        done) and, if accepted, splice it to the target until either side ends."""
        peer = link.channel.peer
        refusal = self._refusal(peer, request.target)
        if refusal is not None:
            await self._refuse(link, peer, request.target, *refusal)
            return
        self.active += 1
        try:
            host, port = self.address(request.target) or ("", 0)
            try:
                upstream = await connect_data(host, port)
            except (OSError, trio.TooSlowError) as exc:
                await self._refuse(link, peer, request.target, "unreachable",
                                   f"{request.target} is unreachable from {self.me}: {exc}")
                return
            async with upstream:
                await link.send_message(RelayAnswer(True))
                self.accepted += 1
                broken = await self._splice(link.sock, upstream)
                if broken:
                    self.log.event("relay_broken", peer=peer, target=request.target,
                                   error=broken)
        finally:
            self.active -= 1

    async def _refuse(self, link: Link, peer: str | None, target: str, kind: str,
                      why: str) -> None:
        self.refused[kind] = self.refused.get(kind, 0) + 1
        self.log.event("relay_refused", peer=peer, target=target, reason=why)
        await link.send_message(RelayAnswer(False, why))

    async def _splice(self, a: trio.abc.Stream, b: trio.abc.Stream) -> str:
        """Copy both ways; an end of one direction is passed on (half close), a broken
        side ends both (returns what broke, "" for a clean end)."""

        async def pump(src: trio.abc.Stream, dst: trio.abc.Stream) -> None:
            while data := await src.receive_some(SPLICE_BYTES):
                await dst.send_all(data)
                self.relayed_bytes += len(data)
            with contextlib.suppress(*NET_ERRORS):
                await dst.send_eof()  # type: ignore[attr-defined]

        broken: list[str] = []
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, a, b)
                nursery.start_soon(pump, b, a)
        except* NET_ERRORS as group:  # a side reset: the streams' ends see it and resume
            broken.append(str(group.exceptions[0]))
        return broken[0] if broken else ""


async def open_relayed(via: str, address: tuple[str, int], channel: SecureChannel,
                       target: str) -> trio.abc.Stream:
    """A TCP stream to ``target``'s data endpoint spliced through DC ``via`` (reached at
    ``address``; ``channel`` is a fresh initiator channel to ``via``). Raises
    :class:`RelayRefused` if ``via`` says no, a network or channel error if it cannot be
    reached."""
    sock = await connect_data(*address)
    link = Link(sock, channel)
    try:
        await link.handshake()
        await link.send_message(RelayOpen(target))
        # the relay connects to the target before it answers
        with trio.fail_after(HANDSHAKE_TIMEOUT_S):
            answer = await link.next_message((RelayAnswer,))
    except BaseException:
        await link.aclose()
        raise
    if answer is None or not answer.ok:
        await link.aclose()
        why = answer.reason if answer is not None else "closed without an answer"
        raise RelayRefused(f"{via} refused to relay to {target}: {why}")
    return link.detach()


#: What a failed attempt to open a relayed stream raises (then the source goes direct).
RELAY_ERRORS = (*NET_ERRORS, trio.TooSlowError, wire.WireError, RelayRefused)
