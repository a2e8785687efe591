"""The trio runtime of a node: the control mesh, and the host of sans-I/O cores.

A :class:`Runtime` listens with trio-websocket on its DC's control endpoint,
dials every peer, and runs a :class:`mesh.channel.SecureChannel` over each
websocket (one websocket message = one channel frame). It keeps exactly one
authenticated control connection per pair of DCs (tie-break:
:func:`mesh.runtime.link_policy.keep_new_link`), redials a lost peer with
exponential backoff and full jitter (:class:`mesh.runtime.link_policy.Backoff`),
and shuts down cleanly: every task lives in one nursery tree, every link ends
with its final frame in each direction.

Hosting cores — the interface later layers (gossip, PBFT, migration) use, and
that ``sim/`` mirrors over its virtual network::

    runtime.add_core("gossip", core, tags=("gossip.",))

``core`` is anything with ``handle(now, event) -> list[Action]``
(:mod:`mesh.core`). ``tags`` are wire message tags; one ending in ``.`` is a
prefix. The runtime delivers to the core, one event at a time, with ``now =
trio.current_time()`` (a frame's messages for one core together, handled by the
link's reader itself when the core is idle: :mod:`mesh.runtime.hosting`):

* ``Received(peer, message, raw)`` for each message whose tag it registered
  (``raw`` is the decrypted frame, for signature checks over received bytes);
* ``TimerFired(key)`` for its own timers;
* ``PeerUp(peer)`` / ``PeerDown(peer)`` for every peer (a restarted peer gives
  ``PeerDown`` then ``PeerUp``; a tie-break swap of connections gives neither,
  also when the losing connection closes before the winner arrives).

A core may also have ``start(now) -> list[Action]``, called once when the
runtime starts, and the node can run work in a core's turn with ``await
runtime.invoke(name, fn)`` (``fn(core, now) -> actions``), both as in the
simulator. The runtime executes the returned actions (:mod:`mesh.runtime.hosting`): ``Send`` ->
encode, encrypt, send on the peer's link (dropped and counted if the peer is
down or its outbox is full: cores treat the network as lossy), ``SetTimer`` /
``CancelTimer``, ``Persist`` -> the store given to the runtime (durable before
the core's next event), ``Notify`` -> a log line. Plain callbacks can take
messages too: ``runtime.add_handler(tags, fn)`` calls ``fn(peer, message)``.

Observability: ``runtime.links`` (the open links), ``runtime.refused`` (channel
faults counted per :class:`ChannelError` reason, and connections dropped before their
handshake: "source_limit", "early_drop", "startups_full", "handshake_deadline"),
``runtime.counters``, and one JSON log line per event (:mod:`mesh.runtime.log`).

Before its handshake completes a connection is from nobody, and costs the node only
bounded memory, descriptors and time: the control listener admits unauthenticated
connections through a :class:`mesh.runtime.admission.StartupGate` (OpenSSH's
MaxStartups, :data:`CONTROL_STARTUPS`), each must finish the websocket upgrade, the
channel handshake and the link hello within :data:`HANDSHAKE_TIMEOUT` of its accept,
the websocket buffers no message longer than the handshake frame expected
(:func:`mesh.runtime.link.bound_messages`), and whatever one connection raises ends
that connection only. Running out of descriptors makes the accept loop back off
(:func:`mesh.runtime.admission.serve_listeners`).

Message order: messages on one link arrive in order. When a tie-break swaps
links, a message sent just before the swap on the old link may arrive after
one sent on the new link; cores never rely on cross-link order.
"""

from __future__ import annotations

import errno
import random
import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

import attrs
import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    WebSocketRequest,
    connect_websocket,
    wrap_server_stream,
)
from wsproto.utilities import LocalProtocolError

from mesh import versions as transfer_versions
from mesh import wire
from mesh.channel import MAX_PLAINTEXT, ChannelError, Hello, SecureChannel, Welcome
from mesh.core import Core, Event, Received, Send, Store
from mesh.federation_print import NO_PRINT, FederationPrint
from mesh.identity import Identity, PublicKey
from mesh.runtime import admission
from mesh.runtime.admission import Startup, StartupGate, StartupLimits
from mesh.runtime.hosting import Handler, HostedCore, Invocation, Routes
from mesh.runtime.link import (
    HANDSHAKE_READ_BYTES,
    Link,
    LinkBundle,
    LinkFramed,
    LinkHeartbeat,
    LinkHello,
    LinkSuperseded,
    new_incarnation,
    open_link,
)
from mesh.runtime.link_policy import Backoff
from mesh.runtime.link_stream import DirectStream, close_connection
from mesh.runtime.log import JsonLog
from mesh.runtime.peers import LinkInfo, PeerTable

__all__ = ["Runtime", "Peer", "LinkInfo", "ListenError", "RESOURCE", "CONTROL_STARTUPS",
           "wall_clock"]


def wall_clock(now: float) -> float:
    """The wall clock (seconds since the epoch) for a core hosted here, whose ``now`` is
    trio's clock: its origin is arbitrary (trio adds a random offset on purpose), so a
    core that needs a time other hosts can compare with (PBFT's batch times,
    consensus.pbft.batch_time) is given this instead of mapping ``now`` itself."""
    return time.time()

#: The websocket path of the control plane.
RESOURCE = "/dwcp/control/1"
#: Channel refusals that mean this DC and the peer disagree on the federation file:
#: kept per peer and reported (``peer_problems``: the node's /ready and status).
MISMATCHES = ("key_mismatch", "federation_mismatch")
#: TCP connect + websocket upgrade + channel handshake must finish within this.
#: Three round trips and two signatures take milliseconds; 5 s bounds what a
#: stalled or hostile peer can hold open, and stays inside the 10 s reconnect bound.
HANDSHAKE_TIMEOUT = 5.0
#: On SIGTERM, links get this long to exchange final frames before being cut
#: (one RTT each; 3 s is ample on a loaded machine and keeps shutdown quick).
SHUTDOWN_GRACE = 3.0
#: Websocket closing handshake bound (trio-websocket's default is 60 s).
CLOSE_TIMEOUT = 2.0
#: Unauthenticated control connections: OpenSSH's default MaxStartups 10:30:100
#: (sshd_config(5)). A DC dials each peer once at a time and a handshake takes
#: milliseconds, so honest startups rarely overlap. Per source address: half of
#: ``start``, so one address alone never pushes the listener into early drop, and room
#: for a host that runs several DCs (the demo and the tests run four on loopback).
CONTROL_STARTUPS = StartupLimits(start=10, rate=30, full=100, per_source=5)


class ListenError(Exception):
    """The control endpoint cannot be bound (address in use, not local, ...)."""


@attrs.frozen
class Peer:
    name: str
    public_key: PublicKey
    host: str
    port: int


class Runtime:
    def __init__(
        self,
        *,
        name: str,
        federation: str,
        identity: Identity,
        public_key: PublicKey,
        peers: Sequence[Peer],
        listen_host: str,
        listen_port: int,
        versions: Sequence[int],
        store: Store | None = None,
        log: JsonLog | None = None,
        rng: random.Random | None = None,
        fed_print: FederationPrint = NO_PRINT,
        framed: bool = True,
        capabilities: Sequence[int] = (),
    ) -> None:
        names = [p.name for p in peers]
        if name in names or len(set(names)) != len(names):
            raise ValueError(f"peers must be distinct and exclude {name!r} itself: {names}")
        if identity.public != public_key:
            raise ValueError(f"the identity key is not {name!r}'s public key {public_key}")
        self.name = name
        self.federation = federation
        self.identity = identity
        self.peers = {p.name: p for p in sorted(peers, key=lambda p: p.name)}
        self.keys = {p.name: p.public_key for p in self.peers.values()}
        self.keys[name] = public_key
        self.versions = tuple(versions)
        #: whether this end offers frames of its own on the control links
        #: (:data:`mesh.versions.CONTROL_FRAMES`); a peer without them keeps the websocket
        self.framed = framed
        framing = {transfer_versions.CONTROL_FRAMES} if framed else set()
        #: this end's whole offer on its control links: the transfer versions, and the
        #: capabilities (mesh.versions) the links and the layers above them read
        self._offer = tuple(sorted(set(self.versions) | framing | set(capabilities)))
        #: this DC's federation file, signed into every handshake (mesh.federation_print)
        self.fed_print = fed_print
        #: peers refused for presenting another key than the federation file's, or for
        #: running another federation file: peer -> what differs (until a link is up)
        self.peer_problems: dict[str, str] = {}
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.store = store
        self.log = log if log is not None else JsonLog(name)
        self.incarnation = new_incarnation()
        self.refused: dict[str, int] = {}
        self.counters: dict[str, int] = {}
        rng = rng if rng is not None else random.Random()
        self._backoff = Backoff(rng)
        self._gate = StartupGate(CONTROL_STARTUPS, random.Random(rng.getrandbits(64)))
        self._cores: dict[str, HostedCore] = {}
        self._routes = Routes()
        self._peers = PeerTable(name, len(self.peers), log=self.log, deliver=self._deliver_all)
        self._connections: dict[int, Link] = {}
        self._next_link_id = 1
        self._closed_one = trio.Event()
        self._stop = trio.Event()
        self._stopping = False
        self._unrouted_logged: set[str] = set()
        #: the last message encoded by send() and its bytes (messages are immutable)
        self._last_sent: tuple[object, bytes] = (None, b"")
        self._listeners: list[trio.SocketListener] = []
        self._running = False

    # ------------------------------------------------------------------ hosting

    def add_core(
        self,
        name: str,
        core: Core,
        tags: Iterable[str],
        effects: Callable[[object], bool] | None = None,
    ) -> None:
        """Host ``core``; call before :meth:`run`. ``effects(action)`` takes the host's own
        actions, in order with the core's others (True if it took one)."""
        if self._running:
            raise RuntimeError(f"add_core({name!r}) after the runtime started")
        if name in self._cores:
            raise ValueError(f"a core named {name!r} is already hosted")
        hosted = HostedCore(
            name, core, tuple(tags), send=self.send, store=self.store, log=self.log,
            effects=effects, send_group=self.send_group,
        )
        self._routes.add(hosted.tags, hosted)
        self._cores[name] = hosted

    def offloads(self) -> dict[str, dict[str, float]]:
        """Per hosted core that offloaded work: works started, ended, the longest's seconds."""
        return {name: dict(h.offloads) for name, h in self._cores.items()
                if h.offloads["started"]}

    def add_handler(self, tags: Iterable[str], handler: Handler) -> None:
        """Call ``handler(peer, message)`` for every message with one of ``tags``."""
        self._routes.add(tuple(tags), handler)

    async def invoke(self, core: str, fn: Invocation, label: str = "invoke") -> None:
        """Run ``fn(core_object, now)`` in ``core``'s turn and execute the actions it
        returns (the simulator's ``World.invoke``): how the node's API hands work to a
        core. Returns when that is done."""
        hosted = self._cores.get(core)
        if hosted is None:
            raise KeyError(f"no core named {core!r} (hosted: {', '.join(self._cores)})")
        await hosted.invoke(fn, label)

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    def _refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def _count_admission(self, what: str) -> None:
        """A connection the listener dropped or lost (admission.serve_listeners)."""
        if what in ("connection_failed", "accept_backoff"):
            self._count(what)
        else:
            self._refuse(what)

    # ------------------------------------------------------------------ public API

    @property
    def links(self) -> dict[str, LinkInfo]:
        """The peers with an open link, by name."""
        return self._peers.info()

    def send(self, peer: str, message: Any) -> bool:
        """Queue ``message`` for ``peer``; False (and counted) if it cannot be sent now."""
        link = self._hold(peer, message)
        if link is None:
            return False
        self._release(link)
        return True

    def send_group(self, sends: Sequence[Send]) -> None:
        """The sends of one group of a core's actions: each link's share leaves together,
        written from this turn when the link is quiet (:meth:`Link.release`)."""
        touched: dict[int, Link] = {}
        for send in sends:
            link = self._hold(send.peer, send.message)
            if link is not None:
                touched[link.link_id] = link
        for link in touched.values():
            self._release(link)

    def _hold(self, peer: str, message: Any) -> Link | None:
        link = self._peers.link(peer)
        if link is None:
            self._count("send_no_link")
            return None
        try:
            if message is self._last_sent[0]:  # a broadcast: the same message to each peer
                payload = self._last_sent[1]
            else:
                payload = wire.encode(message)
                self._last_sent = (message, payload)
            if len(payload) > MAX_PLAINTEXT:  # would end the link as "oversized"
                raise wire.WireError(f"{len(payload)} bytes exceeds a frame's {MAX_PLAINTEXT}")
        except wire.WireError as exc:
            self._count("send_invalid")
            self.log.event("send_invalid", peer=peer, error=str(exc))
            return None
        if not link.hold(payload):
            self._count("send_dropped")
            return None
        self._count("messages_out")
        return link

    def _release(self, link: Link) -> None:
        frames = link.direct_frames
        for _ in range(link.release()):
            self._count("send_dropped")
        if link.direct_frames != frames:  # frames written from a turn, not by the writer
            self.counters["frames_direct"] = (self.counters.get("frames_direct", 0)
                                              + link.direct_frames - frames)

    def shutdown(self) -> None:
        """Ask :meth:`run` to close every link with its final frame and return."""
        self._stop.set()

    async def listen(self) -> None:
        """Bind the control endpoint; raises :class:`ListenError`. :meth:`run` calls it
        if the caller has not (the CLI binds first, so the error is not wrapped in a
        nursery's exception group)."""
        if self._listeners:
            return
        where = f"{self.listen_host}:{self.listen_port}"
        try:
            self._listeners = await trio.open_tcp_listeners(self.listen_port, host=self.listen_host)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ListenError(f"control endpoint {where} is already in use") from None
            reason = exc.strerror or str(exc)
            raise ListenError(f"cannot listen on control endpoint {where}: {reason}") from None

    async def run(
        self, *, task_status: trio.TaskStatus[Runtime] = trio.TASK_STATUS_IGNORED
    ) -> None:
        if self._running:
            raise RuntimeError("Runtime.run() is already running")
        self._running = True
        await self.listen()
        listeners, self._listeners = self._listeners, []
        async with trio.open_nursery() as nursery:
            for hosted in self._cores.values():
                nursery.start_soon(hosted.run)
            # Our own accept loop and per-connection wrapper rather than
            # trio_websocket.WebSocketServer: any error inside one connection (a wsproto
            # error, trio-websocket issue #184, or anything a peer provokes) must end that
            # connection, not the node; and startups are capped before a handler runs.
            await nursery.start(partial(
                admission.serve_listeners, self._on_stream, listeners, self._gate,
                log=self.log, count=self._count_admission, what="control"))
            self.listen_port = listeners[0].socket.getsockname()[1]
            self.log.event(
                "listening",
                host=self.listen_host,
                port=self.listen_port,
                incarnation=self.incarnation.hex(),
                peers=list(self.peers),
            )
            for peer in self.peers.values():
                nursery.start_soon(self._dial_loop, peer)
            task_status.started(self)
            await self._stop.wait()
            await self._close_all()
            nursery.cancel_scope.cancel()
        self.log.event("stopped", refused=self.refused, counters=self.counters)

    # ------------------------------------------------------------------ shutdown

    async def _close_all(self) -> None:
        self._stopping = True
        self.log.event("stopping", links=len(self._connections))
        self._peers.wake()  # dialers waiting for a link change see that we stop
        for link in list(self._connections.values()):
            link.retire()
        with trio.move_on_after(SHUTDOWN_GRACE):
            while self._connections:
                await self._closed_one.wait()

    # ------------------------------------------------------------------ connections

    async def _dial_loop(self, peer: Peer) -> None:
        attempt = 0
        while not self._stopping:
            while self._peers.link(peer.name) is not None and not self._stopping:
                await self._peers.changed.wait()
            if self._stopping:
                return
            await trio.sleep(self._backoff.delay(attempt))
            if self._stopping:
                return
            if self._peers.link(peer.name) is not None:
                attempt = 0
                continue
            attempt = 0 if await self._dial(peer, attempt) else attempt + 1

    async def _dial(self, peer: Peer, attempt: int) -> bool:
        self._count("dials")
        became_link = False
        try:
            became_link = await self._dial_once(peer, attempt)
        except* LocalProtocolError as group:
            self._ws_protocol_error(peer.name, group)
        except* HandshakeError as group:
            # The peer refused the upgrade (a stopping node answers 503): trio-websocket
            # 0.12 raises ConnectionRejected in its reader task, which cancels
            # connect_websocket, so it leaves the connection's nursery in a group, past
            # _dial_once's except. A dial that failed: retried with backoff.
            self._count("dial_failures")
            self.log.event("dial_failed", peer=peer.name, attempt=attempt,
                           error=_describe(group.exceptions[0]))
        except* Exception as group:  # whatever the peer provoked ends this connection only
            self._count("connection_failed")
            exc = group.exceptions[0]
            self.log.event("connection_failed", peer=peer.name, direction="out",
                           error=f"{type(exc).__name__}: {exc}"[:300])
        return became_link

    def _ws_protocol_error(self, peer: str | None, group: BaseExceptionGroup) -> None:
        """trio-websocket answers a ping on a connection it is closing and wsproto
        refuses (trio-websocket issue #184, "_handle_ping_event() occasionally sends
        to closed socket"; fix not released in 0.12.2). The connection is over either
        way: count it and let the dial loop or the peer reconnect."""
        self._count("ws_protocol_errors")
        self.log.event("ws_protocol_error", peer=peer, error=_describe(group.exceptions[0]))

    async def _on_stream(self, stream: trio.SocketStream, startup: Startup) -> None:
        """One accepted TCP connection: the websocket upgrade, the channel handshake and
        the link hello, all within HANDSHAKE_TIMEOUT of the accept, then the link. Until
        the handshake completes the websocket takes no message longer than a Hello."""
        deadline = trio.current_time() + HANDSHAKE_TIMEOUT
        try:
            async with trio.open_nursery() as nursery:
                request: WebSocketRequest | None = None
                with trio.move_on_at(deadline):
                    request = await wrap_server_stream(
                        nursery, stream, max_message_size=Hello.wire_max_size,  # type: ignore[attr-defined]
                        receive_buffer_size=HANDSHAKE_READ_BYTES,
                    )
                if request is None:
                    self._refuse("handshake_deadline")
                    self.log.event("handshake_failed", peer=None, direction="in",
                                   remote=startup.source, error="no websocket upgrade in time")
                else:
                    await self._on_request(request, startup, deadline)
                nursery.cancel_scope.cancel()
        except* LocalProtocolError as group:
            self._ws_protocol_error(None, group)
        except* (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            self._count("accept_failures")
        finally:
            with trio.move_on_after(CLOSE_TIMEOUT) as scope:
                scope.shield = True
                await stream.aclose()

    async def _dial_once(self, peer: Peer, attempt: int) -> bool:
        deadline = trio.current_time() + HANDSHAKE_TIMEOUT
        async with trio.open_nursery() as conn_nursery:
            try:
                with trio.fail_at(deadline):
                    ws = await connect_websocket(
                        conn_nursery,
                        peer.host,
                        peer.port,
                        RESOURCE,
                        use_ssl=False,
                        # the first message we take is the peer's Welcome
                        max_message_size=Welcome.wire_max_size,  # type: ignore[attr-defined]
                        receive_buffer_size=HANDSHAKE_READ_BYTES,
                    )
            except (OSError, HandshakeError, ConnectionClosed, trio.TooSlowError) as exc:
                self._count("dial_failures")
                self.log.event("dial_failed", peer=peer.name, attempt=attempt, error=_describe(exc))
                conn_nursery.cancel_scope.cancel()
                return False
            try:
                return await self._serve(ws, dialled=peer.name, deadline=deadline)
            finally:
                # Not shielded: when the node is cut off (cancelled), aclose still
                # closes the socket before it re-raises the cancellation.
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await close_connection(ws)
                conn_nursery.cancel_scope.cancel()

    async def _on_request(
        self, request: WebSocketRequest, startup: Startup, deadline: float
    ) -> None:
        try:
            with trio.move_on_at(deadline):
                if request.path != RESOURCE or self._stopping:
                    await request.reject(404 if request.path != RESOURCE else 503)
                    return
                ws = await request.accept()
            if trio.current_time() >= deadline:
                self._refuse("handshake_deadline")
                return
        except ConnectionClosed:
            return
        try:
            await self._serve(ws, dialled=None, deadline=deadline, startup=startup)
        finally:
            with trio.move_on_after(CLOSE_TIMEOUT):
                await close_connection(ws)

    async def _serve(
        self,
        ws: WebSocketConnection,
        *,
        dialled: str | None,
        deadline: float,
        startup: Startup | None = None,
    ) -> bool:
        """Handshake (by ``deadline``) and carry one connection; True if it became its
        peer's link. ``startup`` is an accepted connection's place among the
        unauthenticated ones, given up once the peer proved who it is."""
        channel = SecureChannel(
            identity=self.identity,
            name=self.name,
            federation=self.federation,
            peers=self.keys,
            versions=self._offer,
            initiator=dialled is not None,
            peer=dialled,
            fed_print=self.fed_print,
        )
        direction = "out" if dialled else "in"
        try:
            with trio.fail_at(deadline):
                peer, incarnation = await open_link(ws, channel, self.incarnation)
        except ChannelError as exc:
            self._refuse(exc.reason)
            peer_name = dialled or channel.peer
            if exc.reason in MISMATCHES and peer_name in self.peers:
                if self.peer_problems.get(peer_name) != exc.detail:
                    self.log.event("peer_mismatch", peer=peer_name, reason=exc.reason,
                                   detail=exc.detail)
                self.peer_problems[peer_name] = exc.detail
            self.log.event(
                "channel_refused",
                peer=dialled or channel.peer,
                direction=direction,
                remote=_remote(ws),
                reason=exc.reason,
                detail=exc.detail,
            )
            return False
        except (ConnectionClosed, trio.TooSlowError) as exc:
            if dialled is None and isinstance(exc, trio.TooSlowError):
                self._refuse("handshake_deadline")
            else:
                self._count("handshake_failures")
            self.log.event(
                "handshake_failed",
                peer=dialled or channel.peer,
                direction=direction,
                remote=_remote(ws),
                error=_describe(exc),
            )
            return False
        if startup is not None:
            startup.authenticated()
        self.peer_problems.pop(peer, None)
        return await self._carry(ws, channel, peer, incarnation, dialled)

    async def _carry(
        self,
        ws: WebSocketConnection,
        channel: SecureChannel,
        peer: str,
        incarnation: bytes,
        dialled: str | None,
    ) -> bool:
        """Run an authenticated connection as a link until it ends; whatever ends it,
        the peer table hears of it (a handler that raised ends this link, not the node)."""
        link_id, self._next_link_id = self._next_link_id, self._next_link_id + 1
        initiator = self.name if dialled else peer
        link = Link(
            link_id=link_id,
            ws=ws,
            channel=channel,
            peer=peer,
            initiator=initiator,
            peer_incarnation=incarnation,
        )
        self._connections[link_id] = link
        became_active = False
        try:
            if self._stopping:
                link.retire()
            else:
                became_active = await self._peers.adopt(link)
                if became_active:
                    self._count("links_adopted")
            await link.run(partial(self._on_payload, link))
        except* Exception as group:
            exc = group.exceptions[0]
            link.end_reason = link.end_reason or "handler_failed"
            link.end_detail = f"{type(exc).__name__}: {exc}"[:300]
            self._count("handler_failures")
        finally:
            del self._connections[link_id]
            self._closed_one.set()
            self._closed_one = trio.Event()
        if link.superseded and link.end_reason == "clean":
            # The peer kept another connection that has not reached us yet (it was
            # dialled at the same time as this one): wait for it rather than flap.
            with trio.move_on_after(HANDSHAKE_TIMEOUT):
                while self._peers.link(peer) is link:
                    await self._peers.changed.wait()
        reason = link.end_reason or "cancelled"
        if reason in ChannelError.REASONS:
            self._refuse(reason)
        self.log.event(
            "link_closed", peer=peer, link=link_id, reason=reason, detail=link.end_detail
        )
        await self._peers.ended(link, reason)
        return became_active

    async def _deliver_all(self, event: Event) -> None:
        for hosted in self._cores.values():
            await hosted.deliver(event)

    async def _on_payload(self, link: Link, payload: bytes) -> None:
        """One frame's plaintext: a message, or a bundle of them. The messages for one
        core reach it together (:meth:`HostedCore.deliver_many`), in their order, so a
        bundle is one group for the core, handled in this task when the core is idle."""
        try:
            message = wire.decode(payload)
        except wire.WireError as exc:
            self._count("messages_in")
            self._count("bad_messages")
            self.log.event("bad_message", peer=link.peer, error=str(exc))
            return
        batches: dict[HostedCore, list[Event]] = {}
        if not isinstance(message, LinkBundle):
            self._on_message(link, message, payload, batches)
        else:
            self._count("bundles_in")
            for inner in message.messages:
                try:
                    one = wire.decode(inner)
                    if isinstance(one, LinkBundle):
                        raise wire.WireError("a bundle inside a bundle")
                except wire.WireError as exc:
                    self._count("messages_in")
                    self._count("bad_messages")
                    self.log.event("bad_message", peer=link.peer, error=str(exc))
                    continue
                self._on_message(link, one, inner, batches)
        for hosted, events in batches.items():
            await hosted.deliver_many(events)

    def _on_message(
        self, link: Link, message: Any, payload: bytes, batches: dict[HostedCore, list[Event]]
    ) -> None:
        """Route one message: a core's go to ``batches``, a handler is called now."""
        self._count("messages_in")
        if isinstance(message, LinkSuperseded):
            link.superseded = True
            return
        if isinstance(message, LinkHeartbeat):
            return
        if isinstance(message, (LinkHello, LinkFramed)):
            self._count("bad_messages")
            what = "link hello" if isinstance(message, LinkHello) else "framing notice"
            self.log.event("bad_message", peer=link.peer, error=f"a second {what}")
            return
        tag: str = message.wire_tag
        target = self._routes.lookup(tag)
        if target is None:
            self._count("unrouted")
            if tag not in self._unrouted_logged:  # once per tag: a newer peer's types
                self._unrouted_logged.add(tag)
                self.log.event("unrouted", peer=link.peer, tag=tag)
        elif isinstance(target, HostedCore):
            batches.setdefault(target, []).append(Received(link.peer, message, payload))
        else:
            target(link.peer, message)


def _remote(ws: WebSocketConnection) -> str:
    stream = ws._stream
    if isinstance(stream, DirectStream):
        stream = stream.inner
    try:
        if isinstance(stream, trio.SocketStream):
            host, port, *_ = stream.socket.getpeername()
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return str(ws.remote)
    except OSError:  # getpeername() after the peer went away
        return "?"


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
