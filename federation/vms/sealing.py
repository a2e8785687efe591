"""The at-rest format of a VM image: pages sealed per chunk with XChaCha20-Poly1305.

Pure functions over bytes (no files, no clock, no randomness of its own: every nonce is
passed in), so the format is tested and fuzzed apart from the file code that uses it
(:mod:`federation.vms.sealed_image`)::

    header   48 bytes   magic "DWCPSEAL" | version 1 | 3 zero bytes | chunk_pages u32
                        | page_count u64 | file_id 16 bytes | key_id 8 bytes
    slot i   nonce (24 random bytes) | ciphertext of chunk i | Poly1305 tag (16)

Every chunk is ``chunk_pages`` pages except the last, which holds what remains; slots sit
at fixed offsets (``HEADER_SIZE + i * full slot``), so a page is found without an index
and read by decrypting one chunk. A chunk's associated data is the whole header and its
index: a chunk moved to another position, or into another file (another ``file_id``), or
a header changed in any byte (its page count, say) fails its tag, and a file of the
wrong length is refused before any chunk is read. What the format cannot see is a whole
file replaced by an older sealed copy of itself (a rollback): that needs state outside
the file, and the HDE root the ledger records is that state for a migration's copy.

Why 16 pages (64 KiB) per chunk: HDE reads single pages at random (dedup hits in other
VMs' images), and a read decrypts a whole chunk; the 1 MiB index block would cost 256
pages of decryption per such page, 16 pages costs 16 while the 40 bytes of nonce and tag
are 0.06 % of the chunk. The index reads 1 MiB blocks: 16 chunks, still sequential.

Why random nonces: XChaCha20's 192-bit nonce makes random nonces safe for any number of
messages a node will ever seal (the birthday bound is 2**96), so a rewrite needs no
counter that a crash could lose (libsodium's documentation of the construction).
"""

from __future__ import annotations

import hashlib
import struct

import attrs
import nacl.bindings as sodium
import nacl.exceptions

from mesh.hde.image import PAGE_SIZE

__all__ = [
    "SealError",
    "SealKey",
    "SealHeader",
    "MAGIC",
    "VERSION",
    "HEADER_SIZE",
    "NONCE_SIZE",
    "TAG_SIZE",
    "KEY_SIZE",
    "CHUNK_PAGES",
    "seal_chunk",
    "open_chunk",
    "decode_header",
]

MAGIC = b"DWCPSEAL"
VERSION = 1
NONCE_SIZE = sodium.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES  # 24
TAG_SIZE = sodium.crypto_aead_xchacha20poly1305_ietf_ABYTES  # 16
KEY_SIZE = sodium.crypto_aead_xchacha20poly1305_ietf_KEYBYTES  # 32
#: Pages per chunk (module docstring: why 16).
CHUNK_PAGES = 16
#: Chunks of more than 1 MiB are refused: a header cannot make a reader allocate more.
MAX_CHUNK_PAGES = 256
#: 2**40 pages is 4 PiB; anything above is a corrupt header, not an image.
MAX_PAGES = 1 << 40
_HEADER = struct.Struct(">8sB3sIQ16s8s")
HEADER_SIZE = _HEADER.size  # 48
FILE_ID_SIZE = 16


class SealError(Exception):
    """A sealed image (or a chunk of it) that cannot be opened; the message says which
    file, which chunk and what is wrong with it."""


@attrs.frozen(repr=False)
class SealKey:
    """A node's at-rest key (32 bytes) and its public id (8 bytes of a keyed hash, so a
    file sealed under another key is named as such instead of failing chunk by chunk)."""

    raw: bytes = attrs.field()

    @raw.validator
    def _check(self, _attr: object, value: bytes) -> None:
        if not isinstance(value, bytes) or len(value) != KEY_SIZE:
            raise SealError(f"an at-rest key is {KEY_SIZE} bytes")

    @property
    def key_id(self) -> bytes:
        return hashlib.blake2b(b"dwcp-at-rest-key-id", key=self.raw, digest_size=8).digest()

    def __repr__(self) -> str:
        return f"SealKey(id={self.key_id.hex()})"


@attrs.frozen
class SealHeader:
    """What a sealed file says about itself (every byte is in every chunk's AAD)."""

    page_count: int
    file_id: bytes
    key_id: bytes
    chunk_pages: int = CHUNK_PAGES

    def __attrs_post_init__(self) -> None:
        if not 1 <= self.chunk_pages <= MAX_CHUNK_PAGES:
            raise SealError(f"chunk_pages {self.chunk_pages} outside 1..{MAX_CHUNK_PAGES}")
        if not 1 <= self.page_count <= MAX_PAGES:
            raise SealError(f"page_count {self.page_count} outside 1..{MAX_PAGES}")
        if len(self.file_id) != FILE_ID_SIZE or len(self.key_id) != 8:
            raise SealError("file_id is 16 bytes and key_id 8")

    def encode(self) -> bytes:
        return _HEADER.pack(MAGIC, VERSION, bytes(3), self.chunk_pages, self.page_count,
                            self.file_id, self.key_id)

    @property
    def chunk_count(self) -> int:
        return -(-self.page_count // self.chunk_pages)

    @property
    def slot_size(self) -> int:
        """The size of a full chunk's slot; the last one may be shorter."""
        return NONCE_SIZE + self.chunk_pages * PAGE_SIZE + TAG_SIZE

    def chunk_pages_of(self, index: int) -> int:
        """Pages in chunk ``index`` (the last holds what remains)."""
        if not 0 <= index < self.chunk_count:
            raise SealError(f"chunk {index} outside 0..{self.chunk_count}")
        return min(self.chunk_pages, self.page_count - index * self.chunk_pages)

    def slot_offset(self, index: int) -> int:
        return HEADER_SIZE + index * self.slot_size

    def slot_size_of(self, index: int) -> int:
        return NONCE_SIZE + self.chunk_pages_of(index) * PAGE_SIZE + TAG_SIZE

    @property
    def file_size(self) -> int:
        last = self.chunk_count - 1
        return self.slot_offset(last) + self.slot_size_of(last)


def decode_header(raw: bytes, key: SealKey, file_size: int | None = None,
                  where: str = "sealed image") -> SealHeader:
    """The header at the start of ``raw``; refuses a wrong magic, version, key, geometry
    or (given ``file_size``) a file that is not exactly as long as its header says."""
    if len(raw) < HEADER_SIZE:
        raise SealError(f"{where}: {len(raw)} bytes, shorter than the {HEADER_SIZE}-byte header")
    magic, version, zero, chunk_pages, page_count, file_id, key_id = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise SealError(f"{where}: not a sealed image (magic {magic!r})")
    if version != VERSION:
        raise SealError(f"{where}: format version {version}, this node reads {VERSION}")
    if zero != bytes(3):
        raise SealError(f"{where}: reserved header bytes are not zero")
    if key_id != key.key_id:
        raise SealError(f"{where}: sealed under at-rest key {key_id.hex()}, this node's key "
                        f"is {key.key_id.hex()}")
    try:
        header = SealHeader(page_count, file_id, key_id, chunk_pages)
    except SealError as exc:
        raise SealError(f"{where}: {exc}") from None
    if file_size is not None and file_size != header.file_size:
        raise SealError(f"{where}: {file_size} bytes, but its header says "
                        f"{header.file_size} ({page_count} pages): truncated or extended")
    return header


def _aad(header: SealHeader, index: int) -> bytes:
    return header.encode() + index.to_bytes(8, "big")


def seal_chunk(key: SealKey, header: SealHeader, index: int, plain: bytes | memoryview,
               nonce: bytes) -> bytes:
    """The slot of chunk ``index`` holding ``plain`` (exactly that chunk's pages)."""
    if len(nonce) != NONCE_SIZE:
        raise SealError(f"a nonce is {NONCE_SIZE} bytes, got {len(nonce)}")
    want = header.chunk_pages_of(index) * PAGE_SIZE
    if len(plain) != want:
        raise SealError(f"chunk {index} holds {want} bytes, got {len(plain)}")
    return nonce + sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(
        bytes(plain), _aad(header, index), nonce, key.raw)


def open_chunk(key: SealKey, header: SealHeader, index: int, slot: bytes | memoryview,
               where: str = "sealed image") -> bytes:
    """The pages of chunk ``index`` from its slot; :class:`SealError` if the slot is not
    exactly what :func:`seal_chunk` made for this key, file and position."""
    want = header.slot_size_of(index)
    if len(slot) != want:
        raise SealError(f"{where}: chunk {index} is {len(slot)} bytes, expected {want}")
    raw = bytes(slot)
    try:
        return sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
            raw[NONCE_SIZE:], _aad(header, index), raw[:NONCE_SIZE], key.raw)
    except nacl.exceptions.CryptoError:
        raise SealError(f"{where}: chunk {index} (pages {index * header.chunk_pages}.."
                        f"{index * header.chunk_pages + header.chunk_pages_of(index) - 1}) "
                        "fails authentication: tampered, swapped or torn") from None
