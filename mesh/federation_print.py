"""A federation file's fingerprint, carried in the channel handshake (:mod:`mesh.channel`).

Two DCs that run different federation files disagree on who is in the federation, on
its keys or its endpoints, and their PBFT quorums are not the same: such a link must
be refused, saying what differs, rather than come up and fail later in a way nobody can
read (a DC "without a ledger" while the others report ready). Each end signs into its
handshake:

- ``digest``: SHA-256 over the canonical content of the whole file (what
  :func:`federation.config_print.federation_print` hashes: id, modes, every DC's
  name and keys, every operator; not ``versions`` nor endpoints, a DC's own;
  comments and layout do not count);
- ``entries``: per DC, 8 bytes: the first 4 of SHA-256 of its name and the first 4 of
  SHA-256 of its entry (name, keys), in name order. 64 DCs take
  512 bytes, within a Hello's 1 KiB (:data:`MAX_ENTRIES_BYTES`).

A receiver that finds another digest names both digests and, matching the peer's
entries against its own DC names, the DCs whose entries differ, those only it lists,
and how many only the peer lists (their names are not sent, only hashed).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import attrs

__all__ = ["FederationPrint", "NO_PRINT", "DIGEST_BYTES", "MAX_ENTRIES_BYTES"]

DIGEST_BYTES = 32
_ENTRY = 8
#: 64 DCs (the federation file's limit, ``dwcp federation init --dcs``) of 8 bytes.
MAX_ENTRIES_BYTES = 64 * _ENTRY


def _h4(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()[:4]


@attrs.frozen
class FederationPrint:
    digest: bytes
    #: (DC name, canonical bytes of its entry), in name order
    entries: tuple[tuple[str, bytes], ...] = ()

    @classmethod
    def of(cls, digest: bytes, entries: Iterable[tuple[str, bytes]]) -> FederationPrint:
        return cls(digest, tuple(sorted(entries)))

    def encoded_entries(self) -> bytes:
        return b"".join(_h4(name.encode()) + _h4(entry) for name, entry in self.entries)

    @property
    def known(self) -> bool:
        """False for :data:`NO_PRINT` (an end with no federation file, as in unit tests
        of the runtime): nothing to compare."""
        return self.digest != NO_PRINT.digest

    def differences(self, peer: str, their_digest: bytes, their_entries: bytes) -> str:
        """What differs between this file and ``peer``'s, for a refusal message (empty
        when the digests agree or either end has no file)."""
        if not self.known or their_digest == NO_PRINT.digest or their_digest == self.digest:
            return ""
        theirs: dict[bytes, bytes] = {}
        for i in range(0, len(their_entries) - _ENTRY + 1, _ENTRY):
            theirs[their_entries[i:i + 4]] = their_entries[i + 4:i + _ENTRY]
        differ, only_ours = [], []
        for name, entry in self.entries:
            key = _h4(name.encode())
            if key not in theirs:
                only_ours.append(name)
            elif theirs.pop(key) != _h4(entry):
                differ.append(name)
        parts = []
        if differ:
            parts.append(f"the keys of {', '.join(differ)} differ")
        if only_ours:
            parts.append(f"{', '.join(only_ours)} only in ours")
        if theirs:
            parts.append(f"{len(theirs)} DC(s) only in {peer}'s")
        if not parts:
            parts.append("the DCs agree; other settings differ ([modes] or [[operators]])")
        return (f"{peer}'s federation file has digest {their_digest.hex()[:16]}, ours "
                f"{self.digest.hex()[:16]}: {'; '.join(parts)}")


NO_PRINT = FederationPrint(b"\x00" * DIGEST_BYTES)
