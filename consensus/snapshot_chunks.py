"""A ledger snapshot cut into chunks, and the digest that proves every chunk.

The ledger snapshot (:meth:`consensus.ledger_state.LedgerState.snapshot`) grows with
the fleet, 146 bytes per VM: at about 55,000 VMs it no longer fits one frame
(:data:`mesh.wire.ABSOLUTE_MAX_SIZE`). It is therefore stored and moved as chunks of
its bytes, :data:`CHUNK` each (the last one shorter), and its *state digest* (what
replicas sign in CHECKPOINTs) commits to every chunk:

- a snapshot of at most one chunk: ``sha256(snapshot)``, as before chunks existed (a
  small federation's checkpoints, durable records and state transfers are unchanged);
- a larger one: ``sha256(DOMAIN || size as 8 bytes || sha256(chunk 0) || ... )``, the
  digest of its *manifest* (its size and its chunks' hashes).

A replica that receives a manifest checks it against the digest 2f+1 replicas signed,
then each chunk against its hash as it arrives (:class:`ChunkAssembly`): a Byzantine
sender can neither make it install another state nor make it hold more than the proven
size (at most :data:`MAX_SNAPSHOT`), and a transfer cut anywhere resumes at the first
missing chunk, from any replica at that checkpoint. Sans-I/O, no clock.
"""

from __future__ import annotations

import hashlib

__all__ = [
    "CHUNK",
    "MAX_SNAPSHOT",
    "MAX_CHUNKS",
    "ChunkError",
    "chunk_count",
    "chunk_of",
    "chunk_hashes",
    "manifest_digest",
    "snapshot_digest",
    "check_manifest",
    "ChunkAssembly",
]

#: Bytes per chunk: one chunk rides in one frame beside the links' keepalives (an 8 MiB
#: frame would hold a link for as long as eight of these).
CHUNK = 1 << 20
#: The largest snapshot a replica takes (about 7 million VMs at 146 bytes each).
MAX_SNAPSHOT = 1 << 30
MAX_CHUNKS = MAX_SNAPSHOT // CHUNK
DOMAIN = b"dwcp.ledger-snapshot.chunks.v1\x00"
_HASH = 32


class ChunkError(ValueError):
    """A manifest or chunk that does not fit what the checkpoint proves; says which."""


def chunk_count(size: int) -> int:
    """Chunks of a snapshot of ``size`` bytes (an empty one is one empty chunk)."""
    return max(1, -(-size // CHUNK))


def chunk_of(data: bytes, index: int) -> bytes:
    return data[index * CHUNK:(index + 1) * CHUNK]


def chunk_hashes(data: bytes) -> tuple[bytes, ...]:
    view = memoryview(data)
    return tuple(hashlib.sha256(view[i * CHUNK:(i + 1) * CHUNK]).digest()
                 for i in range(chunk_count(len(data))))


def manifest_digest(size: int, hashes: tuple[bytes, ...]) -> bytes:
    """The state digest of a snapshot of ``size`` bytes whose chunks hash to ``hashes``."""
    if len(hashes) == 1:
        return hashes[0]
    return hashlib.sha256(DOMAIN + size.to_bytes(8, "big") + b"".join(hashes)).digest()


def snapshot_digest(data: bytes) -> bytes:
    """The state digest of snapshot bytes (see the module docstring)."""
    if len(data) <= CHUNK:
        return hashlib.sha256(data).digest()
    return manifest_digest(len(data), chunk_hashes(data))


def check_manifest(size: int, hashes: tuple[bytes, ...], state_digest: bytes) -> None:
    """Raise :class:`ChunkError` unless a chunked snapshot of ``size`` bytes with these
    chunk hashes is the one ``state_digest`` proves."""
    if not CHUNK < size <= MAX_SNAPSHOT:
        raise ChunkError(f"manifest size {size} is not in {CHUNK + 1}..{MAX_SNAPSHOT}")
    if len(hashes) != chunk_count(size):
        raise ChunkError(f"manifest chunk_hashes: {len(hashes)} hashes for {size} bytes,"
                         f" expected {chunk_count(size)}")
    if any(len(h) != _HASH for h in hashes):
        raise ChunkError("manifest chunk_hashes: a hash is not 32 bytes")
    if manifest_digest(size, hashes) != state_digest:
        raise ChunkError("manifest does not match the proven state digest")


class ChunkAssembly:
    """The chunks of one proven snapshot as they arrive, each checked against its hash.
    Holds at most the manifest's size (which the checkpoint proof bounds)."""

    def __init__(self, size: int, hashes: tuple[bytes, ...]) -> None:
        self.size = size
        self.hashes = hashes
        self._chunks: dict[int, bytes] = {}
        self._next = 0  # no chunk below this one is missing

    def expected_len(self, index: int) -> int:
        return min(CHUNK, self.size - index * CHUNK)

    def add(self, index: int, data: bytes) -> bool:
        """Take chunk ``index``; False if it was already held; :class:`ChunkError` if it is
        not that chunk of this snapshot."""
        if not 0 <= index < len(self.hashes):
            raise ChunkError(f"chunk index {index} is out of range 0..{len(self.hashes) - 1}")
        if len(data) != self.expected_len(index):
            raise ChunkError(f"chunk {index}: {len(data)} bytes, expected"
                             f" {self.expected_len(index)}")
        if hashlib.sha256(data).digest() != self.hashes[index]:
            raise ChunkError(f"chunk {index} does not match its hash in the manifest")
        if index in self._chunks:
            return False
        self._chunks[index] = bytes(data)
        while self._next in self._chunks:
            self._next += 1
        return True

    @property
    def held(self) -> int:
        """Bytes held."""
        return sum(len(c) for c in self._chunks.values())

    def missing(self) -> int | None:
        """The first chunk not held yet (None: complete)."""
        return self._next if self._next < len(self.hashes) else None

    def join(self) -> bytes:
        if self.missing() is not None:
            raise ChunkError(f"chunk {self.missing()} is missing")
        return b"".join(self._chunks[i] for i in range(len(self.hashes)))
