"""PBFT view change (Castro & Liskov, OSDI'99 §4.4, §4.5.2), as a part of the replica.

- A backup whose request timer expires in view v stops accepting messages of
  v and multicasts VIEW-CHANGE(v+1, n, C, P): its stable checkpoint n with the
  2f+1 signed CHECKPOINTs that prove it (C), and for every sequence number
  above n that prepared here, the prepared certificate of the highest view (P).
- *The f+1 rule*: a replica that holds valid VIEW-CHANGEs for views above its
  own from f+1 others joins the view change — for the highest view that f+1 of
  them reached, so f faulty replicas announcing huge views cannot drag it
  along (at least one of the f+1 is correct).
- The primary of v+1, with 2f+1 valid VIEW-CHANGEs for v+1, multicasts
  NEW-VIEW(v+1, V, O): V is those view changes; O holds one PRE-PREPARE for
  each sequence number from the highest checkpoint in V to the highest prepared
  one, carrying the digest prepared in the highest view, or a null request.
- A backup accepts NEW-VIEW only after checking it completely: the signer is
  the primary of v+1; V has 2f+1 distinct valid VIEW-CHANGEs for v+1 (each
  checkpoint proof and each prepared certificate checked on its own, see
  :func:`consensus.pbft.quorum.check_view_change`); and O is exactly what it
  computes itself from V.
- When 2f+1 VIEW-CHANGEs for v+1 are in but no valid NEW-VIEW arrives within
  the timeout, the replica moves on to v+2 and the timeout doubles.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from consensus.durable import ReplicaLog
from consensus.pbft import execution, transfer
from consensus.pbft.messages import (
    Envelope,
    NewView,
    PrePrepare,
    SignatureError,
    Signed,
    ViewChange,
)
from consensus.pbft.quorum import (
    CertificateError,
    ValidViewChange,
    check_view_change,
    new_view_plan,
)
from mesh.core import CancelTimer, Notify, SetTimer

if TYPE_CHECKING:
    from consensus.pbft.replica import Replica

__all__ = [
    "MAX_VIEW",
    "start_view_change",
    "on_view_change",
    "on_new_view",
    "on_new_view_timeout",
    "resend_view_change",
    "resume_view_change",
    "forward_pending",
    "relay_own_pending",
]

#: Views at or above this are refused: a view number is a U64 on the wire and
#: v+1 must stay encodable (doubling timeouts reach nowhere near it honestly).
MAX_VIEW = 2**62
#: Requests relayed per peer per status interval: a batch's worth (B = 100).
FORWARD_MAX = 100


def start_view_change(r: Replica, now: float, new_view: int) -> None:
    if new_view <= r.view or new_view >= MAX_VIEW:
        return
    from consensus.pbft.replica import BATCH_TIMER, NEW_VIEW_TIMER, REQUEST_TIMER

    r.view, r.active = new_view, False
    r.slots.clear()
    r.proposed.clear()
    r.request_timer = False
    for key in (REQUEST_TIMER, BATCH_TIMER, NEW_VIEW_TIMER):
        r._emit(CancelTimer(key))
    r.nv_timer = False
    r._emit(ReplicaLog.view_action(new_view, False))
    _send_view_change(r)
    r._count("view_changes_started")
    r._emit(Notify("pbft.view-change", {"view": new_view}))
    _after_view_change_update(r, now)


def _send_view_change(r: Replica) -> None:
    certs = tuple(c for seq, (_, c) in sorted(r.prepared_certs.items()) if seq > r.low)
    env = r._sign(ViewChange(r.view, r.low, r.stable_proof, certs))
    r._broadcast(env)
    r.view_changes[r.name] = check_view_change(
        r.verifier, r.q, env.signed, r.cfg.window, r.genesis
    )


def resume_view_change(r: Replica, now: float) -> None:
    """After a restart in the middle of a view change (the durable log says the view
    is not active), sign the VIEW-CHANGE again: the one sent before the crash is
    gone with the replica's memory, and without it the view may never gather 2f+1."""
    if not r.active and r.name not in r.view_changes:
        _send_view_change(r)
        _after_view_change_update(r, now)

def on_view_change(r: Replica, now: float, signed: Signed) -> None:
    try:
        vvc = check_view_change(r.verifier, r.q, signed, r.cfg.window, r.genesis)
    except CertificateError:
        r.evidence.count_malformed(signed.sender)
        r._count("invalid_view_changes")
        return
    if vvc.dropped:
        r.evidence.count_malformed(signed.sender)
        r._count("forged_prepared_certificates", vvc.dropped)
    w = vvc.body.new_view
    if w >= MAX_VIEW or w < r.view or (w == r.view and r.active):
        return
    cur = r.view_changes.get(signed.sender)
    if cur is None or w > cur.body.new_view:
        r.view_changes[signed.sender] = vvc
    _after_view_change_update(r, now)

def _after_view_change_update(r: Replica, now: float) -> None:
    from consensus.pbft.replica import NEW_VIEW_TIMER

    f = r.q.f
    higher = sorted(
        (v.body.new_view for s, v in r.view_changes.items()
         if s != r.name and v.body.new_view > r.view),
        reverse=True,
    )
    if len(higher) >= f + 1:
        r._count("f_plus_one_joins")
        start_view_change(r, now, higher[f])
        return
    if r.active:
        return
    votes = [v for v in r.view_changes.values() if v.body.new_view == r.view]
    if len(votes) < 2 * f + 1:
        return
    if not r.nv_timer:
        r._emit(SetTimer(NEW_VIEW_TIMER, now + r.timeout))
        r.nv_timer = True
    if r.is_primary:
        _send_new_view(r, now, votes)

def _send_new_view(r: Replica, now: float, votes: list[ValidViewChange]) -> None:
    own = [v for v in votes if v.sender == r.name]
    rest = sorted((v for v in votes if v.sender != r.name), key=lambda v: v.sender)
    chosen = (own + rest)[: 2 * r.q.f + 1]
    min_s, plan = new_view_plan(chosen)
    pps = tuple(r._sign(PrePrepare(r.view, seq, d)).signed for seq, d in plan)
    env = r._sign(NewView(r.view, tuple(v.signed for v in chosen), pps))
    r._broadcast(env)
    _enter_view(r, now, env, chosen, min_s, plan, pps)

def on_new_view(r: Replica, now: float, env: Envelope, nv: NewView) -> None:
    w = nv.view
    if env.sender != r.q.primary(w):
        r.evidence.count_malformed(env.sender)
        return
    if w >= MAX_VIEW or w < r.view or (w == r.view and r.active):
        return
    problem = _check_new_view(r, nv)
    if isinstance(problem, str):
        r.evidence.count_malformed(env.sender)
        r._count("invalid_new_views")
        r._emit(Notify("pbft.invalid-new-view", {"from": env.sender, "why": problem}))
        return
    vvcs, min_s, plan = problem
    _enter_view(r, now, env, vvcs, min_s, plan, nv.preprepares)

def _check_new_view(
    r: Replica, nv: NewView
) -> str | tuple[list[ValidViewChange], int, list[tuple[int, bytes]]]:
    senders = [s.sender for s in nv.view_changes]
    if len(set(senders)) != len(senders) or len(senders) < 2 * r.q.f + 1:
        return "NEW-VIEW needs 2f+1 view changes from distinct replicas"
    vvcs = []
    for s in nv.view_changes:
        try:
            vvc = check_view_change(r.verifier, r.q, s, r.cfg.window, r.genesis)
        except CertificateError as exc:
            return f"view change by {s.sender!r}: {exc}"
        if vvc.body.new_view != nv.view:
            return f"view change by {s.sender!r} is for view {vvc.body.new_view}"
        vvcs.append(vvc)
    min_s, plan = new_view_plan(vvcs)
    if len(plan) != len(nv.preprepares):
        return f"O has {len(nv.preprepares)} pre-prepares, expected {len(plan)}"
    for (seq, d), s in zip(plan, nv.preprepares, strict=True):
        try:
            pp = r.verifier.open(s, (PrePrepare,))
        except SignatureError as exc:
            return f"pre-prepare in O: {exc}"
        if s.sender != r.q.primary(nv.view) or pp != PrePrepare(nv.view, seq, d):
            return f"pre-prepare for seq {seq} in O differs from the recomputed one"
    return vvcs, min_s, plan

def _enter_view(
    r: Replica,
    now: float,
    env: Envelope,
    vvcs: list[ValidViewChange],
    min_s: int,
    plan: list[tuple[int, bytes]],
    pps: tuple[Signed, ...],
) -> None:
    from consensus.pbft.replica import NEW_VIEW_TIMER

    w = _view_of(r, env)
    r.view, r.active = w, True
    r.new_view_msg = env
    r._emit(ReplicaLog.view_action(w, True), CancelTimer(NEW_VIEW_TIMER))
    r.nv_timer = False
    r.view_changes = {s: v for s, v in r.view_changes.items() if v.body.new_view > w}
    r.slots.clear()
    r.proposed.clear()
    if min_s > r.low:
        best = next(v for v in vvcs if v.body.stable_seq == min_s)
        own = r.snapshots.get(min_s)
        if r.last_exec >= min_s and own is not None:
            execution.make_stable(r, min_s, own[0], best.body.checkpoint_proof)
        else:
            transfer.request_state(r, now)
    # The new view numbers on from the last sequence number in O (OSDI'99 §4.4):
    # numbers a primary of an earlier view assigned beyond it never prepared at
    # 2f+1 (else one of the 2f+1 VIEW-CHANGEs would carry them), so they are free
    # again. Keeping the larger number of an earlier view left a gap that no
    # primary would ever fill, and execution stopped (pbft-swarm seed 1453).
    r.next_seq = max(r.low + 1, r.last_exec + 1, min_s + 1, (plan[-1][0] + 1) if plan else 0)
    for (seq, d), spp in zip(plan, pps, strict=True):
        if r._in_window(seq):
            pp_env = Envelope(spp.sender, spp.body, spp.sig)
            r._accept_preprepare(now, pp_env, PrePrepare(w, seq, d), r.batches.get(d),
                                    announce=False)
    r._count("view_changes_completed")
    r._emit(Notify("pbft.new-view", {"view": w, "primary": r.primary}))
    forward_pending(r, now, 0.0)
    r._arm_request_timer(now, restart=True)
    r._maybe_propose(now)

def _view_of(r: Replica, env: Envelope) -> int:
    from mesh import wire

    return int(wire.decode(env.body, expect=(NewView,)).view)

def on_new_view_timeout(r: Replica, now: float) -> None:
    r.nv_timer = False
    if not r.active:
        r.backoff += 1
        r._count("new_view_timeouts")
        start_view_change(r, now, r.view + 1)

def resend_view_change(r: Replica, peer: str) -> None:
    """Send our VIEW-CHANGE again, with the requests we wait for: a peer that
    never saw them (their client crashed, or was cut off) starts its own timer,
    so either the primary executes them or the peer joins the view change."""
    own = r.view_changes.get(r.name)
    if own is not None and not r.active and own.body.new_view == r.view:
        r._send(peer, Envelope(own.signed.sender, own.signed.body, own.signed.sig))
        for signed, _ in list(r.pending.values())[:FORWARD_MAX]:
            r._send(peer, Envelope(signed.sender, signed.body, signed.sig))

def forward_pending(r: Replica, now: float, older_than: float) -> None:
    """As a backup, hand the primary the requests that have waited ``older_than``
    seconds (all of them on entering a view): PBFT backups relay requests so a
    primary that lost or never got one still proposes it (OSDI'99 §4.1). Once per
    request and view: a loaded federation, where every request waits long, must
    not spend its capacity on copies the primary already holds."""
    if not r.active or r.is_primary:
        return
    sent = 0
    for key, (signed, since) in r.pending.items():
        if sent >= FORWARD_MAX:
            break
        if now - since >= older_than and r.forwarded.get(key) != r.view:
            r._send(r.primary, Envelope(signed.sender, signed.body, signed.sig))
            r.forwarded[key] = r.view
            sent += 1


def relay_own_pending(r: Replica, now: float, older_than: float) -> None:
    """Send every replica, once, the requests of our own client that have waited
    ``older_than`` seconds. A request goes first to the primary alone (OSDI'99
    §4.1), so the backups cannot suspect a primary that ignores it until they
    hold it too; then each runs its request timer, and 2f+1 of them can change
    the view. Once only: repeating is the client's retransmission (every
    ``consensus.pbft.client.RETRANSMIT`` seconds, to all), so an overloaded federation,
    where every request is old, is not flooded with copies on every status tick."""
    if not r.active:
        return
    sent = 0
    for key, (signed, since) in r.pending.items():
        if sent >= FORWARD_MAX:
            break
        if key[0] == r.name and key not in r.relayed and now - since >= older_than:
            r._broadcast(Envelope(signed.sender, signed.body, signed.sig))
            r.relayed[key] = None
            sent += 1
