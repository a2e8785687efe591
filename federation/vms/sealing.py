"""The at-rest format of a VM image: pages sealed per chunk with XChaCha20-Poly1305.

Pure functions over bytes (no files, no clock, no randomness of its own: every nonce is
passed in), so the format is tested and fuzzed apart from the file code that uses it
(:mod:`federation.vms.sealed_image`)::

    header    48 bytes   magic "DWCPSEAL" | version 1 | 3 zero bytes | chunk_pages u32
                         | page_count u64 | file_id 16 bytes | key_id 8 bytes
    entries   40 bytes per chunk: nonce (kind byte, 23 random bytes) | Poly1305 tag (16)
    data      from the next 4 KiB boundary: chunk i's ciphertext at data + i * chunk
              bytes, as long as its plaintext (the last chunk holds what remains)

Every chunk is ``chunk_pages`` pages except the last; a page is found without an index
(its chunk's entry and bytes sit at fixed offsets) and read by decrypting one chunk. A
chunk's associated data is the whole header, its index and its kind, so a chunk moved to
another position, or into another file (another ``file_id``), or a header changed in any
byte (its page count, say) fails its tag, and a file of the wrong length is refused
before any chunk is read.

A chunk of zero pages (an image just created, a target's never-written pages) has a
*zero entry*: the tag of an empty message whose associated data says "zero chunk here",
and no data (a hole), so a sealed image stays as sparse as a plain one. Without the key
an entry cannot be made, and it is bound to its position like any chunk, so zeroing an
entry, or copying one from another chunk or file, is refused.

What the format cannot see is a whole file, or one chunk, put back as an older sealed
version of the same file (a rollback by someone who can write the disk): that needs
state outside the file. Integrity of what a migration moves does not rest on it: the
target checks every block it assembled, base pages included, against the source's HDE
digests, and the VM's root before the ledger commits (DESIGN.md, HDE).

Why 16 pages (64 KiB) per chunk: HDE reads single pages at random (dedup hits in other
VMs' images), and a read decrypts a whole chunk; the 1 MiB index block would cost 256
pages of decryption per such page, 16 pages costs 16 while an entry is 0.06 % of the
chunk. The index reads 1 MiB blocks: 16 chunks, still sequential.

Why random nonces: XChaCha20's 192-bit nonce makes random nonces safe for any number of
messages a node will ever seal (libsodium's documentation of the construction; 184 random
bits here, the first byte saying the chunk's kind), so a rewrite needs no counter that a
crash could lose. The kind byte lets a reader try only the check that applies; it is part
of the nonce, so changing it fails the tag like any other byte.

The AEAD runs through libsodium's functions directly (as :mod:`mesh.channel` does for
secretstream): PyNaCl's wrappers allocate and check per call, which cost as much as the
decryption of a 64 KiB chunk itself.
"""

from __future__ import annotations

import hashlib
import struct

import attrs
import nacl.bindings as sodium
from nacl._sodium import ffi as _ffi
from nacl._sodium import lib as _lib

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
    "ENTRY_SIZE",
    "seal_chunk",
    "zero_entry",
    "is_zero_entry",
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
#: A chunk's entry: its nonce and its tag.
ENTRY_SIZE = NONCE_SIZE + TAG_SIZE
_DATA, _ZERO = b"\x01", b"\x00"  # the chunk's kind: in the AAD and the nonce's first byte
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

    def chunk_pages_of(self, index: int) -> int:
        """Pages in chunk ``index`` (the last holds what remains)."""
        if not 0 <= index < self.chunk_count:
            raise SealError(f"chunk {index} outside 0..{self.chunk_count}")
        return min(self.chunk_pages, self.page_count - index * self.chunk_pages)

    def entry_offset(self, index: int) -> int:
        return HEADER_SIZE + index * ENTRY_SIZE

    @property
    def data_offset(self) -> int:
        table_end = HEADER_SIZE + self.chunk_count * ENTRY_SIZE
        return -(-table_end // PAGE_SIZE) * PAGE_SIZE

    def chunk_offset(self, index: int) -> int:
        return self.data_offset + index * self.chunk_pages * PAGE_SIZE

    def chunk_bytes(self, index: int) -> int:
        return self.chunk_pages_of(index) * PAGE_SIZE

    @property
    def file_size(self) -> int:
        return self.data_offset + self.page_count * PAGE_SIZE


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


def _aad(header: SealHeader, index: int, kind: bytes) -> bytes:
    return header.encode() + index.to_bytes(8, "big") + kind


def _encrypt(plain: bytes | memoryview, aad: bytes, nonce: bytes, key: SealKey) -> bytes:
    """Ciphertext followed by its tag (libsodium's combined mode)."""
    out = bytearray(len(plain) + TAG_SIZE)
    rc = _lib.crypto_aead_xchacha20poly1305_ietf_encrypt(
        _ffi.from_buffer("unsigned char[]", out, require_writable=True), _ffi.NULL,
        _ffi.from_buffer("unsigned char[]", plain), len(plain), aad, len(aad), _ffi.NULL,
        nonce, key.raw)
    if rc != 0:
        raise SealError("libsodium refused to encrypt a chunk")
    return bytes(out)


def _decrypt(sealed: bytes, aad: bytes, nonce: bytes, key: SealKey) -> bytes | None:
    """The plaintext of ``sealed`` (ciphertext and tag), or None if it fails its tag."""
    out = bytearray(len(sealed) - TAG_SIZE)
    rc = _lib.crypto_aead_xchacha20poly1305_ietf_decrypt(
        _ffi.from_buffer("unsigned char[]", out, require_writable=True), _ffi.NULL,
        _ffi.NULL, sealed, len(sealed), aad, len(aad), nonce, key.raw)
    return bytes(out) if rc == 0 else None


def _nonce_of(kind: bytes, nonce: bytes) -> bytes:
    if len(nonce) != NONCE_SIZE:
        raise SealError(f"a nonce is {NONCE_SIZE} bytes, got {len(nonce)}")
    return kind + nonce[1:]


def seal_chunk(key: SealKey, header: SealHeader, index: int, plain: bytes | memoryview,
               nonce: bytes) -> tuple[bytes, bytes]:
    """Chunk ``index`` holding ``plain`` (exactly that chunk's pages): its entry and its
    ciphertext. ``nonce``'s first byte is replaced by the kind (module docstring)."""
    nonce = _nonce_of(_DATA, nonce)
    want = header.chunk_bytes(index)
    if len(plain) != want:
        raise SealError(f"chunk {index} holds {want} bytes, got {len(plain)}")
    sealed = _encrypt(plain, _aad(header, index, _DATA), nonce, key)
    return nonce + sealed[-TAG_SIZE:], sealed[:-TAG_SIZE]


def zero_entry(key: SealKey, header: SealHeader, index: int, nonce: bytes) -> bytes:
    """The entry that says "chunk ``index`` is zero pages" (its data is not read)."""
    nonce = _nonce_of(_ZERO, nonce)
    header.chunk_pages_of(index)  # in range
    return nonce + _encrypt(b"", _aad(header, index, _ZERO), nonce, key)


def _check_entry(header: SealHeader, index: int, entry: bytes | memoryview,
                 where: str) -> bytes:
    header.chunk_pages_of(index)
    if len(entry) != ENTRY_SIZE:
        raise SealError(f"{where}: the entry of chunk {index} is {len(entry)} bytes, "
                        f"expected {ENTRY_SIZE}")
    return bytes(entry)


def is_zero_entry(key: SealKey, header: SealHeader, index: int, entry: bytes | memoryview,
                  where: str = "sealed image") -> bool:
    """Whether ``entry`` is chunk ``index``'s authentic zero entry (a tag over 57 bytes
    of associated data: far cheaper than a chunk's 64 KiB)."""
    raw = _check_entry(header, index, entry, where)
    if raw[:1] != _ZERO:
        return False
    return _decrypt(raw[NONCE_SIZE:], _aad(header, index, _ZERO), raw[:NONCE_SIZE],
                    key) is not None


def open_chunk(key: SealKey, header: SealHeader, index: int, entry: bytes | memoryview,
               data: bytes | memoryview, where: str = "sealed image") -> bytes:
    """The pages of chunk ``index`` from its entry and ciphertext; :class:`SealError` if
    they are not exactly what :func:`seal_chunk` made for this key, file and position (a
    zero entry gives zero pages, whatever ``data`` holds)."""
    raw = _check_entry(header, index, entry, where)
    want = header.chunk_bytes(index)
    plain: bytes | None = None
    if raw[:1] == _ZERO:
        if is_zero_entry(key, header, index, raw, where):
            return bytes(want)
    elif raw[:1] == _DATA:
        if len(data) != want:
            raise SealError(f"{where}: chunk {index} is {len(data)} bytes, expected {want}")
        plain = _decrypt(bytes(data) + raw[NONCE_SIZE:], _aad(header, index, _DATA),
                         raw[:NONCE_SIZE], key)
    if plain is None:
        first = index * header.chunk_pages
        raise SealError(f"{where}: chunk {index} (pages {first}.."
                        f"{first + header.chunk_pages_of(index) - 1}) fails authentication: "
                        "tampered, swapped or torn")
    return plain
