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

from consensus.pbft import agreement, checkpoint, ordering
from consensus.pbft.messages import (
    Envelope,
    NewView,
    PrePrepare,
    SignatureError,
    Signed,
    ViewChange,
)
from consensus.pbft.outbox import Outbox
from consensus.pbft.quorum import (
    CertificateError,
    ValidViewChange,
    check_view_change,
    new_view_plan,
)
from consensus.pbft.state import BATCH_TIMER, NEW_VIEW_TIMER, REQUEST_TIMER, ReplicaState

__all__ = [
    "MAX_VIEW",
    "start_view_change",
    "on_view_change",
    "on_new_view",
    "on_new_view_timeout",
    "resend_view_change",
    "resume_view_change",
]

#: Views at or above this are refused: a view number is a U64 on the wire and
#: v+1 must stay encodable (doubling timeouts reach nowhere near it honestly).
MAX_VIEW = 2**62


def start_view_change(st: ReplicaState, out: Outbox, now: float, new_view: int) -> None:
    if new_view <= st.view or new_view >= MAX_VIEW:
        return
    st.view, st.active = new_view, False
    st.slots.clear()
    st.proposed.clear()
    st.request_timer = False
    for key in (REQUEST_TIMER, BATCH_TIMER, NEW_VIEW_TIMER):
        out.cancel_timer(key)
    st.nv_timer = False
    out.persist(st.log.view(new_view, False))
    _send_view_change(st, out)
    st.count("view_changes_started")
    out.notify("pbft.view-change", {"view": new_view})
    _after_view_change_update(st, out, now)


def _send_view_change(st: ReplicaState, out: Outbox) -> None:
    certs = tuple(c for seq, (_, c) in sorted(st.prepared_certs.items()) if seq > st.low)
    env = out.sign(ViewChange(st.view, st.low, st.stable_proof, certs))
    out.broadcast(env)
    st.view_changes[st.name] = check_view_change(
        st.verifier, st.q, env.signed, st.cfg.window, st.genesis
    )


def resume_view_change(st: ReplicaState, out: Outbox, now: float) -> None:
    """After a restart in the middle of a view change (the durable log says the view
    is not active), sign the VIEW-CHANGE again: the one sent before the crash is
    gone with the replica's memory, and without it the view may never gather 2f+1."""
    if not st.active and st.name not in st.view_changes:
        _send_view_change(st, out)
        _after_view_change_update(st, out, now)


def on_view_change(st: ReplicaState, out: Outbox, now: float, signed: Signed) -> None:
    try:
        vvc = check_view_change(st.verifier, st.q, signed, st.cfg.window, st.genesis)
    except CertificateError:
        st.evidence.count_malformed(signed.sender)
        st.count("invalid_view_changes")
        return
    if vvc.dropped:
        st.evidence.count_malformed(signed.sender)
        st.count("forged_prepared_certificates", vvc.dropped)
    w = vvc.body.new_view
    if w >= MAX_VIEW or w < st.view or (w == st.view and st.active):
        return
    cur = st.view_changes.get(signed.sender)
    if cur is None or w > cur.body.new_view:
        st.view_changes[signed.sender] = vvc
    _after_view_change_update(st, out, now)


def _after_view_change_update(st: ReplicaState, out: Outbox, now: float) -> None:
    f = st.q.f
    higher = sorted(
        (v.body.new_view for s, v in st.view_changes.items()
         if s != st.name and v.body.new_view > st.view),
        reverse=True,
    )
    if len(higher) >= f + 1:
        st.count("f_plus_one_joins")
        start_view_change(st, out, now, higher[f])
        return
    if st.active:
        return
    votes = [v for v in st.view_changes.values() if v.body.new_view == st.view]
    if len(votes) < 2 * f + 1:
        return
    if not st.nv_timer:
        out.set_timer(NEW_VIEW_TIMER, now + st.timeout)
        st.nv_timer = True
    if st.is_primary:
        _send_new_view(st, out, now, votes)


def _send_new_view(st: ReplicaState, out: Outbox, now: float,
                   votes: list[ValidViewChange]) -> None:
    own = [v for v in votes if v.sender == st.name]
    rest = sorted((v for v in votes if v.sender != st.name), key=lambda v: v.sender)
    chosen = (own + rest)[: 2 * st.q.f + 1]
    min_s, plan = new_view_plan(chosen)
    pps = tuple(out.sign(PrePrepare(st.view, seq, d)).signed for seq, d in plan)
    env = out.sign(NewView(st.view, tuple(v.signed for v in chosen), pps))
    _enter_view(st, out, now, env, chosen, min_s, plan, pps)  # logs it, then sends it


def on_new_view(st: ReplicaState, out: Outbox, now: float, env: Envelope, nv: NewView) -> None:
    w = nv.view
    if env.sender != st.q.primary(w):
        st.evidence.count_malformed(env.sender)
        return
    if w >= MAX_VIEW or w < st.view or (w == st.view and st.active):
        return
    problem = _check_new_view(st, nv)
    if isinstance(problem, str):
        st.evidence.count_malformed(env.sender)
        st.count("invalid_new_views")
        out.notify("pbft.invalid-new-view", {"from": env.sender, "why": problem})
        return
    vvcs, min_s, plan = problem
    _enter_view(st, out, now, env, vvcs, min_s, plan, nv.preprepares)


def _check_new_view(
    st: ReplicaState, nv: NewView
) -> str | tuple[list[ValidViewChange], int, list[tuple[int, bytes]]]:
    senders = [s.sender for s in nv.view_changes]
    if len(set(senders)) != len(senders) or len(senders) < 2 * st.q.f + 1:
        return "NEW-VIEW needs 2f+1 view changes from distinct replicas"
    vvcs = []
    for s in nv.view_changes:
        try:
            vvc = check_view_change(st.verifier, st.q, s, st.cfg.window, st.genesis)
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
            pp = st.verifier.open(s, (PrePrepare,))
        except SignatureError as exc:
            return f"pre-prepare in O: {exc}"
        if s.sender != st.q.primary(nv.view) or pp != PrePrepare(nv.view, seq, d):
            return f"pre-prepare for seq {seq} in O differs from the recomputed one"
    return vvcs, min_s, plan


def _enter_view(
    st: ReplicaState,
    out: Outbox,
    now: float,
    env: Envelope,
    vvcs: list[ValidViewChange],
    min_s: int,
    plan: list[tuple[int, bytes]],
    pps: tuple[Signed, ...],
) -> None:
    w = vvcs[0].body.new_view
    st.view, st.active = w, True
    st.new_view_msg = env
    # Logged before anything of view w goes out (the primary's NEW-VIEW included, so it
    # never makes a second one): its pre-prepares are our Q for their sequence numbers,
    # and a replica that missed it gets it from us, also after a restart.
    out.persist(st.log.view(w, True, env))
    if env.sender == st.name:
        out.broadcast(env)
    out.cancel_timer(NEW_VIEW_TIMER)
    st.nv_timer = False
    st.view_changes = {s: v for s, v in st.view_changes.items() if v.body.new_view > w}
    st.slots.clear()
    st.proposed.clear()
    if min_s > st.low:
        best = next(v for v in vvcs if v.body.stable_seq == min_s)
        own = st.snapshots.get(min_s)
        if st.last_exec >= min_s and own is not None:
            checkpoint.make_stable(st, out, min_s, own[0], best.body.checkpoint_proof)
        else:
            checkpoint.request_state(st, out, now)
    # The new view numbers on from the last sequence number in O (OSDI'99 §4.4):
    # numbers a primary of an earlier view assigned beyond it never prepared at
    # 2f+1 (else one of the 2f+1 VIEW-CHANGEs would carry them), so they are free
    # again. Keeping the larger number of an earlier view left a gap that no
    # primary would ever fill, and execution stopped (pbft-swarm seed 1453).
    st.next_seq = max(st.low + 1, st.last_exec + 1, min_s + 1, (plan[-1][0] + 1) if plan else 0)
    for (seq, d), spp in zip(plan, pps, strict=True):
        if st.in_window(seq):
            pp_env = Envelope(spp.sender, spp.body, spp.sig)
            agreement.accept_preprepare(st, out, now, pp_env, PrePrepare(w, seq, d),
                                       st.batches.get(d), in_new_view=True)
    st.count("view_changes_completed")
    out.notify("pbft.new-view", {"view": w, "primary": st.primary})
    ordering.forward_pending(st, out, now, 0.0)
    ordering.arm_request_timer(st, out, now, restart=True)
    ordering.maybe_propose(st, out, now)


def on_new_view_timeout(st: ReplicaState, out: Outbox, now: float) -> None:
    st.nv_timer = False
    if not st.active:
        st.backoff += 1
        st.count("new_view_timeouts")
        start_view_change(st, out, now, st.view + 1)


def resend_view_change(st: ReplicaState, out: Outbox, peer: str) -> None:
    """Send our VIEW-CHANGE again, with the requests we wait for: a peer that
    never saw them (their client crashed, or was cut off) starts its own timer,
    so either the primary executes them or the peer joins the view change."""
    own = st.view_changes.get(st.name)
    if own is not None and not st.active and own.body.new_view == st.view:
        out.send(peer, Envelope(own.signed.sender, own.signed.body, own.signed.sig))
        for signed, _ in list(st.pending.values())[:ordering.FORWARD_MAX]:
            out.send(peer, Envelope(signed.sender, signed.body, signed.sig))
