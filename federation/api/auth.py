"""Operator requests at the node's door: the signed envelope, its check, the replay
window and operator key files (issue 15 item 2).

Pure functions over bytes and the federation file; the API's door
(:mod:`federation.api.door`) applies them to every request. The contract:

- the client (``dwcp`` with ``--key`` / ``DWCP_OPERATOR_KEY``) signs every request:
  ``raw = sign_request(key, federation, method, path, body, now)`` and sends
  ``base64url(raw)`` in the ``DWCP-Request`` header (:data:`HEADER`), the body as is;
- the server, per request: ``verify_request(federation, raw, now, window,
  method=..., target=path, body=..., need=required_role(method, path))``, which
  returns the :class:`VerifiedRequest` or raises :class:`AuthError` saying why
  (answer 401 for ``unknown-operator``/``bad-signature``/``malformed``/
  ``wrong-federation``, 403 for ``role``, 409 for ``replayed``, 400 for the rest);
- a state-changing request is then handed to the ledger with its
  ``authorization`` (the raw SignedRequest and the body), where every replica
  checks signature, role, freshness and replay again (consensus.ledger). For
  those routes the body is the canonical CBOR of the intent
  (consensus.ledger_commands: ImportVm, MigrateVm, CancelMigration, DeleteVm,
  SetPolicy), and the nonce is the request id an operator asks about later.

What the envelope binds, next to RFC 9421, is in :mod:`consensus.authz`.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import os
from pathlib import Path

import attrs

from consensus.authz import (
    FRESHNESS_WINDOW,
    AuthError,
    Authorization,
    OperatorKey,
    Role,
    body_digest,
    check_fresh,
    check_role,
    new_nonce,
    open_request,
    sign,
)
from federation import config
from mesh import identity
from mesh.identity import Identity

__all__ = [
    "HEADER",
    "OPERATOR_KEY_PREFIX",
    "AuthError",
    "OperatorKey",
    "ReplayWindow",
    "VerifiedRequest",
    "load_operator_key",
    "write_operator_key",
    "new_nonce",
    "sign_request",
    "verify_request",
    "encode_header",
    "decode_header",
    "required_role",
]

#: The HTTP header that carries the signed request (base64url, no padding).
HEADER = "DWCP-Request"
#: An operator's key file: like a DC's (mesh.identity), with its own prefix, so that a
#: DC key is never taken for an operator's or the other way round.
OPERATOR_KEY_PREFIX = "dwcp-operator-ed25519-secret:"
#: Nonces a node remembers within the freshness window: 65,536 is 218 requests a
#: second for 300 s, beyond any operator; a full window refuses (never forgets early).
REPLAY_CAPACITY = 65_536
#: Base64 text of the largest SignedRequest (consensus.authz.MAX_SIGNED is 2 KiB).
_MAX_HEADER = 4 * 2048 // 3 + 4


@attrs.frozen
class VerifiedRequest:
    operator: str
    role: Role
    nonce: str
    created: float
    #: what a ledger command carries for this request (the raw request and its body)
    authorization: Authorization
    #: the same state-changing request came before under this request id
    resubmitted: bool = False


# --------------------------------------------------------------------------- keys


def write_operator_key(path: str | os.PathLike[str], ident: Identity, *,
                       overwrite: bool = False) -> None:
    """Mode 0600 from the start (mesh.identity.write_key_file)."""
    identity.write_key_file(path, ident, overwrite=overwrite, prefix=OPERATOR_KEY_PREFIX)


def load_operator_key(path: str | os.PathLike[str], fed: config.Federation) -> OperatorKey:
    """The key at ``path`` and the operator of ``fed`` it belongs to; raises
    :class:`mesh.identity.IdentityError` naming the file and what is wrong."""
    try:
        ident = identity.load_key_file(path, prefix=OPERATOR_KEY_PREFIX)
    except identity.IdentityError:
        try:
            first = Path(path).read_text(encoding="ascii", errors="replace")[:40]
        except OSError:
            first = ""
        if first.startswith(identity.SECRET_PREFIX):
            raise identity.IdentityError(
                f"{path}: is a DC key, not an operator key (make one with "
                "'dwcp keygen --operator --out FILE')") from None
        raise
    op = fed.operator_table().by_key(ident.public)
    if op is None:
        raise identity.IdentityError(
            f"{path}: its public key {ident.public} is not an operator in {fed.source}")
    return OperatorKey(op.name, ident)


# --------------------------------------------------------------------------- signing


def sign_request(key: OperatorKey, fed: config.Federation | str, method: str, target: str,
                 body: bytes, now: float, nonce: str | None = None) -> bytes:
    """The encoded SignedRequest for one request (``now``: seconds since the Unix epoch)."""
    federation = fed if isinstance(fed, str) else fed.id
    return sign(key.identity, federation, key.name, method, target, body, now,
                nonce or new_nonce())


def encode_header(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_header(text: str) -> bytes:
    """The raw SignedRequest of a header value; AuthError ``malformed`` if it is none."""
    if len(text) > _MAX_HEADER:
        raise AuthError("malformed", f"{HEADER}: {len(text)} characters, over {_MAX_HEADER}")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise AuthError("malformed", f"{HEADER}: not base64url: {exc}") from None


# --------------------------------------------------------------------------- checking


class ReplayWindow:
    """The (operator, nonce) pairs accepted within the freshness window; older ones are
    refused as expired anyway, so they are forgotten as the window moves on.

    A state-changing request may come again under its request id (the operator's answer
    was lost, an API timeout said "pending"): the same intent (method, target, body)
    signed again is let through, marked as a re-submission, and the ledger gives it the
    first one's outcome (consensus.ledger: exactly-once by request id). Anything else
    under a nonce already seen -- a read, or another intent -- is a replay."""

    def __init__(self, capacity: int = REPLAY_CAPACITY) -> None:
        self.capacity = capacity
        self._seen: dict[tuple[str, str], bytes] = {}
        self._order: list[tuple[float, str, str]] = []

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, key: object) -> bool:
        return key in self._seen

    def _forget(self, now: float) -> None:
        while self._order and self._order[0][0] < now - FRESHNESS_WINDOW:
            _, op, nonce = heapq.heappop(self._order)
            self._seen.pop((op, nonce), None)

    def add(self, operator: str, nonce: str, created: float, now: float,
            resubmittable: bytes = b"") -> bool:
        """Remember a request, or raise AuthError: ``replayed`` for a pair already seen,
        ``too-many`` for a full window. ``resubmittable``: the digest of a state-changing
        request's intent; the same again under its nonce returns True (a re-submission)
        instead of raising."""
        self._forget(now)
        seen = self._seen.get((operator, nonce))
        if seen is not None:
            if resubmittable and seen == resubmittable:
                return True
            raise AuthError("replayed", f"request {nonce} of operator {operator!r} was "
                                        "already received")
        if len(self._seen) >= self.capacity:
            raise AuthError("too-many", f"{len(self._seen)} requests within the last "
                                        f"{FRESHNESS_WINDOW:.0f} s; try again later")
        self._seen[(operator, nonce)] = resubmittable or b"-"
        heapq.heappush(self._order, (created, operator, nonce))
        return False


def verify_request(fed: config.Federation, raw: bytes, now: float,
                   seen_nonces: ReplayWindow, *, method: str, target: str, body: bytes,
                   need: Role = Role.VIEWER) -> VerifiedRequest:
    """Check one request against the federation's operators: who signed it, for this
    federation, this method, target and body, within FRESHNESS_WINDOW of ``now``
    (either way), never seen before, by an operator of role ``need`` or above.
    Returns the verified request or raises :class:`AuthError` saying exactly why.
    A refused request does not use up its nonce."""
    opened = open_request(fed.operator_table(), raw)
    head = opened.head
    if (head.method, head.target) != (method, target):
        raise AuthError("wrong-request", f"the request was signed for {head.method} "
                                         f"{head.target}, not {method} {target}")
    if body_digest(body) != head.body_digest:
        raise AuthError("body-mismatch", f"the body is not the one operator "
                                         f"{head.operator!r} signed")
    check_fresh(head, now)
    check_role(opened.operator, need)
    again = seen_nonces.add(head.operator, head.nonce, head.created, now,
                            opened.digest if method in ("POST", "DELETE") else b"")
    return VerifiedRequest(head.operator, opened.operator.role, head.nonce, head.created,
                           Authorization(raw, body), again)


#: Path prefixes of the VM operations (stage, import, delete, migrate, cancel): role operator.
_OPERATIONS = ("/api/imports", "/api/vms", "/api/migrations")


def required_role(method: str, path: str) -> Role | None:
    """The role a request needs (DESIGN.md, "Operators and authorization"): None for the
    open probes ``/health`` and ``/ready``; viewer to read; operator for the VM
    operations; admin for the rollout policy and for anything not listed (fail closed)."""
    if method == "GET":
        return None if path in ("/health", "/ready") else Role.VIEWER
    if method in ("POST", "DELETE") and any(
            path == p or path.startswith(p + "/") for p in _OPERATIONS):
        return Role.OPERATOR
    return Role.ADMIN
