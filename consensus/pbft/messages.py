"""PBFT wire messages and their signatures.

Every protocol message is a *body* (a registered wire message: ``Request``,
``PrePrepare``, ``Prepare``, ...) whose encoded bytes are signed by the
sender's Ed25519 identity key. What travels is an :class:`Envelope`: the
sender's DC name, the body bytes exactly as signed, the signature, and an
unsigned *attachment* whose integrity is pinned by a digest inside the signed
body (the request batch of a PRE-PREPARE, the state of a catch-up reply).

A receiver checks the signature over the body bytes it received and only then
decodes them (:func:`open_signed`); a message is never re-encoded to be
checked. Certificates (prepared certificates, checkpoint proofs, VIEW-CHANGE
sets in a NEW-VIEW) carry the original :class:`Signed` parts, so any DC can
check them on its own — PBFT needs proofs that a third party can verify
(Castro & Liskov, OSDI'99 §4.4).

Signatures cover ``SIGN_CONTEXT + body`` so a PBFT signature can never be
mistaken for a channel-handshake signature made by the same key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from consensus.snapshot_chunks import MAX_CHUNKS, MAX_SNAPSHOT
from mesh import wire
from mesh.identity import Identity, PublicKey
from mesh.wire import U64, Bool, Bytes, ListOf, Optional, Struct, Text, field

__all__ = [
    "SIGN_CONTEXT",
    "MAX_NAME",
    "MAX_COMMAND",
    "MAX_BATCH",
    "MAX_REQUEST_COMMANDS",
    "Signed",
    "Envelope",
    "Request",
    "Batch",
    "PrePrepare",
    "Prepare",
    "Commit",
    "Checkpoint",
    "PreparedCert",
    "ViewChange",
    "NewView",
    "Reply",
    "Result",
    "Status",
    "StateRequest",
    "CommittedEntry",
    "CatchUp",
    "StateReply",
    "SnapshotManifest",
    "SnapshotFetch",
    "SnapshotChunk",
    "FetchBatch",
    "BatchData",
    "BODY_TYPES",
    "SignatureError",
    "Verifier",
    "set_memo_capacity",
    "sign",
    "seal",
    "relay",
    "open_signed",
    "request_ids",
    "digest",
    "batch_bytes",
    "NULL_BATCH",
    "NULL_DIGEST",
]

SIGN_CONTEXT = b"dwcp/pbft/1\x00"
#: DC names: the federation file limits them to 64 characters.
MAX_NAME = 64
#: One ledger command (a migration begin with a 32-byte root is ~200 bytes).
MAX_COMMAND = 4096
#: Requests per batch, the ``B`` of batching. BFT-SMaRt's TOMConfiguration
#: uses maxBatchSize = 100 when system.config does not set it.
MAX_BATCH = 100
#: Commands one signed REQUEST may carry: the commands a DC submits together
#: (e.g. the ledger writes of several migrations at once) share one signature
#: and one check of it at every replica. 8 keeps a batch of full requests
#: (100 x 8 x 4 KiB) within a frame, and a client's results in one REPLY
#: (800 x 4 KiB) within a body.
MAX_REQUEST_COMMANDS = 8
#: Signatures per certificate or proof: 2f+1 for the largest federation we
#: accept (f = 21, n = 64), with room.
MAX_SIGNERS = 64
#: Prepared certificates in one VIEW-CHANGE: one per sequence number in the
#: watermark window (256, see replica.WATERMARK_WINDOW).
MAX_PREPARED = 256
_BODY = 4 * 1024 * 1024
_BIG = wire.ABSOLUTE_MAX_SIZE
_DIGEST = Bytes(32, exact=True)


class SignatureError(Exception):
    """A signed part that may not be used; ``kind`` says why."""

    def __init__(self, message: str, kind: str = "signature") -> None:
        super().__init__(message)
        #: "signature" (bad or unknown signer) or "malformed" (signed body does not decode)
        self.kind = kind


@wire.struct_type
class Signed:
    """A signed body as it was received (nested in certificates)."""

    sender: str = field(Text(MAX_NAME))
    body: bytes = field(Bytes(_BODY))
    sig: bytes = field(Bytes(64, exact=True))


@wire.message("pbft", max_size=_BIG)
class Envelope:
    """The one PBFT frame on a control link."""

    sender: str = field(Text(MAX_NAME))
    body: bytes = field(Bytes(_BODY))
    sig: bytes = field(Bytes(64, exact=True))
    attachment: bytes = field(Bytes(_BIG), default=b"")

    @property
    def signed(self) -> Signed:
        return Signed(self.sender, self.body, self.sig)


# --------------------------------------------------------------------------- bodies


@wire.message("pbft.request", max_size=MAX_REQUEST_COMMANDS * (MAX_COMMAND + 8) + 512)
class Request:
    """Ledger commands submitted and signed by the DC ``client``: command ``i`` has the
    request id ``request_id + i``, and each is executed exactly once under its own id.
    A request with no command, or ids past 2^64, is malformed (:func:`request_ids`)."""

    client: str = field(Text(MAX_NAME))
    request_id: int = field(U64())
    commands: tuple[bytes, ...] = field(ListOf(Bytes(MAX_COMMAND), MAX_REQUEST_COMMANDS))


def request_ids(req: Request) -> range:
    """The request ids of ``req``'s commands; raises :class:`SignatureError` ("malformed")
    for a request without commands or whose ids would pass 2^64."""
    end = req.request_id + len(req.commands)
    if not req.commands or end > 2**64:
        raise SignatureError(f"request {req.request_id} of {req.client!r} carries "
                             f"{len(req.commands)} commands", "malformed")
    return range(req.request_id, end)


@wire.message("pbft.batch", max_size=_BIG)
class Batch:
    """The requests ordered at one sequence number; an empty batch is the null request.

    ``time_us``: the ledger time the primary stamped on the batch, in microseconds of
    wall-clock time since the epoch (0 for the null request). The digest in the
    PRE-PREPARE covers it, so every replica executes the batch at the same time
    (:mod:`consensus.pbft.batch_time`). An integer, not a float: a frame holding a float
    costs the decoder a canonical re-encode, and this one is decoded on every proposal."""

    requests: tuple[Signed, ...] = field(ListOf(Struct(Signed), MAX_BATCH))
    time_us: int = field(U64(), default=0)


@wire.message("pbft.pre-prepare")
class PrePrepare:
    view: int = field(U64())
    seq: int = field(U64())
    digest: bytes = field(_DIGEST)


@wire.message("pbft.prepare")
class Prepare:
    view: int = field(U64())
    seq: int = field(U64())
    digest: bytes = field(_DIGEST)


@wire.message("pbft.commit")
class Commit:
    view: int = field(U64())
    seq: int = field(U64())
    digest: bytes = field(_DIGEST)


@wire.message("pbft.checkpoint")
class Checkpoint:
    seq: int = field(U64())
    state_digest: bytes = field(_DIGEST)


@wire.struct_type
class PreparedCert:
    """A PRE-PREPARE signed by the view's primary and 2f matching PREPAREs."""

    preprepare: Signed = field(Struct(Signed))
    prepares: tuple[Signed, ...] = field(ListOf(Struct(Signed), MAX_SIGNERS))


@wire.message("pbft.view-change", max_size=_BODY)
class ViewChange:
    new_view: int = field(U64())
    stable_seq: int = field(U64())
    checkpoint_proof: tuple[Signed, ...] = field(ListOf(Struct(Signed), MAX_SIGNERS))
    prepared: tuple[PreparedCert, ...] = field(ListOf(Struct(PreparedCert), MAX_PREPARED))


@wire.message("pbft.new-view", max_size=_BODY)
class NewView:
    view: int = field(U64())
    view_changes: tuple[Signed, ...] = field(ListOf(Struct(Signed), MAX_SIGNERS))
    preprepares: tuple[Signed, ...] = field(ListOf(Struct(Signed), 2 * MAX_PREPARED))


@wire.struct_type
class Result:
    request_id: int = field(U64())
    result: bytes = field(Bytes(MAX_COMMAND))


@wire.message("pbft.reply", max_size=_BODY)
class Reply:
    """The results of ``client``'s requests executed in one batch: one signature per
    batch and client, not per request."""

    view: int = field(U64())
    client: str = field(Text(MAX_NAME))
    results: tuple[Result, ...] = field(ListOf(Struct(Result), MAX_BATCH * MAX_REQUEST_COMMANDS))


@wire.message("pbft.status")
class Status:
    """Periodic progress report; peers answer with what the sender is missing."""

    view: int = field(U64())
    active: bool = field(Bool())
    last_executed: int = field(U64())
    stable_seq: int = field(U64())


@wire.message("pbft.state-request")
class StateRequest:
    last_executed: int = field(U64())


@wire.struct_type
class CommittedEntry:
    """Sequence number ``seq`` committed: 2f+1 matching signed COMMITs and the batch."""

    seq: int = field(U64())
    commits: tuple[Signed, ...] = field(ListOf(Struct(Signed), MAX_SIGNERS))
    batch: bytes = field(Bytes(_BIG))


@wire.message("pbft.catch-up", max_size=_BIG)
class CatchUp:
    """The attachment of a STATE-REPLY: an optional snapshot, then committed entries."""

    snapshot: bytes | None = field(Optional(Bytes(_BIG)))
    entries: tuple[CommittedEntry, ...] = field(ListOf(Struct(CommittedEntry), 2 * MAX_PREPARED))


@wire.message("pbft.state-reply", max_size=_BODY)
class StateReply:
    """Pins a :class:`CatchUp` attachment by digest; ``checkpoint_proof`` proves its snapshot."""

    checkpoint_seq: int = field(U64())
    checkpoint_proof: tuple[Signed, ...] = field(ListOf(Struct(Signed), MAX_SIGNERS))
    attachment_digest: bytes = field(_DIGEST)


@wire.message("pbft.snapshot-manifest", max_size=_BODY)
class SnapshotManifest:
    """The answer to a STATE-REQUEST from below a checkpoint whose snapshot is larger
    than one chunk (:mod:`consensus.snapshot_chunks`): its size and its chunks' hashes,
    which hash to the state digest ``checkpoint_proof`` proves. The requester then
    fetches the chunks one by one (SNAPSHOT-FETCH, SNAPSHOT-CHUNK)."""

    checkpoint_seq: int = field(U64())
    checkpoint_proof: tuple[Signed, ...] = field(ListOf(Struct(Signed), MAX_SIGNERS))
    size: int = field(U64(MAX_SNAPSHOT))
    chunk_hashes: tuple[bytes, ...] = field(ListOf(_DIGEST, MAX_CHUNKS))


@wire.message("pbft.snapshot-fetch")
class SnapshotFetch:
    checkpoint_seq: int = field(U64())
    index: int = field(U64(MAX_CHUNKS - 1))


@wire.message("pbft.snapshot-chunk")
class SnapshotChunk:
    """Carries chunk ``index`` of the snapshot of checkpoint ``checkpoint_seq`` as
    attachment (checked against the manifest's hash, not against this body)."""

    checkpoint_seq: int = field(U64())
    index: int = field(U64(MAX_CHUNKS - 1))


@wire.message("pbft.fetch-batch")
class FetchBatch:
    digest: bytes = field(_DIGEST)


@wire.message("pbft.batch-data")
class BatchData:
    """Carries the batch with ``digest`` as attachment."""

    digest: bytes = field(_DIGEST)


BODY_TYPES: tuple[type, ...] = (
    Request,
    PrePrepare,
    Prepare,
    Commit,
    Checkpoint,
    ViewChange,
    NewView,
    Reply,
    Status,
    StateRequest,
    StateReply,
    FetchBatch,
    BatchData,
    SnapshotManifest,
    SnapshotFetch,
    SnapshotChunk,
)


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def batch_bytes(requests: tuple[Signed, ...], time_us: int = 0) -> bytes:
    return wire.encode(Batch(requests, time_us))


NULL_BATCH = batch_bytes(())
NULL_DIGEST = digest(NULL_BATCH)


def sign(identity: Identity, sender: str, body: object) -> Signed:
    data = wire.encode(body)
    return Signed(sender, data, identity.sign(SIGN_CONTEXT + data))


def seal(identity: Identity, sender: str, body: object, attachment: bytes = b"") -> Envelope:
    s = sign(identity, sender, body)
    return Envelope(s.sender, s.body, s.sig, attachment)


def relay(env: Envelope) -> bytes:
    """A signed message without its attachment, as bytes to attach to another one (a
    PREPARE carries the PRE-PREPARE it answers)."""
    return wire.encode(Envelope(env.sender, env.body, env.sig))


#: Signatures known to verify, keyed by (public key, signature, body): Ed25519
#: verification is a pure function of these, so remembering a success changes
#: no outcome; it saves the repeated check when one message reaches several
#: replicas hosted in one process (the simulator) or returns inside a certificate.
_GOOD: dict[tuple[bytes, bytes, bytes], None] = {}
#: About the signed messages of a few watermark windows at n = 16 (the simulator hosts
#: every replica in one process); a node sets its own (:func:`set_memo_capacity`).
_GOOD_CAPACITY = 65536
#: Only small bodies are remembered (requests, votes, checkpoints), so a faulty
#: member signing many large VIEW-CHANGEs cannot make the memo hold gigabytes.
_MEMO_MAX_BODY = 8192


def set_memo_capacity(capacity: int) -> None:
    """Remember at most ``capacity`` verified signatures in this process (the oldest
    go first). A node hosts one replica, whose :class:`Verifier` already remembers a
    watermark window's messages for the re-checks inside certificates. At 4 replicas a
    ledger command adds ~9.5 entries of ~320 bytes (measured in one process hosting the
    four), so at ``dwcp bench soak``'s ~3 commands a second the simulator's 65,536 fill
    in about 40 minutes and hold ~20 MiB, for no outcome (a memo changes none)."""
    global _GOOD_CAPACITY
    if capacity < 0:
        raise ValueError(f"signature memo capacity {capacity}: must be >= 0")
    _GOOD_CAPACITY = capacity
    while len(_GOOD) > capacity:
        del _GOOD[next(iter(_GOOD))]


def open_signed(
    signed: Signed,
    keys: Mapping[str, PublicKey],
    expect: tuple[type, ...] = BODY_TYPES,
    decoded: object = None,
    previous: Mapping[str, Sequence[PublicKey]] | None = None,
) -> object:
    """Check ``signed`` against its sender's key (or one of its ``previous`` keys, from
    before a key rotation: the durable history is signed with them), then decode the body
    bytes it carries (``decoded``: the caller already decoded exactly ``signed.body``)."""
    key = keys.get(signed.sender)
    if key is None:
        raise SignatureError(f"signer {signed.sender!r} is not a member of the federation")
    memo = (key.raw, signed.sig, signed.body)
    if memo not in _GOOD:
        if not key.verify(SIGN_CONTEXT + signed.body, signed.sig) and not any(
                old.verify(SIGN_CONTEXT + signed.body, signed.sig)
                for old in (previous or {}).get(signed.sender, ())):
            raise SignatureError(f"bad signature from {signed.sender!r}")
        if len(signed.body) <= _MEMO_MAX_BODY and _GOOD_CAPACITY:
            if len(_GOOD) >= _GOOD_CAPACITY:
                del _GOOD[next(iter(_GOOD))]
            _GOOD[memo] = None
    if decoded is not None and isinstance(decoded, expect):
        return decoded
    try:
        return wire.decode(signed.body, expect=expect)
    except wire.WireError as exc:
        raise SignatureError(
            f"body signed by {signed.sender!r} is malformed: {exc}", "malformed"
        ) from exc


class Verifier:
    """:func:`open_signed` with a memory of signatures already checked.

    A PREPARE is checked when it arrives and again inside every VIEW-CHANGE and
    NEW-VIEW that carries it; the cache makes the second check a dictionary
    lookup. The key is the whole signed part, so a hit means the same sender,
    body and signature were verified before.
    """

    #: Entries kept: a little more than the messages of one watermark window at
    #: n = 16 (256 seqnos x 2 phases x 16 senders = 8192).
    CAPACITY = 8192

    def __init__(self, keys: Mapping[str, PublicKey],
                 previous: Mapping[str, Sequence[PublicKey]] | None = None) -> None:
        self.keys = dict(keys)
        #: members' keys before a rotation (federation file ``previous_keys``)
        self.previous = {k: tuple(v) for k, v in (previous or {}).items()}
        self._seen: dict[tuple[str, bytes, bytes], object] = {}

    def open(
        self, signed: Signed, expect: tuple[type, ...] = BODY_TYPES, decoded: object = None
    ) -> object:
        """``decoded``: the caller already decoded exactly ``signed.body`` (to see
        whether the message is of any use before paying for its signature check)."""
        key = (signed.sender, signed.sig, signed.body)
        body = self._seen.get(key)
        if body is None:
            body = open_signed(signed, self.keys, BODY_TYPES, decoded, self.previous)
            self._keep(key, body)
        if not isinstance(body, expect):
            raise SignatureError(
                f"expected {'/'.join(t.__name__ for t in expect)} from {signed.sender!r}, "
                f"got {type(body).__name__}",
                "malformed",
            )
        return body

    def remember(self, signed: Signed, body: object) -> None:
        """``signed`` was just made by this replica's own key over ``body``: when it
        comes back (our REQUEST through :meth:`open`, our votes inside certificates)
        it needs no signature check."""
        self._keep((signed.sender, signed.sig, signed.body), body)

    def _keep(self, key: tuple[str, bytes, bytes], body: object) -> None:
        if len(key[2]) <= _MEMO_MAX_BODY:
            if len(self._seen) >= self.CAPACITY:
                del self._seen[next(iter(self._seen))]
            self._seen[key] = body
