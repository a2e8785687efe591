"""Who the replicas are, and the certificate checks any DC can run on its own.

Each check takes signed parts exactly as received, verifies every signature
over the body bytes it carries, and raises :class:`CertificateError` naming
what is wrong. Nothing here trusts the sender of the message that carried a
certificate: that is what lets a backup validate a NEW-VIEW piece by piece
(Castro & Liskov, TOCS'02 §4.4).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import attrs

from consensus.pbft.messages import (
    NULL_DIGEST,
    Checkpoint,
    Commit,
    Prepare,
    PreparedCert,
    PrePrepare,
    SignatureError,
    Signed,
    Verifier,
    ViewChange,
)
from mesh.identity import PublicKey

__all__ = [
    "CertificateError",
    "Quorum",
    "ValidViewChange",
    "check_checkpoint_proof",
    "check_prepared",
    "check_commit_cert",
    "check_view_change",
    "new_view_plan",
]


class CertificateError(Exception):
    """A certificate or proof that does not prove what it claims."""


@attrs.frozen
class Quorum:
    """n = 3f+1 replicas, ordered by name; the primary of view v is ``members[v mod n]``."""

    members: tuple[str, ...]
    keys: Mapping[str, PublicKey] = attrs.field(eq=False, repr=False)

    @classmethod
    def of(cls, keys: Mapping[str, PublicKey]) -> Quorum:
        members = tuple(sorted(keys))
        if len(members) < 4 or (len(members) - 1) % 3:
            raise ValueError(f"PBFT needs n = 3f+1 >= 4 replicas, got {len(members)}")
        return cls(members, dict(keys))

    @property
    def n(self) -> int:
        return len(self.members)

    @property
    def f(self) -> int:
        return (self.n - 1) // 3

    def primary(self, view: int) -> str:
        return self.members[view % self.n]


def _distinct(signers: Iterable[str], need: int, what: str) -> None:
    seen: list[str] = []
    for s in signers:
        if s in seen:
            raise CertificateError(f"{what}: {s!r} signed twice")
        seen.append(s)
    if len(seen) < need:
        raise CertificateError(f"{what}: {len(seen)} signers, need {need}")


def _open(verifier: Verifier, signed: Signed, cls: type, what: str) -> object:
    try:
        return verifier.open(signed, (cls,))
    except SignatureError as exc:
        raise CertificateError(f"{what}: {exc}") from exc


def check_checkpoint_proof(
    verifier: Verifier, q: Quorum, seq: int, proof: tuple[Signed, ...], genesis: bytes
) -> bytes:
    """The state digest that 2f+1 distinct replicas signed for ``seq`` (the genesis
    digest for seq 0, which needs no proof)."""
    if seq == 0 and not proof:
        return genesis
    digests = []
    for s in proof:
        body = _open(verifier, s, Checkpoint, "checkpoint proof")
        assert isinstance(body, Checkpoint)
        if body.seq != seq:
            raise CertificateError(
                f"checkpoint proof: {s.sender!r} signed seq {body.seq}, not {seq}"
            )
        digests.append(body.state_digest)
    _distinct((s.sender for s in proof), 2 * q.f + 1, "checkpoint proof")
    if len(set(digests)) != 1:
        raise CertificateError(f"checkpoint proof for {seq}: signers disagree on the digest")
    return digests[0]


def check_prepared(
    verifier: Verifier, q: Quorum, cert: PreparedCert, low: int, high: int
) -> PrePrepare:
    """A PRE-PREPARE by its view's primary and 2f PREPAREs by other replicas, all matching."""
    pp = _open(verifier, cert.preprepare, PrePrepare, "prepared certificate")
    assert isinstance(pp, PrePrepare)
    if cert.preprepare.sender != q.primary(pp.view):
        raise CertificateError(f"pre-prepare for view {pp.view} not signed by its primary")
    if not low < pp.seq <= high:
        raise CertificateError(f"prepared seq {pp.seq} outside the window ({low}, {high}]")
    for s in cert.prepares:
        p = _open(verifier, s, Prepare, "prepared certificate")
        assert isinstance(p, Prepare)
        if (p.view, p.seq, p.digest) != (pp.view, pp.seq, pp.digest):
            raise CertificateError(f"prepare by {s.sender!r} does not match the pre-prepare")
        if s.sender == cert.preprepare.sender:
            raise CertificateError("the primary's own prepare does not count")
    _distinct((s.sender for s in cert.prepares), 2 * q.f, "prepared certificate")
    return pp


def check_commit_cert(
    verifier: Verifier, q: Quorum, seq: int, commits: tuple[Signed, ...]
) -> bytes:
    """The digest that 2f+1 distinct replicas committed at ``seq`` (in one view)."""
    keys = set()
    for s in commits:
        c = _open(verifier, s, Commit, "commit certificate")
        assert isinstance(c, Commit)
        if c.seq != seq:
            raise CertificateError(f"commit by {s.sender!r} is for seq {c.seq}, not {seq}")
        keys.add((c.view, c.digest))
    if len(keys) != 1:
        raise CertificateError(f"commit certificate for {seq}: commits disagree")
    _distinct((s.sender for s in commits), 2 * q.f + 1, "commit certificate")
    return next(iter(keys))[1]


@attrs.frozen
class ValidViewChange:
    """A VIEW-CHANGE whose checkpoint proof checked, with only its good certificates."""

    sender: str
    signed: Signed
    body: ViewChange
    #: seq -> (view, digest) of each certificate that checked on its own
    prepared: Mapping[int, tuple[int, bytes]]
    dropped: int


def check_view_change(
    verifier: Verifier, q: Quorum, signed: Signed, window: int, genesis: bytes
) -> ValidViewChange:
    """Validate a VIEW-CHANGE. A bad checkpoint proof rejects it; a bad prepared
    certificate is dropped on its own, so it can neither hide nor spoil good ones."""
    body = _open(verifier, signed, ViewChange, "view-change")
    assert isinstance(body, ViewChange)
    check_checkpoint_proof(verifier, q, body.stable_seq, body.checkpoint_proof, genesis)
    prepared: dict[int, tuple[int, bytes]] = {}
    dropped = 0
    for cert in body.prepared:
        try:
            pp = check_prepared(verifier, q, cert, body.stable_seq, body.stable_seq + window)
        except CertificateError:
            dropped += 1
            continue
        if pp.view >= body.new_view:
            dropped += 1  # prepared in a view the sender has not reached: forged
            continue
        best = prepared.get(pp.seq)
        if best is None or pp.view > best[0]:
            prepared[pp.seq] = (pp.view, pp.digest)
    return ValidViewChange(signed.sender, signed, body, prepared, dropped)


def new_view_plan(vcs: Iterable[ValidViewChange]) -> tuple[int, list[tuple[int, bytes]]]:
    """PBFT's choice for a NEW-VIEW (OSDI'99 §4.4): the highest stable checkpoint
    ``min_s`` among the view changes, then for every seq above it up to the highest
    prepared one, the digest prepared in the highest view, or a null request."""
    vcs = list(vcs)
    min_s = max(v.body.stable_seq for v in vcs)
    best: dict[int, tuple[int, bytes]] = {}
    for v in vcs:
        for seq, (view, dig) in v.prepared.items():
            if seq > min_s and (seq not in best or view > best[seq][0]):
                best[seq] = (view, dig)
    max_s = max(best, default=min_s)
    plan = [
        (seq, best[seq][1] if seq in best else NULL_DIGEST) for seq in range(min_s + 1, max_s + 1)
    ]
    return min_s, plan
