"""The wire messages of pre-copy rounds, and the numbers their protocol runs by.

v1 (DESIGN.md: "one stream, no delta, no compression") carries a round as
:class:`PagesChunk` messages of at most :data:`CHUNK_PAGES` contiguous pages over the
authenticated, encrypted control link; the target writes each into the incoming images
and answers :class:`PagesAck` with the chunk's sequence number, or why it refused it.

v3 (HDE over AMST) announces a round with :class:`V3Round`; the target answers
:class:`V3Status` (ready, or why not); the HDE diff of each image travels wrapped in
:class:`V3Hde` over the control link, the chunks over AMST streams to the target's
``data`` endpoint (:mod:`federation.dataplane.v3_protocol`).

The round control of both is one sans-I/O core, :mod:`federation.migration.rounds`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

from federation.migration.vocabulary import RETRANSMIT
from mesh import wire
from mesh.hde.image import PAGE_SIZE
from mesh.wire import U64, Bytes, ListOf, Text, field

__all__ = [
    "PagesChunk", "PagesAck", "V3Round", "V3Status", "V3Preparation", "V3Hde", "ROUND_TAGS",
    "HDE_TAG",
    "CHUNK_PAGES", "WINDOW", "ACK_TIMEOUT", "RESEND_AFTER", "runs", "transfer_id",
]

#: Pages per v1 chunk: 256 KiB, a few websocket frames' worth; far under the channel's
#: 8 MiB frame limit, large enough that per-message overhead (CBOR header, AEAD tag)
#: is below 0.1 %.
CHUNK_PAGES = 64
#: Unacknowledged v1 chunks per round: 16 x 256 KiB = 4 MiB in flight, a bandwidth-delay
#: product of 400 Mbit/s at 80 ms, and 64 x under the link outbox (1024 messages).
WINDOW = 16
#: No acknowledgement (v1), no answer to a round's start and no progress (v3) for this
#: long fails the round (then the session aborts). The same bound as a session's stall
#: timer (federation.migration.vocabulary.STALL_TIMEOUT).
ACK_TIMEOUT = 30.0
#: No v1 acknowledgement for this long sends the chunks not acknowledged again. A chunk
#: is lost only with the link that carried it: the control link is TCP, and a new link
#: (PeerUp) re-sends at once; this is the backstop for a loss no PeerUp announced. Twice
#: the migration control's retransmission period (vocabulary.RETRANSMIT, 2 s): a healthy
#: link acknowledges a chunk every serialization time (0.2 s for 256 KiB at 10 Mbit/s),
#: so 4 s of silence is a link that lost what it carried.
RESEND_AFTER = 2 * RETRANSMIT

_ID = Text(128)
#: An HDE diff message is at most 1 MiB + 4 KiB (mesh.hde.messages._BULK); the wrapper
#: adds its ids and CBOR framing.
_HDE_MAX = 1024 * 1024 + 4096

#: What the rounds core consumes (exact tags, or prefixes ending in "."); the HDE diff
#: (HDE_TAG) goes to the v3 data plane itself.
ROUND_TAGS = ("data.v1.", "data.v3.round", "data.v3.status", "data.v3.preparation")
HDE_TAG = "data.v3.hde"


@wire.message("data.v1.pages", max_size=CHUNK_PAGES * PAGE_SIZE + 1024)
class PagesChunk:
    migration_id: str = field(_ID)
    round: int = field(U64(1000))
    seq: int = field(U64())
    image: str = field(Text(16))
    page: int = field(U64())
    data: bytes = field(Bytes(CHUNK_PAGES * PAGE_SIZE))


@wire.message("data.v1.ack")
class PagesAck:
    migration_id: str = field(_ID)
    round: int = field(U64(1000))
    seq: int = field(U64())
    error: str = field(Text(256), default="")


@wire.message("data.v3.round")
class V3Round:
    """Source -> target: round ``round`` of ``migration_id`` starts; its chunks come as
    AMST transfer ``transfer``; HDE transfer ``i + 1`` carries ``images[i]``."""

    migration_id: str = field(_ID)
    round: int = field(U64(1000))
    transfer: bytes = field(Bytes(16, exact=True))
    images: tuple[str, ...] = field(ListOf(Text(16), 64))


@wire.message("data.v3.status")
class V3Status:
    """Target -> source: ready for the round (``error`` empty), or why it cannot go on."""

    migration_id: str = field(_ID)
    round: int = field(U64(1000))
    error: str = field(Text(512), default="")


@wire.message("data.v3.preparation")
class V3Preparation:
    """Source -> target: round ``round`` is being prepared, ``pages`` gone over so far (v3
    round 1: the shadow's copy, digests and index of every image). News that the source
    works, for the target's stall bound: nothing else reaches it before the round starts."""

    migration_id: str = field(_ID)
    round: int = field(U64(1000))
    pages: int = field(U64())


@wire.message(HDE_TAG, max_size=_HDE_MAX + 1024)
class V3Hde:
    """Either way: one HDE diff message (``wire.encode``d) of image ``image`` of a round."""

    migration_id: str = field(_ID)
    round: int = field(U64(1000))
    image: int = field(U64(63))
    body: bytes = field(Bytes(_HDE_MAX))


def runs(pages: Sequence[int], limit: int = CHUNK_PAGES) -> Iterator[tuple[int, int]]:
    """Sorted page numbers -> (first, count) runs of contiguous pages, each <= ``limit``."""
    start = prev = -2
    for p in pages:
        if p == prev + 1 and p - start < limit:
            prev = p
            continue
        if start >= 0:
            yield start, prev - start + 1
        start = prev = p
    if start >= 0:
        yield start, prev - start + 1


def transfer_id(migration_id: str, round_: int) -> bytes:
    """The AMST transfer id of a v3 round: the same on both sides, distinct per round."""
    return hashlib.sha256(f"{migration_id}/{round_}".encode()).digest()[:16]
