"""DC identities: Ed25519 signing keys and the files that hold them.

A key file is one line, ``dwcp-ed25519-secret:<base64 32-byte seed>``, mode
0600. Like OpenSSH (``sshd`` refuses "UNPROTECTED PRIVATE KEY FILE"), we
refuse to load a key that the group or others can read. A public key is
written ``ed25519:<base64 32 bytes>`` in the federation file.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from pathlib import Path

import attrs
import nacl.exceptions
import nacl.signing

__all__ = [
    "IdentityError",
    "Identity",
    "PublicKey",
    "generate",
    "load_key_file",
    "write_key_file",
    "parse_public_key",
    "format_public_key",
]

SECRET_PREFIX = "dwcp-ed25519-secret:"
PUBLIC_PREFIX = "ed25519:"
SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32


class IdentityError(Exception):
    """A key file or key that cannot be used, and why."""


@attrs.frozen
class PublicKey:
    raw: bytes = attrs.field(validator=attrs.validators.instance_of(bytes))

    def verify(self, data: bytes, signature: bytes) -> bool:
        """True when ``signature`` is this key's signature of exactly ``data``."""
        if len(signature) != SIGNATURE_BYTES:
            return False
        try:
            nacl.signing.VerifyKey(self.raw).verify(data, signature)
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError):
            return False
        return True

    def __str__(self) -> str:
        return format_public_key(self.raw)


class Identity:
    """A DC's signing key."""

    def __init__(self, signing_key: nacl.signing.SigningKey) -> None:
        self._key = signing_key
        self.public = PublicKey(bytes(signing_key.verify_key))

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        if len(seed) != 32:
            raise IdentityError(f"an Ed25519 seed is 32 bytes, got {len(seed)}")
        return cls(nacl.signing.SigningKey(seed))

    @property
    def seed(self) -> bytes:
        return bytes(self._key)

    def sign(self, data: bytes) -> bytes:
        """The 64-byte detached signature of ``data``."""
        return self._key.sign(data).signature

    def __repr__(self) -> str:
        return f"Identity({self.public})"


def generate() -> Identity:
    return Identity(nacl.signing.SigningKey.generate())


def format_public_key(raw: bytes) -> str:
    return PUBLIC_PREFIX + base64.b64encode(raw).decode("ascii")


def parse_public_key(text: str) -> PublicKey:
    """Parse ``ed25519:<base64>``; the error says what is wrong with it."""
    if not isinstance(text, str) or not text.startswith(PUBLIC_PREFIX):
        raise IdentityError(f"a public key is written '{PUBLIC_PREFIX}<base64>', got {text!r}")
    try:
        raw = base64.b64decode(text[len(PUBLIC_PREFIX) :], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise IdentityError(f"public key is not valid base64: {exc}") from exc
    if len(raw) != PUBLIC_KEY_BYTES:
        raise IdentityError(f"an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes, got {len(raw)}")
    try:
        nacl.signing.VerifyKey(raw)
    except Exception as exc:  # PyNaCl raises several types for a bad point
        raise IdentityError(f"not an Ed25519 public key: {exc}") from exc
    return PublicKey(raw)


def write_key_file(
    path: str | os.PathLike[str], identity: Identity, *, overwrite: bool = False,
    prefix: str = SECRET_PREFIX,
) -> None:
    """Write the key with mode 0600 from the start (never briefly readable by others).
    ``prefix`` names the kind of key (an operator's key has its own, federation.api.auth)."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise IdentityError(f"{path}: already exists; refusing to overwrite a key") from None
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(prefix + base64.b64encode(identity.seed).decode("ascii") + "\n")
        f.flush()
        os.fsync(f.fileno())


def load_key_file(path: str | os.PathLike[str], *, prefix: str = SECRET_PREFIX) -> Identity:
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise IdentityError(
            f"{path}: no such key file (create one with 'dwcp keygen --out {path}')"
        ) from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IdentityError(
            f"{path}: key file mode is {stat.S_IMODE(st.st_mode):04o}; it must not be "
            f"accessible by group or others (run 'chmod 600 {path}')"
        )
    text = path.read_text(encoding="ascii", errors="replace").strip()
    if not text.startswith(prefix):
        raise IdentityError(f"{path}: not a DWCP key file (expected '{prefix}...')")
    try:
        seed = base64.b64decode(text[len(prefix) :], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise IdentityError(f"{path}: key is not valid base64: {exc}") from exc
    if len(seed) != 32:
        raise IdentityError(f"{path}: key seed is {len(seed)} bytes, expected 32")
    return Identity.from_seed(seed)
