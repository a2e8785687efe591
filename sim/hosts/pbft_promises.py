"""What each correct replica signed, kept across its crashes and restarts, and the check
that nothing it signs later contradicts it (Castro & Liskov, TOCS'02 §4.3: a replica
"must not send conflicting messages after it recovers").

:class:`SignedPromises` is fed every message a replica signs (its own envelopes only,
not the ones it relays) and returns a violation for:

- two PRE-PREPAREs, PREPAREs or COMMITs for one (view, seq) with different digests;
- two different NEW-VIEWs for one view;
- two CHECKPOINTs for one seq with different state digests (execution diverged);
- a PRE-PREPARE, PREPARE or COMMIT for a view below one it already asked to leave
  with a VIEW-CHANGE;
- a VIEW-CHANGE for view v that forgets a sequence number above its checkpoint for
  which the replica sent COMMIT(v', n, d) with v' < v: it must carry a prepared
  certificate for n of view v' or later (of view v' with digest d) — the P set.

The simulator's PBFT clusters run it on every ``Send`` (``World.on_send``); the
stateful test of :mod:`tests.test_pbft_stateful` runs it on the actions it executes.
"""

from __future__ import annotations

from consensus.pbft.messages import (
    Checkpoint,
    Commit,
    Envelope,
    NewView,
    Prepare,
    PrePrepare,
    ViewChange,
)
from mesh import wire

__all__ = ["SignedPromises"]

_VOTES = (PrePrepare, Prepare, Commit)
#: the bodies checked (the others promise nothing), by wire tag
_TAGS = frozenset({PrePrepare.wire_tag, Prepare.wire_tag, Commit.wire_tag,  # type: ignore[attr-defined]
                   NewView.wire_tag, Checkpoint.wire_tag, ViewChange.wire_tag})  # type: ignore[attr-defined]


class SignedPromises:
    """One record per signer over a whole run (see the module docstring)."""

    def __init__(self) -> None:
        #: (signer, phase, view, seq) -> digest
        self._votes: dict[tuple[str, str, int, int], bytes] = {}
        #: signer -> seq -> (view, digest) of its highest-view COMMIT
        self._committed: dict[str, dict[int, tuple[int, bytes]]] = {}
        #: signer -> the highest view it asked to move to
        self._left: dict[str, int] = {}
        self._new_views: dict[tuple[str, int], bytes] = {}
        self._checkpoints: dict[tuple[str, int], bytes] = {}
        self.checked = 0
        self._last: Envelope | None = None

    def envelope(self, node: str, msg: object) -> str | None:
        """``msg`` sent by ``node``: checked if it is a PBFT envelope ``node`` signed (the
        same envelope broadcast to every peer is checked once)."""
        if not isinstance(msg, Envelope) or msg.sender != node or msg is self._last:
            return None
        self._last = msg
        if wire.peek_tag(msg.body) not in _TAGS:
            return None
        try:
            body = wire.decode(msg.body)
        except wire.WireError:
            return f"{node} signed a body that does not decode"
        return self.signed(node, body, msg.body)

    def signed(self, signer: str, body: object, raw: bytes) -> str | None:
        """The first contradiction ``body`` (signed by ``signer``) makes, or None."""
        self.checked += 1
        if isinstance(body, _VOTES):
            return self._vote(signer, body)
        if isinstance(body, NewView):
            first = self._new_views.setdefault((signer, body.view), raw)
            return None if first == raw else f"{signer} signed two NEW-VIEWs for view {body.view}"
        if isinstance(body, Checkpoint):
            first = self._checkpoints.setdefault((signer, body.seq), body.state_digest)
            if first != body.state_digest:
                return f"{signer} signed two CHECKPOINTs for seq {body.seq} with different states"
            return None
        if isinstance(body, ViewChange):
            return self._view_change(signer, body)
        return None

    def _vote(self, signer: str, body: PrePrepare | Prepare | Commit) -> str | None:
        phase = type(body).__name__
        left = self._left.get(signer, -1)
        if body.view < left:
            return (f"{signer} signed {phase}(view {body.view}, seq {body.seq}) after its "
                    f"VIEW-CHANGE to view {left}")
        first = self._votes.setdefault((signer, phase, body.view, body.seq), body.digest)
        if first != body.digest:
            return (f"{signer} signed {phase}(view {body.view}, seq {body.seq}) for two "
                    f"digests: {first.hex()[:12]} and {body.digest.hex()[:12]}")
        if isinstance(body, Commit):
            mine = self._committed.setdefault(signer, {})
            if body.seq not in mine or body.view > mine[body.seq][0]:
                mine[body.seq] = (body.view, body.digest)
        return None

    def _view_change(self, signer: str, vc: ViewChange) -> str | None:
        self._left[signer] = max(self._left.get(signer, -1), vc.new_view)
        proven: dict[int, tuple[int, bytes]] = {}
        for cert in vc.prepared:
            try:
                pp = wire.decode(cert.preprepare.body, expect=(PrePrepare,))
            except wire.WireError:
                return f"{signer} signed a VIEW-CHANGE with a certificate that does not decode"
            assert isinstance(pp, PrePrepare)
            if pp.seq not in proven or pp.view > proven[pp.seq][0]:
                proven[pp.seq] = (pp.view, pp.digest)
        for seq, (view, dig) in sorted(self._committed.get(signer, {}).items()):
            if seq <= vc.stable_seq or view >= vc.new_view:
                continue
            has = proven.get(seq)
            if has is None or has[0] < view or (has[0] == view and has[1] != dig):
                return (f"{signer}'s VIEW-CHANGE to view {vc.new_view} (checkpoint "
                        f"{vc.stable_seq}) forgets seq {seq}, for which it sent COMMIT in "
                        f"view {view} (carries {has})")
        return None
