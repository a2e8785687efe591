"""HDE's wire messages (tags ``hde.*``).

The diff runs on the control channel: the target walks the source's tree
top-down (``hde.nodes_want`` / ``hde.nodes``), fetches the group digests and
then the page keys (64-bit fingerprint prefixes, :data:`mesh.hde.image.KEY_SIZE`)
of the blocks that differ (``hde.groups_want`` / ``hde.groups``, ``hde.fps_want``
/ ``hde.fps``), and asks for the pages it cannot find in its store (``hde.want``).
Pages travel in chunk frames (:mod:`mesh.hde.codec`, a binary format, not CBOR),
which AMST carries as opaque bytes under their chunk id.
"""

from __future__ import annotations

from mesh import wire
from mesh.hde.image import KEY_SIZE
from mesh.hde.index import BLOCK_PAGES, DIGEST_SIZE, FANOUT, GROUP_DIGEST_SIZE, GROUPS_PER_BLOCK
from mesh.wire import U64, Bool, Bytes, ListOf, Optional, Text, field

__all__ = [
    "MAX_PARENTS",
    "MAX_FP_BLOCKS",
    "MAX_WANT_RANGES",
    "CHUNK_PAGES",
    "MAX_ENTRY",
    "HdeOffer",
    "HdeBase",
    "HdeNodesWant",
    "HdeNodes",
    "HdeGroupsWant",
    "HdeGroups",
    "HdeFingerprintsWant",
    "HdeFingerprints",
    "HdeWant",
    "HdeResend",
    "HdeVerified",
]

#: Parents per node request: the reply holds at most 1024 * 16 * 32 B = 512 KiB.
MAX_PARENTS = 1024
#: Blocks per fingerprint request: 64 * 2 KiB = 128 KiB of page keys per reply.
MAX_FP_BLOCKS = 64
#: Ranges (start, count pairs) per want message; 16 KiB ranges keep a frame under 400 KiB.
MAX_WANT_RANGES = 16384
#: Pages per chunk: ~1 MiB of logical data, as DESIGN.md gives for HDE payload.
CHUNK_PAGES = BLOCK_PAGES
#: Largest entry of a page in ``hde.fps``: a tag byte and a key, or a varint (<= 10 bytes).
MAX_ENTRY = 1 + max(KEY_SIZE, 10)
#: Largest page number: 2**40 pages is 4 PiB, far beyond any image.
MAX_PAGE = 2**40
_DIGEST = Bytes(DIGEST_SIZE, exact=True)
#: Frame limit of the bulkier diff replies: the largest (MAX_PARENTS * 16 digests, 512 KiB)
#: with room for its CBOR framing, well under wire.ABSOLUTE_MAX_SIZE.
_BULK = 1024 * 1024 + 4096


@wire.message("hde.offer")
class HdeOffer:
    """Source -> target: I will send image ``image``; its tree's top node and root."""

    transfer: int = field(U64())
    image: str = field(Text(256))
    page_count: int = field(U64(MAX_PAGE))
    top: bytes = field(_DIGEST)
    root: bytes = field(_DIGEST)


@wire.message("hde.base")
class HdeBase:
    """Target -> source: the root of the copy of this image the target compares against
    (and XOR-deltas against), or None when it holds none."""

    transfer: int = field(U64())
    base_root: bytes | None = field(Optional(_DIGEST))


@wire.message("hde.nodes_want")
class HdeNodesWant:
    """Target -> source: send the children of these nodes at ``level`` (>= 1)."""

    transfer: int = field(U64())
    level: int = field(U64(64))
    parents: tuple[int, ...] = field(ListOf(U64(MAX_PAGE), MAX_PARENTS))


@wire.message("hde.nodes", max_size=_BULK)
class HdeNodes:
    """Source -> target: the children's digests of ``parents``, concatenated in order."""

    transfer: int = field(U64())
    level: int = field(U64(64))
    parents: tuple[int, ...] = field(ListOf(U64(MAX_PAGE), MAX_PARENTS))
    digests: bytes = field(Bytes(MAX_PARENTS * FANOUT * DIGEST_SIZE))


@wire.message("hde.groups_want")
class HdeGroupsWant:
    """Target -> source: send the group digests of these blocks."""

    transfer: int = field(U64())
    blocks: tuple[int, ...] = field(ListOf(U64(MAX_PAGE), MAX_FP_BLOCKS))


@wire.message("hde.groups", max_size=_BULK)
class HdeGroups:
    """Source -> target: per block, its digest and the digests of its groups of
    ``GROUP_PAGES`` pages (``GROUP_DIGEST_SIZE`` bytes each), concatenated in order."""

    transfer: int = field(U64())
    blocks: tuple[int, ...] = field(ListOf(U64(MAX_PAGE), MAX_FP_BLOCKS))
    digests: bytes = field(Bytes(MAX_FP_BLOCKS * DIGEST_SIZE))
    groups: bytes = field(Bytes(MAX_FP_BLOCKS * GROUPS_PER_BLOCK * GROUP_DIGEST_SIZE))


@wire.message("hde.fps_want")
class HdeFingerprintsWant:
    """Target -> source: the page entries of these blocks, only of the groups whose bit is
    set in the block's mask (bit g: group g). ``plain``: keys only, no base pages named
    (the re-fetch of blocks that failed their check). ``digests``: send the blocks'
    digests too (not when an ``hde.groups`` reply already carried them)."""

    transfer: int = field(U64())
    blocks: tuple[int, ...] = field(ListOf(U64(MAX_PAGE), MAX_FP_BLOCKS))
    masks: tuple[int, ...] = field(ListOf(U64(2**GROUPS_PER_BLOCK - 1), MAX_FP_BLOCKS))
    plain: bool = field(Bool())
    digests: bool = field(Bool(), default=True)

    def __attrs_post_init__(self) -> None:
        if len(self.masks) != len(self.blocks):
            raise ValueError(f"{len(self.blocks)} blocks but {len(self.masks)} masks")


@wire.message("hde.fps", max_size=_BULK)
class HdeFingerprints:
    """Source -> target: block digests (if asked for; else empty) and the page entries
    (:mod:`mesh.hde.entries`) of the groups asked for, in order (zstd-compressed: runs of
    zero pages shrink to nothing)."""

    transfer: int = field(U64())
    blocks: tuple[int, ...] = field(ListOf(U64(MAX_PAGE), MAX_FP_BLOCKS))
    digests: bytes = field(Bytes(MAX_FP_BLOCKS * DIGEST_SIZE))
    fps: bytes = field(Bytes(MAX_FP_BLOCKS * BLOCK_PAGES * MAX_ENTRY + 1024))


@wire.message("hde.want", max_size=_BULK)
class HdeWant:
    """Target -> source: pages to send, as flattened (start, count) pairs. ``flush``: no
    more wants until these arrive, so send a partly filled chunk now."""

    transfer: int = field(U64())
    ranges: tuple[int, ...] = field(ListOf(U64(MAX_PAGE), 2 * MAX_WANT_RANGES))
    flush: bool = field(Bool())


@wire.message("hde.resend")
class HdeResend:
    """Target -> source: these chunks arrived corrupted; send them again."""

    transfer: int = field(U64())
    chunk_ids: tuple[int, ...] = field(ListOf(U64(), 1024))


@wire.message("hde.verified")
class HdeVerified:
    """Target -> source: the assembled image's recomputed root, and whether it matched."""

    transfer: int = field(U64())
    ok: bool = field(Bool())
    root: bytes = field(_DIGEST)
