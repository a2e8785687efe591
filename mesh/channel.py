"""The secure channel between two DCs: a sans-I/O core in the style of h11.

Handshake (three frames, then encrypted data in each direction)::

    I -> R  Hello    federation, I's name, R's name, I's versions,
                     I's ephemeral X25519 key, I's nonce
    R -> I  Welcome  body = federation, R, I, R's versions, R's ephemeral key,
                     R's nonce, R's secretstream header;
                     sig_R over ("dwcp/1 responder" | Hello bytes | body)
    I -> R  Finish   body = I's secretstream header;
                     sig_I over ("dwcp/1 initiator" | Hello bytes | Welcome body | body)

Both ends derive two session keys with libsodium's ``crypto_kx`` (the
initiator is the kx client) and run ``crypto_secretstream_xchacha20poly1305``
in each direction. Each signature is made by the DC's identity key and covers
the other side's fresh nonce and ephemeral key, so a recorded handshake
replayed into a new one fails its signature check; every field of the
transcript (federation id, both names, both version lists) is bound by both
signatures. Signatures are checked over the bytes received.

The channel works on *frames*: over a websocket a frame is one message; over a
TCP stream use :class:`FrameReader` / :func:`frame` (4-byte big-endian length).
After the handshake, every frame is one secretstream message; the last one a
side sends carries ``TAG_FINAL``, so a stream cut short is told apart from a
clean close. Any failure raises :class:`ChannelError` with a ``reason`` that
the driver logs and counts, and the channel is dead from then on.

Before authentication a peer is nobody, so every input of the handshake is checked
before it is used: :attr:`SecureChannel.max_frame` is the largest frame the current
state accepts (a Hello is at most 1 KiB), for the driver to check a frame's declared
length before it reads or buffers a byte of it; an ephemeral X25519 key of small order
(or all zeros) is refused by name (:func:`small_order`), since its shared secret is
known to everyone; and any error of libsodium becomes a :class:`ChannelError`, never
another exception.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn

import attrs
import nacl.bindings as sodium
import nacl.exceptions
import nacl.utils

# PyNaCl's own cffi module. Its ``crypto_secretstream`` wrappers return fresh
# ``bytes``: each push or pull allocates and zero-fills a C buffer, then copies it
# into a new ``bytes`` object, which costs more than the cipher itself on 1 MiB
# bulk frames. The ``*_into`` methods below call the same libsodium functions on
# the same state objects through this module, writing straight into a buffer the
# caller reuses; cffi releases the GIL during the call, so worker threads encrypt
# and decrypt in parallel with the event loop.
from nacl._sodium import ffi as _ffi
from nacl._sodium import lib as _lib

from mesh import versions as transfer_versions
from mesh import wire
from mesh.federation_print import DIGEST_BYTES, MAX_ENTRIES_BYTES, NO_PRINT, FederationPrint
from mesh.identity import Identity, PublicKey
from mesh.wire import U64, Bytes, ListOf, Text, field

__all__ = [
    "ChannelError",
    "SecureChannel",
    "HandshakeComplete",
    "Data",
    "Closed",
    "FrameReader",
    "frame",
    "LENGTH_BYTES",
    "MAX_PLAINTEXT",
    "FRAME_OVERHEAD",
    "small_order",
]

#: Largest plaintext of one data frame: a 4 MiB bulk chunk plus its header.
MAX_PLAINTEXT = 8 * 1024 * 1024
_ABYTES = sodium.crypto_secretstream_xchacha20poly1305_ABYTES
_HEADERBYTES = sodium.crypto_secretstream_xchacha20poly1305_HEADERBYTES
_TAG_MESSAGE = sodium.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
_TAG_FINAL = sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL
#: Bytes a data frame adds to its plaintext (secretstream's tag and MAC).
FRAME_OVERHEAD = _ABYTES
NONCE_BYTES = 32
NAME_MAX = 64

_RESPONDER_CONTEXT = b"dwcp/1 responder\x00"
_INITIATOR_CONTEXT = b"dwcp/1 initiator\x00"


class ChannelError(Exception):
    """The channel is refused or broken. ``reason`` is a short metric label."""

    REASONS = (
        "malformed",  # a frame that does not decode, or is out of order
        "wrong_federation",
        "unknown_peer",  # a DC name not in the federation, or not the one we dialled
        "bad_signature",  # includes replayed handshakes
        "version_mismatch",
        "tampered",  # a data frame failed authentication
        "truncated",  # the stream ended without a final frame
        "closed",  # use after close
        "oversized",
        "weak_key",  # an ephemeral key of small order: no secret would be shared
        "key_mismatch",  # the peer proved another key than our federation file lists
        "federation_mismatch",  # the peer runs another federation file (its digest)
    )

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in self.REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------- wire


@wire.message("channel.hello", max_size=1024)
class Hello:
    federation: str = field(Text(NAME_MAX))
    initiator: str = field(Text(NAME_MAX))
    responder: str = field(Text(NAME_MAX))
    versions: tuple[int, ...] = field(ListOf(U64(255), 16))
    ephemeral: bytes = field(Bytes(32, exact=True))
    nonce: bytes = field(Bytes(NONCE_BYTES, exact=True))
    #: the Ed25519 key the initiator signs with (checked against the federation file;
    #: only used to say which key a peer presents when it is not the file's)
    identity: bytes = field(Bytes(32, exact=True))
    #: the initiator's federation file (mesh.federation_print)
    fed_digest: bytes = field(Bytes(DIGEST_BYTES, exact=True))
    fed_entries: bytes = field(Bytes(MAX_ENTRIES_BYTES))


@wire.message("channel.welcome-body", max_size=1024)
class WelcomeBody:
    federation: str = field(Text(NAME_MAX))
    responder: str = field(Text(NAME_MAX))
    initiator: str = field(Text(NAME_MAX))
    versions: tuple[int, ...] = field(ListOf(U64(255), 16))
    ephemeral: bytes = field(Bytes(32, exact=True))
    nonce: bytes = field(Bytes(NONCE_BYTES, exact=True))
    stream_header: bytes = field(Bytes(_HEADERBYTES, exact=True))
    identity: bytes = field(Bytes(32, exact=True))
    fed_digest: bytes = field(Bytes(DIGEST_BYTES, exact=True))
    fed_entries: bytes = field(Bytes(MAX_ENTRIES_BYTES))


@wire.message("channel.welcome", max_size=2048)
class Welcome:
    body: bytes = field(Bytes(1024))
    signature: bytes = field(Bytes(64, exact=True))


@wire.message("channel.finish-body", max_size=256)
class FinishBody:
    stream_header: bytes = field(Bytes(_HEADERBYTES, exact=True))


@wire.message("channel.finish", max_size=512)
class Finish:
    body: bytes = field(Bytes(256))
    signature: bytes = field(Bytes(64, exact=True))


# --------------------------------------------------------------------------- events


@attrs.frozen
class HandshakeComplete:
    peer: str
    version: int  # the highest transfer version both ends offered (mesh.versions)
    peer_versions: tuple[int, ...]  # the peer's whole offer, as it signed it


@attrs.frozen
class Data:
    payload: bytes


@attrs.frozen
class Closed:
    """The peer closed its direction cleanly (a final frame)."""


ChannelEvent = HandshakeComplete | Data | Closed

# --------------------------------------------------------------------------- small order

_P25519 = 2**255 - 19
#: The u-coordinates of the points of small order on Curve25519 and its twist (orders 1,
#: 2, 4 and 8): libsodium's ``has_small_order`` blocklist (x25519_ref10.c), reduced mod p.
#: X25519 with any of them gives an all-zero secret whatever our scalar (RFC 7748 §6.1).
_SMALL_ORDER_U = frozenset({
    0,
    1,
    _P25519 - 1,
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
})


def small_order(key: bytes) -> bool:
    """True when the X25519 public key ``key`` is a point of small order (all zeros
    included) in any of its encodings: the top bit is ignored and u is taken mod p, as
    X25519 itself does (RFC 7748 §5)."""
    u = int.from_bytes(key, "little") & ((1 << 255) - 1)
    return u % _P25519 in _SMALL_ORDER_U


# --------------------------------------------------------------------------- framing


#: Bytes of a frame's length prefix on a byte stream (big-endian).
LENGTH_BYTES = 4


def frame(payload: bytes) -> bytes:
    """Length-prefix a frame for a byte stream."""
    return len(payload).to_bytes(LENGTH_BYTES, "big") + payload


class FrameReader:
    """Splits a byte stream into frames (a 4-byte big-endian length, then the frame);
    refuses a frame longer than ``max_frame``.

    The length is unauthenticated (the frame's AEAD is checked later, by the channel), so
    it is checked as soon as its 4 bytes are in, before a byte of the frame is kept: the
    reader never holds more than one frame of at most ``max_frame`` bytes plus its
    prefix, plus what one :meth:`feed` handed over beyond it. After a refusal the reader
    is dead (every later :meth:`feed` raises again): the stream has lost its framing.

    Bytes that complete frames are sliced straight from what was fed (one copy per
    frame); only a frame cut by the end of a read is kept, in a buffer that grows as
    its bytes arrive (no copy of the whole per read)."""

    def __init__(self, max_frame: int = MAX_PLAINTEXT + _ABYTES) -> None:
        self._buf = bytearray()
        self._max = max_frame
        self._refused = ""

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """The frames ``data`` completes, each its own ``bytes`` (``data`` may be a view of
        a buffer the caller reuses: nothing of it is kept)."""
        if self._refused:
            raise ChannelError("oversized", self._refused)
        if self._buf:
            self._buf += data
            source: bytes | bytearray | memoryview = self._buf
        else:
            source = data
        out: list[bytes] = []
        pos = 0
        end = len(source)
        limit = self._max
        while end - pos >= LENGTH_BYTES:
            n = int.from_bytes(source[pos:pos + LENGTH_BYTES], "big")
            if n > limit:
                self._refused = f"frame of {n} bytes exceeds {limit}"
                self._buf = bytearray()
                raise ChannelError("oversized", self._refused)
            stop = pos + LENGTH_BYTES + n
            if stop > end:
                break
            out.append(bytes(source[pos + LENGTH_BYTES:stop]))
            pos = stop
        if source is self._buf:
            del self._buf[:pos]
        elif pos < end:
            self._buf = bytearray(source[pos:])
        return out

    @property
    def pending(self) -> int:
        """Bytes of a frame not complete yet (its prefix included)."""
        return len(self._buf)


# --------------------------------------------------------------------------- the core

_START, _SENT_HELLO, _SENT_WELCOME, _OPEN, _DEAD = range(5)
#: Per state, the largest frame the next expected message may have (its wire limit).
_FRAME_LIMITS = {
    _START: Hello.wire_max_size,  # type: ignore[attr-defined]
    _SENT_HELLO: Welcome.wire_max_size,  # type: ignore[attr-defined]
    _SENT_WELCOME: Finish.wire_max_size,  # type: ignore[attr-defined]
    _OPEN: MAX_PLAINTEXT + _ABYTES,
    _DEAD: 0,
}


class SecureChannel:
    """One end of a channel. Feed frames in with :meth:`receive_frame`; send with
    :meth:`send`; read outgoing frames with :meth:`frames_to_send`.

    ``peers`` maps every DC name of the federation to its public key.
    An initiator names the DC it dials in ``peer``; a responder learns it from
    the Hello and checks it against ``peers``.
    """

    def __init__(
        self,
        *,
        identity: Identity,
        name: str,
        federation: str,
        peers: Mapping[str, PublicKey],
        versions: Sequence[int],
        initiator: bool,
        peer: str | None = None,
        random_bytes: Callable[[int], bytes] = nacl.utils.random,
        fed_print: FederationPrint = NO_PRINT,
    ) -> None:
        if initiator and peer is None:
            raise ValueError("an initiator must name the peer it dials")
        self.identity = identity
        self.name = name
        self.federation = federation
        self.peers = dict(peers)
        self.fed_print = fed_print
        self._fed_entries = fed_print.encoded_entries()
        self._peer_hello: Hello | None = None
        self.versions = transfer_versions.offer(versions, who="our transfer versions")
        self.initiator = initiator
        self.peer = peer
        #: the highest transfer version both offer, and the peer's whole offer (set by
        #: the handshake)
        self.version: int | None = None
        self.peer_versions: tuple[int, ...] = ()
        self._random = random_bytes
        self._state = _START
        self._out: list[bytes] = []
        self._eph_pk, self._eph_sk = sodium.crypto_kx_seed_keypair(random_bytes(32))
        self._nonce = random_bytes(NONCE_BYTES)
        self._hello_raw = b""
        self._welcome_body_raw = b""
        self._tx_key = b""
        self._rx_key = b""
        self._push = sodium.crypto_secretstream_xchacha20poly1305_state()
        self._pull = sodium.crypto_secretstream_xchacha20poly1305_state()
        self._peer_closed = False
        self._self_closed = False
        if initiator:
            assert peer is not None
            if peer not in self.peers:
                raise ValueError(f"peer {peer!r} is not in the federation")
            hello = Hello(federation, name, peer, self.versions, self._eph_pk, self._nonce,
                          identity.public.raw, fed_print.digest, self._fed_entries)
            self._hello_raw = wire.encode(hello)
            self._out.append(self._hello_raw)
            self._state = _SENT_HELLO

    # ------------------------------------------------------------------ public API

    @property
    def is_open(self) -> bool:
        return self._state == _OPEN

    @property
    def max_frame(self) -> int:
        """The largest frame this end accepts next: the size limit of the handshake
        message it waits for (a responder's first frame is a Hello of at most 1 KiB), a
        data frame once open, 0 on a dead channel. A driver checks a frame's declared
        length against it before reading or buffering the frame."""
        return _FRAME_LIMITS[self._state]

    def frames_to_send(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    def receive_frame(self, data: bytes) -> list[ChannelEvent]:
        """Process one frame from the peer. Raises :class:`ChannelError` on any fault,
        after which the channel is dead."""
        try:
            limit = self.max_frame
            if len(data) > limit:
                raise ChannelError("oversized", f"frame of {len(data)} bytes, at most {limit} here")
            return self._receive(data)
        except ChannelError:
            self._die()
            raise
        except wire.WireError as exc:
            self._die()
            raise ChannelError("malformed", str(exc)) from exc
        except nacl.exceptions.CryptoError as exc:  # every libsodium call is wrapped; a guard
            self._die()
            raise ChannelError("malformed", f"libsodium refused: {exc}") from exc

    def send(self, payload: bytes | bytearray | memoryview) -> bytes:
        """Encrypt ``payload`` into one frame (returned, not queued: bulk callers write it
        themselves, possibly from a worker thread)."""
        self._check_sendable(len(payload))
        return sodium.crypto_secretstream_xchacha20poly1305_push(
            self._push, bytes(payload), None, _TAG_MESSAGE
        )

    def send_into(
        self, payload: bytes | bytearray | memoryview, out: bytearray | memoryview
    ) -> int:
        """Encrypt ``payload`` into the start of the writable buffer ``out``; returns the
        frame's length, ``len(payload) + FRAME_OVERHEAD``. The frame is the same one
        :meth:`send` would return; the caller reuses ``out`` once the frame is written.
        A buffer too small is refused with ``ValueError`` before the stream advances."""
        self._check_sendable(len(payload))
        need = len(payload) + _ABYTES
        if len(out) < need:
            raise ValueError(f"out buffer of {len(out)} bytes, the frame needs {need}")
        out_p = _ffi.from_buffer("unsigned char[]", out, require_writable=True)
        m_p = _ffi.from_buffer("unsigned char[]", payload)
        rc = _lib.crypto_secretstream_xchacha20poly1305_push(
            self._push.statebuf, out_p, _ffi.NULL, m_p, len(payload), _ffi.NULL, 0, _TAG_MESSAGE
        )
        if rc != 0:
            raise ChannelError("closed", "libsodium refused to encrypt a frame")
        return need

    def close(self) -> bytes:
        """The final frame of this direction."""
        self._check_sendable(0, "close")
        self._self_closed = True
        return sodium.crypto_secretstream_xchacha20poly1305_push(self._push, b"", None, _TAG_FINAL)

    def end_of_stream(self) -> None:
        """The transport ended. Raises ``truncated`` unless the peer closed cleanly."""
        if not self._peer_closed:
            self._die()
            raise ChannelError("truncated", "the stream ended without a final frame")

    def receive_frame_into(
        self, data: bytes | bytearray | memoryview, out: bytearray | memoryview
    ) -> int | Closed:
        """Decrypt one *data* frame (the channel must be open) into the start of the
        writable buffer ``out``: returns the plaintext length, or :class:`Closed` for
        the peer's final frame. Faults raise :class:`ChannelError` exactly as
        :meth:`receive_frame` does and kill the channel; an ``out`` smaller than the
        frame's plaintext is refused with ``ValueError`` before the stream advances."""
        if self._state == _OPEN and len(out) < len(data) - _ABYTES:
            size = len(data) - _ABYTES
            raise ValueError(f"out buffer of {len(out)} bytes, the frame holds {size}")
        try:
            if self._state != _OPEN:
                raise ChannelError("malformed", "a data frame on a channel that is not open")
            return self._open_into(data, out)
        except ChannelError:
            self._die()
            raise

    # ------------------------------------------------------------------ internals

    def _check_sendable(self, size: int, what: str = "send") -> None:
        if self._state != _OPEN or self._self_closed:
            raise ChannelError("closed", f"{what} on a channel that is not open")
        if size > MAX_PLAINTEXT:
            raise ChannelError("oversized", f"payload of {size} bytes exceeds {MAX_PLAINTEXT}")

    def _die(self) -> None:
        self._state = _DEAD
        self._eph_sk = b""
        self._out.clear()

    def _peer_key(self, name: str) -> PublicKey:
        key = self.peers.get(name)
        if key is None or name == self.name:
            raise ChannelError(
                "unknown_peer", f"{name!r} is not a peer DC of federation {self.federation!r}"
            )
        return key

    def _agree_versions(self, offered: Sequence[int]) -> None:
        """Keep the peer's offer and the highest version common to both."""
        try:
            self.peer_versions = transfer_versions.offer(offered, who="the peer's offer")
            self.version = transfer_versions.highest_common(self.versions, self.peer_versions)
        except transfer_versions.VersionError as exc:
            raise ChannelError("version_mismatch", str(exc)) from None

    def _session_keys(self, peer_ephemeral: bytes) -> None:
        """Derive both session keys from the peer's ephemeral key (initiator: kx client)."""
        if small_order(peer_ephemeral):
            raise ChannelError("weak_key", "the peer's ephemeral X25519 key has small order")
        derive = (
            sodium.crypto_kx_client_session_keys
            if self.initiator
            else sodium.crypto_kx_server_session_keys
        )
        try:
            self._rx_key, self._tx_key = derive(self._eph_pk, self._eph_sk, peer_ephemeral)
        except nacl.exceptions.CryptoError as exc:  # libsodium's own refusal of the key
            raise ChannelError("weak_key", f"key exchange refused: {exc}") from exc

    def _init_push(self) -> bytes:
        try:
            return sodium.crypto_secretstream_xchacha20poly1305_init_push(
                self._push, self._tx_key
            )
        except nacl.exceptions.CryptoError as exc:
            raise ChannelError("weak_key", f"cannot start the stream: {exc}") from exc

    def _check_federation(self, federation: str) -> None:
        if federation != self.federation:
            raise ChannelError(
                "wrong_federation",
                f"peer is in federation {federation!r}, we are in {self.federation!r}",
            )

    def _receive(self, data: bytes) -> list[ChannelEvent]:
        if self._state == _OPEN:
            return self._receive_data(data)
        if self._state == _START and not self.initiator:
            return self._on_hello(data)
        if self._state == _SENT_HELLO:
            return self._on_welcome(data)
        if self._state == _SENT_WELCOME:
            return self._on_finish(data)
        raise ChannelError("closed", "frame on a dead channel")

    def _on_hello(self, data: bytes) -> list[ChannelEvent]:
        hello = wire.decode(data, expect=(Hello,))
        self._check_federation(hello.federation)
        if hello.responder != self.name:
            raise ChannelError(
                "unknown_peer", f"hello is addressed to {hello.responder!r}, we are {self.name!r}"
            )
        self._peer_key(hello.initiator)
        self._agree_versions(hello.versions)
        self._session_keys(hello.ephemeral)
        self.peer = hello.initiator
        self._hello_raw = data
        self._peer_hello = hello
        header = self._init_push()
        body = WelcomeBody(
            self.federation,
            self.name,
            hello.initiator,
            self.versions,
            self._eph_pk,
            self._nonce,
            header,
            self.identity.public.raw,
            self.fed_print.digest,
            self._fed_entries,
        )
        self._welcome_body_raw = wire.encode(body)
        signature = self.identity.sign(_RESPONDER_CONTEXT + data + self._welcome_body_raw)
        self._out.append(wire.encode(Welcome(self._welcome_body_raw, signature)))
        self._state = _SENT_WELCOME
        return []

    def _on_welcome(self, data: bytes) -> list[ChannelEvent]:
        welcome = wire.decode(data, expect=(Welcome,))
        body = wire.decode(welcome.body, expect=(WelcomeBody,))
        self._check_federation(body.federation)
        if body.responder != self.peer:
            raise ChannelError(
                "unknown_peer", f"dialled {self.peer!r} but {body.responder!r} answered"
            )
        if body.initiator != self.name:
            raise ChannelError(
                "unknown_peer", f"welcome is addressed to {body.initiator!r}, we are {self.name!r}"
            )
        key = self._peer_key(body.responder)
        transcript = _RESPONDER_CONTEXT + self._hello_raw + welcome.body
        if not key.verify(transcript, welcome.signature):
            self._not_signed(body.responder, key, body.identity, transcript, welcome.signature)
        self._same_federation(body.responder, body.fed_digest, body.fed_entries)
        self._agree_versions(body.versions)
        self._session_keys(body.ephemeral)
        self._init_pull(body.stream_header)
        header = self._init_push()
        finish_body = wire.encode(FinishBody(header))
        signature = self.identity.sign(
            _INITIATOR_CONTEXT + self._hello_raw + welcome.body + finish_body
        )
        self._out.append(wire.encode(Finish(finish_body, signature)))
        self._opened()
        assert self.peer is not None and self.version is not None
        return [HandshakeComplete(self.peer, self.version, self.peer_versions)]

    def _on_finish(self, data: bytes) -> list[ChannelEvent]:
        finish = wire.decode(data, expect=(Finish,))
        assert self.peer is not None
        key = self._peer_key(self.peer)
        transcript = _INITIATOR_CONTEXT + self._hello_raw + self._welcome_body_raw + finish.body
        hello = self._peer_hello
        assert hello is not None
        if not key.verify(transcript, finish.signature):
            self._not_signed(self.peer, key, hello.identity, transcript, finish.signature)
        self._same_federation(self.peer, hello.fed_digest, hello.fed_entries)
        body = wire.decode(finish.body, expect=(FinishBody,))
        self._init_pull(body.stream_header)
        self._opened()
        assert self.version is not None
        return [HandshakeComplete(self.peer, self.version, self.peer_versions)]

    def _not_signed(self, peer: str, key: PublicKey, presented: bytes, transcript: bytes,
                    signature: bytes) -> NoReturn:
        """The signature is not by ``key``, the federation file's key of ``peer``. If it
        is by the key the peer presents, the peer holds another key than the file says
        (a rotated key, a wrong file): say so, naming both; else a forgery."""
        other = PublicKey(presented)
        if presented != key.raw and other.verify(transcript, signature):
            raise ChannelError("key_mismatch", f"{peer} presents key {other}, the federation "
                                               f"file says {key}")
        raise ChannelError("bad_signature", f"{peer!r} did not sign this handshake")

    def _same_federation(self, peer: str, digest: bytes, entries: bytes) -> None:
        """Refuse a peer (authenticated by now) that runs another federation file."""
        why = self.fed_print.differences(peer, digest, entries)
        if why:
            raise ChannelError("federation_mismatch", why)

    def _init_pull(self, header: bytes) -> None:
        try:
            sodium.crypto_secretstream_xchacha20poly1305_init_pull(self._pull, header, self._rx_key)
        except nacl.exceptions.CryptoError as exc:
            raise ChannelError("tampered", f"bad stream header: {exc}") from exc

    def _opened(self) -> None:
        self._state = _OPEN
        self._eph_sk = b""  # forward secrecy: the ephemeral secret is not kept

    def _receive_data(self, data: bytes) -> list[ChannelEvent]:
        if len(data) < _ABYTES:  # a longer frame was refused by receive_frame
            raise ChannelError("tampered", f"data frame of {len(data)} bytes")
        out = bytearray(len(data) - _ABYTES)
        got = self._open_into(data, out)
        if isinstance(got, Closed):
            return [got]
        return [Data(bytes(out))]

    def _open_into(
        self, data: bytes | bytearray | memoryview, out: bytearray | memoryview
    ) -> int | Closed:
        if self._peer_closed:
            raise ChannelError("malformed", "data after the peer's final frame")
        if len(data) < _ABYTES or len(data) > MAX_PLAINTEXT + _ABYTES:
            raise ChannelError("tampered", f"data frame of {len(data)} bytes")
        tag = _ffi.new("unsigned char *")
        rc = _lib.crypto_secretstream_xchacha20poly1305_pull(
            self._pull.statebuf,
            _ffi.from_buffer("unsigned char[]", out, require_writable=True),
            _ffi.NULL,
            tag,
            _ffi.from_buffer("unsigned char[]", data),
            len(data),
            _ffi.NULL,
            0,
        )
        if rc != 0:
            raise ChannelError("tampered", "a data frame failed authentication")
        size = len(data) - _ABYTES
        if tag[0] == _TAG_FINAL:
            if size:
                raise ChannelError("malformed", "final frame carries data")
            self._peer_closed = True
            return Closed()
        if tag[0] != _TAG_MESSAGE:
            raise ChannelError("malformed", f"unexpected secretstream tag {tag[0]}")
        return size
