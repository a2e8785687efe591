"""An operator's signed request read straight from its bytes (issue 14: CPU per command).

Every replica opens the operator request of every command it executes
(:func:`consensus.authz.open_request`), so what that costs is paid n times per
committed command. ``wire.decode`` of a small frame is one C decode, one C
re-encode (the canonical check) and the class's field checks; for the two
frames of a signed request — the :class:`~consensus.authz.SignedRequest`
wrapper and the :class:`~consensus.authz.RequestHead` the operator signed —
this module reads the few fields by hand instead, at about a third of the cost
(docs/BENCHMARKS.md, "CPU per command in a replica's execution").

The readers take **exactly** canonical frames (RFC 8949 §4.2.1: every head in
its shortest form, every float in the shortest width that holds its value, no
trailing byte) whose fields are within the message's limits; for anything else
they return None, and the caller decodes with ``wire.decode``, which either takes
the frame (the readers are allowed to decline what is valid) or raises the
``WireError`` that names the fault. So a frame is accepted or refused exactly as
before, with the same message: ``tests/test_request_frames.py`` checks that
whatever a reader returns is what ``wire.decode`` returns, on valid frames and on
mutated ones.

:func:`undated_digest` is :func:`consensus.authz.request_digest` computed from the
head's bytes: the same SHA-256 over the canonical head with ``created`` = 0.0,
made by replacing the float's bytes instead of encoding the head again.
"""

from __future__ import annotations

import hashlib
import math
import struct

import cbor2

from mesh import wire

__all__ = ["read_signed", "read_head", "undated_digest", "canonical_float_width"]


def _frame_prefix(tag: str, fields: int) -> bytes:
    """``[FRAME_VERSION, tag, [`` with ``fields`` fields: the first bytes of every frame
    of the message ``tag`` (fewer than 24 fields: a one-byte array head)."""
    return (bytes((0x83,)) + cbor2.dumps(wire.FRAME_VERSION) + cbor2.dumps(tag)
            + bytes((0x80 | fields,)))


_SIGNED_PREFIX = _frame_prefix("operator.signed-request", 3)
_HEAD_PREFIX = _frame_prefix("operator.request-head", 7)
#: The largest frame of each (consensus.authz.MAX_SIGNED): both are registered with it.
_MAX_FRAME = 2048
_SIGNATURE_HEAD = b"\x58\x40"  # a byte string of 64 bytes
_DIGEST_HEAD = b"\x58\x20"  # a byte string of 32 bytes
#: ``0.0`` in canonical CBOR: a half-precision float.
_ZERO = b"\xf9\x00\x00"
_FLOAT_WIDTH = {0xF9: 2, 0xFA: 4, 0xFB: 8}
_FLOAT_FORMAT = {2: ">e", 4: ">f", 8: ">d"}


class _Decline(Exception):
    """Not a frame these readers take: ``wire.decode`` decides."""


def _length(data: bytes, pos: int, major: int) -> tuple[int, int]:
    """The length in the head at ``pos`` of a string of CBOR major type ``major`` (2:
    bytes, 3: text), in its shortest form, and the position after the head."""
    b = data[pos]
    if b >> 5 != major:
        raise _Decline
    n = b & 0x1F
    if n < 24:
        return n, pos + 1
    if n == 24:
        n = data[pos + 1]
        if n < 24:
            raise _Decline
        return n, pos + 2
    if n == 25:
        n = (data[pos + 1] << 8) | data[pos + 2]
        if n < 256:
            raise _Decline
        return n, pos + 3
    raise _Decline  # longer than any field of these frames may be


def _text(data: bytes, pos: int, limit: int) -> tuple[str, int]:
    """A text string of at most ``limit`` characters (wire.Text) and the position after."""
    n, pos = _length(data, pos, 3)
    end = pos + n
    if end > len(data):
        raise _Decline
    text = data[pos:end].decode("utf-8")  # strict, as cbor2's decoder
    if len(text) > limit:
        raise _Decline
    return text, end


def _bytes(data: bytes, pos: int, limit: int) -> tuple[bytes, int]:
    n, pos = _length(data, pos, 2)
    end = pos + n
    if n > limit or end > len(data):
        raise _Decline
    return data[pos:end], end


def canonical_float_width(value: float) -> int:
    """The bytes of ``value``'s shortest exact IEEE 754 form, 2, 4 or 8: the width a
    canonical encoder writes a finite float in (RFC 8949 §4.2.2; cbor2's
    ``encode_minimal_float``: single first, then half)."""
    try:
        single = struct.unpack(">f", struct.pack(">f", value))[0]
    except OverflowError:
        return 8
    if single != value:
        return 8
    try:
        half = struct.unpack(">e", struct.pack(">e", value))[0]
    except OverflowError:
        return 4
    return 2 if half == value else 4


def _float(data: bytes, pos: int) -> tuple[float, int]:
    """A finite float in its canonical width (wire.Float) and the position after."""
    width = _FLOAT_WIDTH.get(data[pos])
    if width is None or pos + 1 + width > len(data):
        raise _Decline
    value: float = struct.unpack(_FLOAT_FORMAT[width], data[pos + 1:pos + 1 + width])[0]
    if not math.isfinite(value) or canonical_float_width(value) != width:
        raise _Decline
    return value, pos + 1 + width


def read_signed(data: bytes) -> tuple[str, bytes, bytes] | None:
    """``(operator, head, signature)`` of an encoded SignedRequest, or None (then
    ``wire.decode`` decides). Field limits: consensus.authz.SignedRequest."""
    if type(data) is not bytes or len(data) > _MAX_FRAME or not data.startswith(_SIGNED_PREFIX):
        return None
    try:
        operator, pos = _text(data, len(_SIGNED_PREFIX), 64)
        head, pos = _bytes(data, pos, _MAX_FRAME - 160)
        if data[pos:pos + 2] != _SIGNATURE_HEAD or len(data) != pos + 66:
            return None
        return operator, head, data[pos + 2:]
    except (_Decline, IndexError, UnicodeDecodeError):
        return None


def read_head(data: bytes) -> tuple[str, str, str, str, bytes, float, str] | None:
    """The seven fields of an encoded RequestHead in their order (federation, operator,
    method, target, body_digest, created, nonce), or None (then ``wire.decode``
    decides). Field limits: consensus.authz.RequestHead."""
    if type(data) is not bytes or len(data) > _MAX_FRAME or not data.startswith(_HEAD_PREFIX):
        return None
    try:
        federation, pos = _text(data, len(_HEAD_PREFIX), 64)
        operator, pos = _text(data, pos, 64)
        method, pos = _text(data, pos, 16)
        target, pos = _text(data, pos, 1024)
        if data[pos:pos + 2] != _DIGEST_HEAD:
            return None
        digest, pos = data[pos + 2:pos + 34], pos + 34
        created, pos = _float(data, pos)
        nonce, pos = _text(data, pos, 64)
        if pos != len(data) or len(digest) != 32:
            return None
        return federation, operator, method, target, digest, created, nonce
    except (_Decline, IndexError, UnicodeDecodeError):
        return None


def undated_digest(head: bytes, created: float, nonce: str) -> bytes | None:
    """SHA-256 of the canonical head with ``created`` = 0.0, from ``head``: the canonical
    frame of a RequestHead whose ``created`` and ``nonce`` (its last two fields) are
    these. None if the bytes there are not those two fields' encodings (then the caller
    encodes the head again: consensus.authz.request_digest)."""
    raw_nonce = nonce.encode("utf-8")
    n = len(raw_nonce)
    nonce_bytes = (1 if n < 24 else 2 if n < 256 else 3) + n
    end = len(head) - nonce_bytes
    start = end - 1 - canonical_float_width(created)
    if start < len(_HEAD_PREFIX) or _FLOAT_WIDTH.get(head[start]) != end - start - 1:
        return None
    if not head.endswith(raw_nonce):
        return None
    return hashlib.sha256(b"".join((head[:start], _ZERO, head[end:]))).digest()
