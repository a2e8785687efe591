"""Wire messages of the mesh control plane: SWIM membership, link probes, routed envelopes.

Tags share prefixes so a host can hand them to one core: ``swim.`` (membership and the
dissemination of link estimates), ``link.`` (per-link probes) and ``route.`` (control
messages forwarded along an elected route).

Membership updates and link entries travel as :class:`Signed` statements: the encoded
statement and its speaker's signature (:mod:`mesh.gossip.statements`), so a DC that
forwards one can neither forge nor alter it.
"""

from __future__ import annotations

from mesh import wire
from mesh.wire import U64, Bool, Bytes, Float, ListOf, Optional, Struct, Text, field

__all__ = [
    "NAME_MAX",
    "PIGGYBACK_MAX",
    "SYNC_MAX",
    "MemberUpdate",
    "LinkEntry",
    "OriginDigest",
    "Signed",
    "STATEMENT_MAX",
    "Ping",
    "PingReq",
    "Ack",
    "Nack",
    "Gossip",
    "Sync",
    "LinkPing",
    "BandwidthProbe",
    "BandwidthReport",
    "Routed",
    "ROUTED_TTL",
]

#: A DC name: federation/config.py allows [a-z0-9-]{1,63}.
NAME_MAX = 63
#: Updates piggybacked on one probe or gossip packet. memberlist fills a UDP packet of
#: UDPBufferSize = 1400 bytes (DefaultLANConfig); a member update is ~25 bytes and a
#: link entry ~70, so 16 of each stays near that size.
PIGGYBACK_MAX = 16
#: Items of one anti-entropy message: the whole membership of a 1024-DC federation, or
#: the link entries of a 33-DC federation (33 * 32); larger tables take several messages.
SYNC_MAX = 1024
#: Control messages travel direct or through at most one intermediate DC (issue 4).
ROUTED_TTL = 2
#: Largest encoded statement: a link entry between two 63-character names with every
#: float at 9 bytes is 187 bytes.
STATEMENT_MAX = 256


@wire.struct_type
class MemberUpdate:
    """What one DC believes of member ``name``; ``source`` is the DC that raised a
    suspicion or declared a death (Lifeguard counts independent confirmations by it)."""

    name: str = field(Text(NAME_MAX))
    incarnation: int = field(U64())
    state: int = field(U64(3))
    source: str = field(Text(NAME_MAX))


@wire.struct_type
class LinkEntry:
    """``origin``'s measurements of its link with ``peer`` (see mesh.links.estimates).

    ``rtt_ms``/``rttvar_ms`` are the round trip origin <-> peer; ``loss``, ``jitter_ms``
    and ``down`` describe the direction peer -> origin, which only the receiver can see;
    ``bw_mbps`` is origin -> peer throughput of bulk transfers (None: never measured)."""

    origin: str = field(Text(NAME_MAX))
    peer: str = field(Text(NAME_MAX))
    version: int = field(U64())
    rtt_ms: float = field(Float())
    rttvar_ms: float = field(Float())
    jitter_ms: float = field(Float())
    loss: float = field(Float())
    down: bool = field(Bool())
    bw_mbps: float | None = field(Optional(Float()))


@wire.struct_type
class Signed:
    """A statement (the :func:`mesh.wire.encode_struct` bytes of a :class:`MemberUpdate`
    or a :class:`LinkEntry`) and its speaker's Ed25519 signature over a context naming
    the kind, then ``body``; checked over the bytes received."""

    body: bytes = field(Bytes(STATEMENT_MAX))
    signature: bytes = field(Bytes(64, exact=True))


@wire.struct_type
class OriginDigest:
    """Summary of the entries of one origin a DC holds: equal digests, equal entries
    (versions only grow, so equal count and sum of versions with equal max means the
    same versions unless two replicas are ahead on different entries, which the next
    gossip round repairs)."""

    origin: str = field(Text(NAME_MAX))
    count: int = field(U64())
    version_sum: int = field(U64())
    version_max: int = field(U64())


@wire.message("swim.ping")
class Ping:
    seq: int = field(U64())
    target: str = field(Text(NAME_MAX))
    members: tuple[Signed, ...] = field(ListOf(Struct(Signed), PIGGYBACK_MAX))
    links: tuple[Signed, ...] = field(ListOf(Struct(Signed), PIGGYBACK_MAX))


@wire.message("swim.ping-req")
class PingReq:
    seq: int = field(U64())
    target: str = field(Text(NAME_MAX))


@wire.message("swim.ack")
class Ack:
    """``incarnation`` is the acking target's own: an ack straight from a suspect with a
    higher incarnation than the suspicion is a refutation."""

    seq: int = field(U64())
    target: str = field(Text(NAME_MAX))
    incarnation: int = field(U64())
    members: tuple[Signed, ...] = field(ListOf(Struct(Signed), PIGGYBACK_MAX))
    links: tuple[Signed, ...] = field(ListOf(Struct(Signed), PIGGYBACK_MAX))


@wire.message("swim.nack")
class Nack:
    seq: int = field(U64())


@wire.message("swim.gossip")
class Gossip:
    members: tuple[Signed, ...] = field(ListOf(Struct(Signed), PIGGYBACK_MAX))
    links: tuple[Signed, ...] = field(ListOf(Struct(Signed), PIGGYBACK_MAX))


@wire.message("swim.sync", max_size=1024 * 1024)
class Sync:
    """Full-state anti-entropy (memberlist push/pull). ``reply`` asks for the receiver's
    state back; ``links`` carries entries the sender believes the receiver lacks.
    (1 MiB: SYNC_MAX signed statements of each kind at their largest, ~0.5 MiB, and the
    digest.)"""

    reply: bool = field(Bool())
    members: tuple[Signed, ...] = field(ListOf(Struct(Signed), SYNC_MAX))
    digest: tuple[OriginDigest, ...] = field(ListOf(Struct(OriginDigest), SYNC_MAX))
    links: tuple[Signed, ...] = field(ListOf(Struct(Signed), SYNC_MAX))


@wire.message("link.ping")
class LinkPing:
    """A periodic link probe. ``session`` changes when the sender restarts (its sequence
    numbers restart); ``sent_at`` is the sender's clock (RFC 3550 jitter uses only
    differences); ``echo_seq``/``echo_hold`` return the last ping received from the
    receiver and how long it was held, so the receiver gets a round-trip sample."""

    session: int = field(U64())
    seq: int = field(U64())
    sent_at: float = field(Float())
    echo_seq: int | None = field(Optional(U64()))
    echo_hold: float = field(Float())


@wire.message("link.bw-probe", max_size=70 * 1024)
class BandwidthProbe:
    """One packet of a packet-train bandwidth probe (``index`` of ``count``)."""

    train: int = field(U64())
    index: int = field(U64(255))
    count: int = field(U64(255))
    padding: bytes = field(Bytes(64 * 1024))


@wire.message("link.bw-report")
class BandwidthReport:
    """The receiver's dispersion measurement of a probe train, in Mbit/s."""

    train: int = field(U64())
    mbps: float = field(Float())


@wire.message("route.msg")
class Routed:
    """A control message from ``src`` to ``dst``; an intermediate DC forwards it while
    ``ttl`` stays positive. ``payload`` is the wire frame of the inner message."""

    src: str = field(Text(NAME_MAX))
    dst: str = field(Text(NAME_MAX))
    ttl: int = field(U64(ROUTED_TTL))
    payload: bytes = field(Bytes(60 * 1024))
