"""Operators, their roles, and the signed request an operator makes (issue 15 items 2-3).

People are identities too (DESIGN.md, "Operators and authorization"): the
federation file lists operators with an Ed25519 public key and a role, and
every state-changing request an operator makes is signed by that key. The
signed request travels with the ledger command it asks for, so every replica
checks it again while executing (:mod:`consensus.ledger`); the node's API checks
the same envelope at the door (:mod:`federation.api.auth`).

The envelope binds what an HTTP Message Signature (RFC 9421) binds::

    RFC 9421 (§2.2, §2.3)       here (RequestHead)
    @method                     method
    @path / @target-uri         target (the API path, or any name of the command)
    content-digest (RFC 9530)   body_digest: SHA-256 of the body
    created                     created: seconds since the Unix epoch
    nonce                       nonce: the request id (also the idempotency key)
    keyid                       operator: the operator's name in the federation file
    alg="ed25519"               always Ed25519 (no algorithm negotiation to downgrade)

plus the federation id, so that a request signed for one federation is worth
nothing in another. A :class:`SignedRequest` carries the canonical CBOR bytes
of the :class:`RequestHead` and the signature over ``SIGN_CONTEXT`` + those
bytes; the signature is checked over the bytes received, never over a
re-encoding (DESIGN.md, "Wire").

What the body of a ledger-bound request is (an :mod:`consensus.ledger_commands`
intent such as ``MigrateVm``) is the ledger's business; this module checks
who signed, for which federation, over which body, when, and with which role.
Every check raises :class:`AuthError` whose ``reason`` names the failed check
and whose message says exactly what was wrong.
"""

from __future__ import annotations

import enum
import hashlib
import math
import re
import secrets
from collections.abc import Iterable

import attrs

from consensus import request_frames
from mesh import wire
from mesh.identity import Identity, PublicKey
from mesh.wire import Bytes, Float, Text, field

__all__ = [
    "AuthError",
    "Role",
    "parse_role",
    "Operator",
    "OperatorKey",
    "OperatorTable",
    "RequestHead",
    "SignedRequest",
    "Authorization",
    "Opened",
    "SIGN_CONTEXT",
    "FRESHNESS_WINDOW",
    "NONCE_RE",
    "new_nonce",
    "sign",
    "authorize",
    "open_request",
    "open_authorization",
    "check_fresh",
    "check_role",
    "body_digest",
    "request_digest",
]

#: Domain separation: an operator signature can never be mistaken for a PBFT or a
#: channel signature made with the same key (the DC keys sign ``dwcp/pbft/1``).
SIGN_CONTEXT = b"dwcp/operator-request/1\x00"
#: How far a request's ``created`` may lie from the time it is checked at, either way:
#: MIT Kerberos' default clock skew (``clockskew`` = 300 s, krb5.conf), the usual
#: bound for a signed timestamp between machines that run NTP.
FRESHNESS_WINDOW = 300.0
#: A nonce is 8-64 characters of a URL- and log-safe alphabet; ``secrets.token_hex(16)``
#: (128 random bits, what federation.api.auth makes) fits.
NONCE_RE = re.compile(r"^[A-Za-z0-9._-]{8,64}$")
#: Largest encoded SignedRequest: a head with a 1 KiB target is ~1.3 KiB.
MAX_SIGNED = 2048
#: Largest body a ledger-bound request carries (a whole ledger command is 4 KiB,
#: consensus.pbft.messages.MAX_COMMAND).
MAX_BODY = 4096
_NAME = Text(64)


class AuthError(Exception):
    """A request that may not be acted on. ``reason`` is one of: ``malformed``,
    ``unknown-operator``, ``bad-signature``, ``wrong-federation``, ``body-mismatch``,
    ``wrong-request`` (signed for another method or target), ``expired``,
    ``from-the-future``, ``replayed``, ``role``, ``too-many``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Role(enum.IntEnum):
    """What an operator may do; each role may do everything the lower ones may."""

    VIEWER = 1  # read status, metrics, the dashboard
    OPERATOR = 2  # import, migrate, cancel, delete VMs
    ADMIN = 3  # federation-wide: the rollout policy and its kill switch

    @property
    def label(self) -> str:
        return self.name.lower()


def parse_role(text: str) -> Role:
    """``viewer``, ``operator`` or ``admin``; raises ValueError naming the choices."""
    for role in Role:
        if role.label == text:
            return role
    raise ValueError(f"expected one of {', '.join(r.label for r in Role)}, got {text!r}")


@attrs.frozen
class Operator:
    name: str
    public_key: PublicKey
    role: Role


@attrs.frozen
class OperatorKey:
    """An operator's signing key and the name the federation file gives it."""

    name: str
    identity: Identity


@attrs.frozen
class OperatorTable:
    """The operators of one federation, as every replica knows them (the federation file)."""

    federation: str
    operators: tuple[Operator, ...] = ()

    @classmethod
    def of(cls, federation: str, operators: Iterable[Operator]) -> OperatorTable:
        ops = tuple(sorted(operators, key=lambda o: o.name))
        names = [o.name for o in ops]
        if len(set(names)) != len(names):
            raise ValueError(f"operator names repeat: {names}")
        return cls(federation, ops)

    def get(self, name: str) -> Operator | None:
        for op in self.operators:
            if op.name == name:
                return op
        return None

    def by_key(self, key: PublicKey) -> Operator | None:
        for op in self.operators:
            if op.public_key == key:
                return op
        return None


# --------------------------------------------------------------------------- wire


@wire.message("operator.request-head", max_size=MAX_SIGNED)
class RequestHead:
    """What the operator signs (see the module docstring for each field's RFC 9421 peer)."""

    federation: str = field(_NAME)
    operator: str = field(_NAME)
    method: str = field(Text(16))
    target: str = field(Text(1024))
    body_digest: bytes = field(Bytes(32, exact=True))
    created: float = field(Float())
    nonce: str = field(Text(64))


@wire.message("operator.signed-request", max_size=MAX_SIGNED)
class SignedRequest:
    """``head`` is the canonical frame of a :class:`RequestHead`; ``signature`` is the
    operator's Ed25519 signature of ``SIGN_CONTEXT + head``."""

    operator: str = field(_NAME)
    head: bytes = field(Bytes(MAX_SIGNED - 160))
    signature: bytes = field(Bytes(64, exact=True))


@wire.struct_type
class Authorization:
    """An operator's signed request as a ledger command carries it: the
    :class:`SignedRequest` frame exactly as the operator made it, and the body whose
    digest it signed (an intent of :mod:`consensus.ledger_commands`)."""

    request: bytes = field(Bytes(MAX_SIGNED))
    body: bytes = field(Bytes(MAX_BODY))


@attrs.frozen
class Opened:
    """A request whose signature, federation and body digest checked out."""

    operator: Operator
    head: RequestHead
    #: SHA-256 of the head without its ``created``: tells a re-submission of the same
    #: request (the same intent under the same request id, perhaps signed again later
    #: because the first answer was lost) from another request that reuses its nonce, as
    #: an idempotency key does (Stripe: the same key with other parameters is an error)
    digest: bytes


# --------------------------------------------------------------------------- signing


def new_nonce() -> str:
    """A fresh request id: 128 random bits (RFC 9421 §7.2.2: a nonce the verifier has
    not seen; at 2^-64 collision odds after 2^32 requests)."""
    return secrets.token_hex(16)


def body_digest(body: bytes) -> bytes:
    return hashlib.sha256(body).digest()


def sign(key: Identity, federation: str, operator: str, method: str, target: str,
         body: bytes, created: float, nonce: str) -> bytes:
    """The encoded :class:`SignedRequest` of one request (raises ``wire.WireError`` for
    a field over its limit, ValueError for a nonce outside ``NONCE_RE``)."""
    if not NONCE_RE.match(nonce):
        raise ValueError(f"nonce: {nonce!r} is not 8-64 of A-Z a-z 0-9 . _ -")
    head = wire.encode(RequestHead(federation, operator, method, target, body_digest(body),
                                   float(created), nonce))
    return wire.encode(SignedRequest(operator, head, key.sign(SIGN_CONTEXT + head)))


def authorize(key: Identity, federation: str, operator: str, intent: object, created: float,
              nonce: str, *, method: str = "POST", target: str = "") -> Authorization:
    """An operator's signed request for ``intent`` (a ledger intent message) as a ledger
    command carries it. ``target`` defaults to the intent's wire tag; the API signs its
    own path (federation.api.auth)."""
    body = wire.encode(intent)
    target = target or wire.tag_of(intent)
    return Authorization(sign(key, federation, operator, method, target, body, created, nonce),
                         body)


# --------------------------------------------------------------------------- checking


def open_request(table: OperatorTable, raw: bytes) -> Opened:
    """Check who signed ``raw`` (an encoded SignedRequest) and for which federation.
    Freshness, replay and role are the caller's checks (they need its clock and memory)."""
    # Both frames are read by hand where they are canonical and in bounds (the common
    # case, at a third of the cost); anything else goes to wire.decode, which takes or
    # refuses it exactly as before (consensus.request_frames).
    fields = request_frames.read_signed(raw)
    if fields is not None:
        operator, head_bytes, signature = fields
    else:
        try:
            signed = wire.decode(raw, expect=(SignedRequest,))
        except wire.WireError as exc:
            raise AuthError("malformed", f"not a signed operator request: {exc}") from None
        operator, head_bytes, signature = signed.operator, signed.head, signed.signature
    op = table.get(operator)
    if op is None:
        raise AuthError("unknown-operator",
                        f"operator {operator!r} is not in federation {table.federation!r}")
    if not _signature_ok(op.public_key, head_bytes, signature):
        raise AuthError("bad-signature",
                        f"the signature is not operator {op.name!r}'s over this request")
    head_fields = request_frames.read_head(head_bytes)
    if head_fields is not None:
        head = RequestHead(*head_fields)
    else:
        try:
            head = wire.decode(head_bytes, expect=(RequestHead,))
        except wire.WireError as exc:
            raise AuthError("malformed", f"operator {op.name!r} signed an unreadable head: "
                                         f"{exc}") from None
    if head.operator != op.name:
        raise AuthError("malformed", f"the head names operator {head.operator!r}, "
                                     f"the signature is {op.name!r}'s")
    if head.federation != table.federation:
        raise AuthError("wrong-federation", f"the request is for federation "
                                            f"{head.federation!r}, this is {table.federation!r}")
    if not NONCE_RE.match(head.nonce):
        raise AuthError("malformed", f"nonce {head.nonce!r} is not 8-64 of A-Z a-z 0-9 . _ -")
    if not math.isfinite(head.created) or head.created < 0:
        raise AuthError("malformed", f"created {head.created!r} is not a time")
    # the head's bytes are its canonical frame (either reader takes only that), so the
    # undated digest is made from them without encoding the head again
    digest = request_frames.undated_digest(head_bytes, head.created, head.nonce)
    return Opened(op, head, digest if digest is not None else request_digest(head))


#: Operator signatures known to verify, keyed by (the operator's public key, the head
#: bytes, the signature): Ed25519 verification is a pure function of these three, so
#: remembering a success changes no outcome (consensus.pbft.messages keeps the same
#: memo of PBFT signatures). It saves the second check of one request in one process:
#: the API door checks it, then the DC's own replica executes it (federation.api.door),
#: and in the simulator every replica of the federation executes it. A signature is
#: verified before it is remembered; a failure is never remembered.
_VERIFIED: dict[tuple[bytes, bytes, bytes], None] = {}
#: Requests from the door to execution take seconds; 4,096 is over a second of the
#: batched benchmark's commands, at most ~9 MB of heads (MAX_SIGNED each).
_VERIFIED_CAPACITY = 4096


def _signature_ok(key: PublicKey, head: bytes, signature: bytes) -> bool:
    """``signature`` is ``key``'s over SIGN_CONTEXT + ``head``: verified here, unless
    exactly these three verified before in this process."""
    memo = (key.raw, head, signature)
    if memo in _VERIFIED:
        return True
    if not key.verify(SIGN_CONTEXT + head, signature):
        return False
    if len(_VERIFIED) >= _VERIFIED_CAPACITY:
        del _VERIFIED[next(iter(_VERIFIED))]  # the oldest: dicts keep insertion order
    _VERIFIED[memo] = None
    return True


def request_digest(head: RequestHead) -> bytes:
    """What makes two signed requests the same request: everything signed but the time
    of signing (see :attr:`Opened.digest`)."""
    unsigned_time = RequestHead(head.federation, head.operator, head.method, head.target,
                                head.body_digest, 0.0, head.nonce)
    return hashlib.sha256(wire.encode(unsigned_time)).digest()


def open_authorization(table: OperatorTable, auth: Authorization) -> tuple[Opened, object]:
    """Open an :class:`Authorization` and decode its body: (the opened request, the body
    message). Raises :class:`AuthError` (``body-mismatch`` when the body is not the one
    signed, ``malformed`` when it is no message)."""
    opened = open_request(table, auth.request)
    if body_digest(auth.body) != opened.head.body_digest:
        raise AuthError("body-mismatch",
                        f"the body is not the one operator {opened.operator.name!r} signed")
    try:
        body = wire.decode(auth.body)
    except wire.WireError as exc:
        raise AuthError("malformed", f"the signed body is not a request: {exc}") from None
    return opened, body


def check_fresh(head: RequestHead, now: float, *, future: bool = True) -> None:
    """``created`` lies within FRESHNESS_WINDOW of ``now``. ``future=False`` skips the
    upper bound, for a clock that is itself made of request timestamps (the ledger's,
    until a trusted time feeds it: see consensus.ledger)."""
    age = now - head.created
    if age > FRESHNESS_WINDOW:
        raise AuthError("expired", f"request {head.nonce} was created {age:.0f} s before "
                                   f"{now:.3f}; requests older than {FRESHNESS_WINDOW:.0f} s "
                                   "are refused")
    if future and -age > FRESHNESS_WINDOW:
        raise AuthError("from-the-future", f"request {head.nonce} was created {-age:.0f} s "
                                           f"after {now:.3f} (clock skew over "
                                           f"{FRESHNESS_WINDOW:.0f} s)")


def check_role(op: Operator, need: Role) -> None:
    if op.role < need:
        raise AuthError("role", f"operator {op.name!r} has role {op.role.label}; this needs "
                                f"{need.label}")
