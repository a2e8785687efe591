"""HDE's own sans-I/O events and actions, beside those of :mod:`mesh.core`.

The cores leave CPU-heavy work on page data to their driver, which runs it on
worker threads: encoding a chunk (:class:`EncodeChunk`, source) and indexing
the assembled image (:class:`RecomputeRoot`, target). The transport hands a
chunk frame to the target as :class:`ChunkArrived`.
"""

from __future__ import annotations

import attrs

from mesh.hde.codec import ChunkPlan

__all__ = ["EncodeChunk", "ChunkArrived", "RecomputeRoot", "RootRecomputed"]


@attrs.frozen
class EncodeChunk:
    """Driver: encode ``plan`` from the image (XOR against the reference image with
    ``reference_root`` if not None) and hand the frame to the transport."""

    transfer: int
    plan: ChunkPlan
    reference_root: bytes | None


@attrs.frozen
class ChunkArrived:
    """Event: the transport delivered the chunk frame with id ``chunk_id``."""

    transfer: int
    chunk_id: int
    data: bytes | bytearray | memoryview


@attrs.frozen
class RecomputeRoot:
    """Action: index the written image and deliver :class:`RootRecomputed`."""

    transfer: int


@attrs.frozen
class RootRecomputed:
    """Event: the block digests (level 0, concatenated) and root of the written image."""

    transfer: int
    blocks: bytes
    root: bytes
