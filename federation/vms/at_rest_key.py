"""A node's at-rest key: the one secret that opens its sealed images.

A file of one line, ``dwcp-at-rest:<base64 of 32 bytes>``, mode 0600, by default beside
the DC's identity key (``keys/<DC>.at-rest``) and never in the data directory: a stolen
data volume (a disk, a backup, a snapshot of it) without the key file is noise. It is a
key of its own, not derived from the identity key, so rotating the DC key (a new
identity, docs/security.md) re-encrypts nothing. Losing it loses every sealed image of
the DC, so back it up with the identity key.

:func:`load_or_create` makes the key the first time a node starts, and only then: if
the data directory already holds sealed images, a missing key is an error (a new key
would make them unreadable).
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from pathlib import Path

import nacl.utils

from federation.vms.sealing import KEY_SIZE, SealKey

__all__ = ["AtRestKeyError", "PREFIX", "load_key", "write_key", "load_or_create",
           "default_key_path", "key_if_any"]

PREFIX = "dwcp-at-rest:"


class AtRestKeyError(Exception):
    """An at-rest key file that cannot be used; the message names the file."""


def default_key_path(identity_key: Path) -> Path:
    """``keys/dc1.key`` -> ``keys/dc1.at-rest``."""
    return identity_key.with_name(identity_key.stem + ".at-rest")


def write_key(path: Path, key: SealKey) -> None:
    """Create ``path`` (never replacing one) with mode 0600 from the start, fsynced."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise AtRestKeyError(f"{path}: already exists; refusing to replace an at-rest key "
                             "(the images sealed with it would become unreadable)") from None
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(PREFIX + base64.b64encode(key.raw).decode("ascii") + "\n")
        f.flush()
        os.fsync(f.fileno())


def load_key(path: Path) -> SealKey:
    try:
        st = path.stat()
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except FileNotFoundError:
        raise AtRestKeyError(f"{path}: no such at-rest key file") from None
    except OSError as exc:
        raise AtRestKeyError(f"{path}: cannot read the at-rest key: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise AtRestKeyError(f"{path}: at-rest key file mode is {stat.S_IMODE(st.st_mode):04o}; "
                             f"it must not be accessible by group or others "
                             f"(run 'chmod 600 {path}')")
    if not text.startswith(PREFIX):
        raise AtRestKeyError(f"{path}: not a DWCP at-rest key (expected '{PREFIX}...')")
    try:
        raw = base64.b64decode(text[len(PREFIX):], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AtRestKeyError(f"{path}: at-rest key is not valid base64: {exc}") from None
    if len(raw) != KEY_SIZE:
        raise AtRestKeyError(f"{path}: at-rest key is {len(raw)} bytes, expected {KEY_SIZE}")
    return SealKey(raw)


def load_or_create(path: Path, store_has_images: bool) -> tuple[SealKey, bool]:
    """The key at ``path``, made if there is none and ``store_has_images`` is false;
    returns it and whether it was made now."""
    if path.exists():
        return load_key(path), False
    if store_has_images:
        raise AtRestKeyError(
            f"{path}: no at-rest key, but the data directory holds VM images sealed with "
            "one; restore the key file from its backup (a new key cannot open them)")
    key = SealKey(nacl.utils.random(KEY_SIZE))
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_key(path, key)
    except OSError as exc:
        raise AtRestKeyError(f"{path}: cannot create the at-rest key: {exc.strerror} (set "
                             "[storage] at_rest_key in the node config to a writable "
                             "place outside the data directory)") from None
    return key, True


def key_if_any(path: Path) -> SealKey | None:
    """The key at ``path`` if there is one (tools that read a DC's images: the demo's
    checks, tests); None where the DC has none."""
    return load_key(path) if path.exists() else None
