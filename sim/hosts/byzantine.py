"""Byzantine PBFT replicas for the simulator: tamper hooks that rewrite what a node sends.

Each attack is a :data:`sim.world.Tamper` (``(world, node, dst, msg, raw) ->
[(dst, raw, delay), ...]``) holding the attacker's own signing key — a
Byzantine DC can sign anything *as itself*, and nothing as anyone else:

- :class:`Equivocate`: a primary sends a different batch (so a different
  digest) to half of the backups, each properly signed;
- :class:`ForgeSignatures`: messages with a flipped signature bit, or claiming
  to come from another DC;
- :class:`ViewChangeAttack`: VIEW-CHANGEs with forged prepared certificates
  (prepares "signed" for other DCs, certificates for views not reached yet),
  stale or unproven checkpoints, and a flood of VIEW-CHANGEs for huge views;
- :class:`Silent`: drops every PBFT frame of given types (a silent primary);
- :class:`StampTime`: a primary stamps its batches with a time far from its
  clock (ahead or behind), each properly signed.

:class:`Combined` chains several. The swarm draws a mix from the seed.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Any

from consensus.pbft.messages import (
    Batch,
    Envelope,
    Prepare,
    PreparedCert,
    PrePrepare,
    Signed,
    ViewChange,
    batch_bytes,
    digest,
    seal,
    sign,
)
from mesh import wire
from mesh.identity import Identity
from sim.world import SimNode, World

__all__ = ["Equivocate", "ForgeSignatures", "ViewChangeAttack", "Silent", "StampTime",
           "Combined"]

Out = list[tuple[str, bytes, float]]


def _body(msg: Any) -> Any:
    if not isinstance(msg, Envelope):
        return None
    try:
        return wire.decode(msg.body)
    except wire.WireError:
        return None


class Equivocate:
    """As primary, give every other backup (by name order) a different batch for each seq."""

    def __init__(self, identity: Identity, name: str, members: Sequence[str]) -> None:
        self.identity, self.name = identity, name
        self.victims = set(sorted(m for m in members if m != name)[::2])
        self.count = 0

    def __call__(self, world: World, node: SimNode, dst: str, msg: Any, raw: bytes) -> Out:
        body = _body(msg)
        if not isinstance(body, PrePrepare) or dst not in self.victims or not msg.attachment:
            return [(dst, raw, 0.0)]
        batch = wire.decode(msg.attachment, expect=(Batch,))
        requests = batch.requests
        other = batch_bytes(requests[:-1] if requests else (), batch.time_us)
        if digest(other) == body.digest:
            return [(dst, raw, 0.0)]
        self.count += 1
        pp = PrePrepare(body.view, body.seq, digest(other))
        return [(dst, wire.encode(seal(self.identity, self.name, pp, other)), 0.0)]


class ForgeSignatures:
    """With probability ``p``, break the signature or pose as another member."""

    def __init__(self, rng: random.Random, members: Sequence[str], p: float = 0.5) -> None:
        self.rng, self.members, self.p = rng, sorted(members), p

    def __call__(self, world: World, node: SimNode, dst: str, msg: Any, raw: bytes) -> Out:
        if not isinstance(msg, Envelope) or self.rng.random() >= self.p:
            return [(dst, raw, 0.0)]
        if self.rng.random() < 0.5:
            sig = bytearray(msg.sig)
            sig[self.rng.randrange(64)] ^= 1 << self.rng.randrange(8)
            forged = Envelope(msg.sender, msg.body, bytes(sig), msg.attachment)
        else:
            forged = Envelope(self.rng.choice(self.members), msg.body, msg.sig, msg.attachment)
        return [(dst, wire.encode(forged), 0.0)]


class ViewChangeAttack:
    """Rewrite the node's VIEW-CHANGEs (``forged-certs`` or ``stale-checkpoint``) and, with
    ``flood``, add VIEW-CHANGEs for views far ahead to its frames."""

    def __init__(
        self, identity: Identity, name: str, members: Sequence[str], rng: random.Random,
        mode: str = "forged-certs", flood: bool = False,
    ) -> None:
        self.identity, self.name, self.rng = identity, name, rng
        self.members = sorted(members)
        self.mode, self.flood = mode, flood
        self.old_proof: tuple[int, tuple[Signed, ...]] | None = None
        self.count = 0

    def __call__(self, world: World, node: SimNode, dst: str, msg: Any, raw: bytes) -> Out:
        out: Out = []
        body = _body(msg)
        if isinstance(body, ViewChange):
            if self.old_proof is None:
                self.old_proof = (body.stable_seq, body.checkpoint_proof)
            forged = self._rewrite(body)
            self.count += 1
            raw = wire.encode(seal(self.identity, self.name, forged))
        out.append((dst, raw, 0.0))
        if self.flood and self.rng.random() < 0.3:
            high = self.rng.choice([2**40, 2**61, 10**6 + self.rng.randrange(1000)])
            vc = ViewChange(high, 0, (), ())
            out.append((dst, wire.encode(seal(self.identity, self.name, vc)), 0.0))
        return out

    def _rewrite(self, vc: ViewChange) -> ViewChange:
        if self.mode == "stale-checkpoint":
            if self.rng.random() < 0.5 and self.old_proof is not None:
                seq, proof = self.old_proof
                return ViewChange(vc.new_view, seq, proof, ())
            # claim a checkpoint far ahead with a proof for another seq: must be refused
            return ViewChange(vc.new_view, vc.stable_seq + 64, vc.checkpoint_proof, vc.prepared)
        certs = list(vc.prepared)
        for k in range(1, 4):
            seq = vc.stable_seq + k
            view = max(0, vc.new_view - 1)
            fake = hashlib.sha256(b"forged %d %d" % (seq, self.rng.randrange(2**32))).digest()
            pp = sign(self.identity, self.name, PrePrepare(view, seq, fake))
            prepares = tuple(
                Signed(m, wire.encode(Prepare(view, seq, fake)),
                       self.identity.sign(b"forged" + m.encode()).ljust(64, b"\0")[:64])
                for m in self.members if m != self.name
            )
            certs.append(PreparedCert(pp, prepares))
            # a certificate for a view the sender has not reached yet
            future = sign(self.identity, self.name, PrePrepare(vc.new_view + 5, seq, fake))
            certs.append(PreparedCert(future, prepares))
        return ViewChange(vc.new_view, vc.stable_seq, vc.checkpoint_proof, tuple(certs[:256]))


class Silent:
    """Drop every frame whose body is one of ``kinds`` (all PBFT frames if empty)."""

    def __init__(self, kinds: tuple[type, ...] = ()) -> None:
        self.kinds = kinds

    def __call__(self, world: World, node: SimNode, dst: str, msg: Any, raw: bytes) -> Out:
        if not self.kinds:
            return []
        return [] if isinstance(_body(msg), self.kinds) else [(dst, raw, 0.0)]


class StampTime:
    """As primary, move the time of every batch it proposes by ``shift`` seconds (a
    batch time never goes below 0): the same requests, re-signed, so the only fault
    is the time (consensus.pbft.batch_time)."""

    def __init__(self, identity: Identity, name: str, shift: float) -> None:
        self.identity, self.name, self.shift = identity, name, shift
        self.count = 0

    def __call__(self, world: World, node: SimNode, dst: str, msg: Any, raw: bytes) -> Out:
        body = _body(msg)
        if not isinstance(body, PrePrepare) or not msg.attachment:
            return [(dst, raw, 0.0)]
        try:
            batch = wire.decode(msg.attachment, expect=(Batch,))
        except wire.WireError:
            return [(dst, raw, 0.0)]
        if not batch.requests:
            return [(dst, raw, 0.0)]
        moved = max(0, batch.time_us + int(self.shift * 1_000_000))
        other = batch_bytes(batch.requests, moved)
        self.count += 1
        pp = PrePrepare(body.view, body.seq, digest(other))
        return [(dst, wire.encode(seal(self.identity, self.name, pp, other)), 0.0)]


class Combined:
    """Apply hooks in order; each sees the frames the previous one produced."""

    def __init__(self, *hooks: Any) -> None:
        self.hooks = hooks

    def __call__(self, world: World, node: SimNode, dst: str, msg: Any, raw: bytes) -> Out:
        frames: Out = [(dst, raw, 0.0)]
        for hook in self.hooks:
            nxt: Out = []
            for d, r, delay in frames:
                try:
                    m = wire.decode(r)
                except wire.WireError:
                    m = None
                nxt.extend((d2, r2, delay + x) for d2, r2, x in hook(world, node, d, m, r))
            frames = nxt
        return frames
