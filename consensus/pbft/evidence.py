"""Byzantine evidence: proofs of equivocation and per-sender fault counters.

An *equivocation proof* is two messages signed by the same DC for the same
slot — the same phase (PRE-PREPARE, PREPARE or COMMIT) with the same view and
sequence number, or a CHECKPOINT with the same sequence number — that name
different digests. A correct replica never signs both, so the pair convicts
its signer: :func:`check_proof` lets any DC verify it with nothing but the
federation's public keys.

Faults that prove nothing to a third party (a bad signature could have been
made by anyone on the path; malformed bytes are not signed) are only counted,
per peer that delivered them.

Policy for a DC with a proof (explicit, as issue 5 asks):

1. It is reported once: a ``Notify("pbft.byzantine", {...})`` carrying the
   proof, which the node logs, counts in ``dwcp_pbft_byzantine_total`` and
   lists in ``/api/status``.
2. If it is the primary of the current view, the replica asks for a view
   change at once instead of waiting for its request timer.
3. It is not excluded from quorums: PBFT already tolerates f faulty replicas,
   and removing a member is a change of the federation file, which an operator
   makes (with the proof in hand), never a replica on its own — otherwise f+1
   forged "reports" could shrink the federation.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from consensus.pbft.messages import (
    Checkpoint,
    Commit,
    Prepare,
    PrePrepare,
    SignatureError,
    Signed,
    open_signed,
)
from mesh.identity import PublicKey

__all__ = ["EquivocationProof", "EvidenceBook", "check_proof"]

_SLOTTED = (PrePrepare, Prepare, Commit, Checkpoint)


def _slot(body: object) -> tuple[str, int, int, bytes]:
    if isinstance(body, Checkpoint):
        return ("checkpoint", 0, body.seq, body.state_digest)
    assert isinstance(body, (PrePrepare, Prepare, Commit))
    return (type(body).__name__, body.view, body.seq, body.digest)


@attrs.frozen
class EquivocationProof:
    """Two signed messages by ``dc`` for one slot with different digests."""

    dc: str
    first: Signed
    second: Signed


def check_proof(proof: EquivocationProof, keys: Mapping[str, PublicKey]) -> bool:
    """True when ``proof`` convicts ``proof.dc`` (both signatures check, same slot, differ)."""
    if proof.first.sender != proof.dc or proof.second.sender != proof.dc:
        return False
    try:
        a = open_signed(proof.first, keys, _SLOTTED)
        b = open_signed(proof.second, keys, _SLOTTED)
    except SignatureError:
        return False
    sa, sb = _slot(a), _slot(b)
    return sa[:3] == sb[:3] and sa[3] != sb[3]


class EvidenceBook:
    """What one replica has seen of the others' faults."""

    def __init__(self) -> None:
        self._first: dict[tuple[str, str, int, int], tuple[bytes, Signed]] = {}
        self.proofs: dict[str, EquivocationProof] = {}
        self.invalid_signatures: dict[str, int] = {}
        self.malformed: dict[str, int] = {}

    def observe(self, signed: Signed, body: object) -> EquivocationProof | None:
        """Record a verified slotted message; return a *new* proof if it convicts its sender."""
        if not isinstance(body, _SLOTTED):
            return None
        phase, view, seq, dig = _slot(body)
        key = (signed.sender, phase, view, seq)
        seen = self._first.get(key)
        if seen is None:
            self._first[key] = (dig, signed)
            return None
        if seen[0] == dig or signed.sender in self.proofs:
            return None
        proof = EquivocationProof(signed.sender, seen[1], signed)
        self.proofs[signed.sender] = proof
        return proof

    def count_invalid_signature(self, peer: str) -> None:
        self.invalid_signatures[peer] = self.invalid_signatures.get(peer, 0) + 1

    def count_malformed(self, peer: str) -> None:
        self.malformed[peer] = self.malformed.get(peer, 0) + 1

    def forget_through(self, seq: int) -> None:
        """Drop slots at or below a stable checkpoint (the log is truncated there)."""
        self._first = {k: v for k, v in self._first.items() if k[3] > seq}

    def summary(self) -> dict[str, object]:
        return {
            "convicted": sorted(self.proofs),
            "invalid_signatures": dict(sorted(self.invalid_signatures.items())),
            "malformed": dict(sorted(self.malformed.items())),
        }
