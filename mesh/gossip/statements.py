"""Gossip speaks only for its origin: signed statements, who may say what, and bounds.

Every membership update and link entry that gossip carries is a *statement* by one DC,
signed with its identity key (deterministic Ed25519, so the simulator's traces stay
reproducible) and checked on receipt against the federation's keys:

* a DC states its own liveness: ``ALIVE`` and ``LEFT`` updates of member X are X's own
  (``source == name``), and only X raises X's incarnation;
* an accusation (``SUSPECT``, ``DEAD``) names its accuser in ``source`` and is signed by
  it; nobody accuses itself (a DC that goes says ``LEFT``). The accused's refutation
  (its own ``ALIVE`` at a higher incarnation) always wins (mesh.gossip.membership);
* a link entry ``origin -> peer`` is ``origin``'s own measurement, signed by ``origin``.

Counters cannot be pushed to the top of their range: every incarnation and link version
must stay at or below :data:`COUNTER_MAX` (an accusation strictly below it, so the
refutation, one higher, still fits); a DC's own statement may step at most
:data:`SELF_STEP` above what the receiver holds, an accusation at most
:data:`ACCUSATION_STEP` above the accused's incarnation.

Checking costs an Ed25519 verification (~50 us); at N = 64 a DC hears each statement
many times (SWIM retransmits every update ``RetransmitMult * log N`` times from every
DC), so verified statements are cached by their bytes, and each peer gets a budget of
verifications (a token bucket): statements beyond it are dropped and counted, as the
network's loss would drop them (anti-entropy repairs an honest peer's). Every refusal is
counted in :attr:`Statements.refused` by reason.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from mesh import wire
from mesh.gossip.control_msgs import STATEMENT_MAX, LinkEntry, MemberUpdate, Signed
from mesh.identity import Identity, PublicKey

__all__ = [
    "Statements",
    "TokenBucket",
    "COUNTER_MAX",
    "SELF_STEP",
    "ACCUSATION_STEP",
    "VERIFY_BURST",
    "VERIFY_RATE",
    "CACHE_MAX",
    "REFUSALS",
]

#: Largest incarnation or link version accepted. An honest DC adds one per refutation
#: or publication: at a million a second it would take 146,000 years to get here, so a
#: value above is a lie, and 2**62 leaves the refutation of any accepted value (one
#: higher) far inside the wire's U64.
COUNTER_MAX = 2**62
#: Most a DC's own counter may step above what a receiver holds. A restarted receiver
#: holds 0 for everyone; a DC's incarnation counts its refutations over the federation's
#: life and its link versions its publications (about 0.1/s per DC in the simulator's
#: 5 %-loss runs, ~3 million a year): 2**32 is a thousand years of either.
SELF_STEP = 2**32
#: Most an accusation may name above the accused's incarnation the receiver holds. An
#: honest accuser names an incarnation the accused announced, which the receiver may not
#: have heard yet if the accused refuted several times in one gossip round; a liar's
#: accusation makes the accused refute at most this many steps higher each time, so
#: the 2**62 range outlasts any rate of lies (mesh.gossip.membership applies it).
ACCUSATION_STEP = 16
#: A peer may have this many statements verified at once, then VERIFY_RATE a second: a
#: whole link table of a 64-DC federation (64 * 63 = 4032 entries) arrives in one
#: anti-entropy exchange at start, and steady state at N = 64 is a few per second per
#: peer. At ~50 us a verification a liar costs at most 13 ms of CPU a second.
VERIFY_BURST = 4096
VERIFY_RATE = 256.0
#: Verified statements remembered (a FIFO), ~200 bytes each: every member's statements
#: and the link table of a 64-DC federation, with room to spare.
CACHE_MAX = 16384

_MEMBER_CONTEXT = b"dwcp/1 member statement\x00"
_LINK_CONTEXT = b"dwcp/1 link statement\x00"
#: Member states (mesh.gossip.members.State): ALIVE 0, SUSPECT 1, DEAD 2, LEFT 3.
_OWN_STATES = (0, 3)

#: Why a statement was refused (the keys of Statements.refused).
REFUSALS = (
    "malformed",  # the body does not decode as the statement it claims to be
    "unknown_speaker",  # the speaker is not a DC of the federation
    "bad_signature",  # not signed by the DC it names as its speaker
    "wrong_speaker",  # a DC speaking for another (ALIVE/LEFT of someone else, own accusal)
    "out_of_range",  # an incarnation or version too high, or too far above the known one
    "rate_limited",  # the sending peer's verification budget is spent
)


@attrs.define
class TokenBucket:
    """``capacity`` tokens, refilled at ``rate`` a second; time is passed in."""

    capacity: float
    rate: float
    at: float = 0.0
    tokens: float = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.tokens = self.capacity

    def take(self, now: float, n: float = 1.0) -> bool:
        """Take ``n`` tokens if there are that many (refilled up to ``now``)."""
        if now > self.at:
            self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
            self.at = now
        if self.tokens < n:
            return False
        self.tokens -= n
        return True


class Statements:
    """Signs DC ``me``'s statements and opens everyone's. ``keys`` maps every DC of the
    federation (``me`` included) to its public key."""

    def __init__(
        self,
        me: str,
        identity: Identity,
        keys: Mapping[str, PublicKey],
        *,
        verify_burst: float = VERIFY_BURST,
        verify_rate: float = VERIFY_RATE,
        cache_max: int = CACHE_MAX,
    ) -> None:
        if keys.get(me) != identity.public:
            raise ValueError(f"statements of {me!r}: the identity is not {me!r}'s key")
        self.me = me
        self.identity = identity
        self.keys = dict(keys)
        self.verify_burst = verify_burst
        self.verify_rate = verify_rate
        self.cache_max = cache_max
        self.refused: dict[str, int] = {}
        self.verified = 0
        self._cache: dict[tuple[bytes, bytes], MemberUpdate | LinkEntry] = {}
        self._budgets: dict[str, TokenBucket] = {}

    # ------------------------------------------------------------------ signing

    def sign_member(self, update: MemberUpdate) -> Signed:
        return self._sign(_MEMBER_CONTEXT, update)

    def sign_link(self, entry: LinkEntry) -> Signed:
        return self._sign(_LINK_CONTEXT, entry)

    def _sign(self, context: bytes, statement: MemberUpdate | LinkEntry) -> Signed:
        body = wire.encode_struct(statement)
        signed = Signed(body, self.identity.sign(context + body))
        self._remember(signed, statement)
        return signed

    # ------------------------------------------------------------------ opening

    def refuse(self, reason: str) -> None:
        """Count a refusal (also one made by a caller's own rule, e.g. a bound)."""
        assert reason in REFUSALS, reason
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def known(self, signed: Signed) -> MemberUpdate | LinkEntry | None:
        """The statement in ``signed`` if it was verified (or made) here and is still
        remembered; None otherwise. Checks nothing and costs no budget."""
        return self._cache.get((signed.body, signed.signature))

    def open_member(self, now: float, peer: str, signed: Signed) -> MemberUpdate | None:
        """The member update in ``signed`` if its speaker signed it and may say it (else
        None, counted); ``peer`` is the DC that passed it on, charged for a verification."""
        got = self._open(now, peer, signed, MemberUpdate, _MEMBER_CONTEXT)
        assert got is None or isinstance(got, MemberUpdate)
        return got

    def open_link(self, now: float, peer: str, signed: Signed) -> LinkEntry | None:
        got = self._open(now, peer, signed, LinkEntry, _LINK_CONTEXT)
        assert got is None or isinstance(got, LinkEntry)
        return got

    def _open(
        self, now: float, peer: str, signed: Signed, cls: type, context: bytes
    ) -> MemberUpdate | LinkEntry | None:
        key = (signed.body, signed.signature)
        cached = self._cache.get(key)
        if cached is not None:
            if type(cached) is cls:
                return cached
            self.refuse("malformed")  # a member statement's bytes offered as a link's
            return None
        budget = self._budgets.get(peer)
        if budget is None:
            budget = self._budgets[peer] = TokenBucket(self.verify_burst, self.verify_rate,
                                                       at=now)
        if not budget.take(now):
            self.refuse("rate_limited")
            return None
        try:
            statement = wire.decode_struct(signed.body, cls, STATEMENT_MAX)
        except wire.WireError:
            self.refuse("malformed")
            return None
        speaker = _speaker(statement)
        if speaker is None:
            self.refuse("wrong_speaker")
            return None
        public = self.keys.get(speaker)
        if public is None:
            self.refuse("unknown_speaker")
            return None
        self.verified += 1
        if not public.verify(context + signed.body, signed.signature):
            self.refuse("bad_signature")
            return None
        self._remember(signed, statement)
        return statement

    def _remember(self, signed: Signed, statement: MemberUpdate | LinkEntry) -> None:
        cache = self._cache
        if len(cache) >= self.cache_max:
            del cache[next(iter(cache))]  # the oldest (dicts keep insertion order)
        cache[(signed.body, signed.signature)] = statement


def _speaker(statement: MemberUpdate | LinkEntry) -> str | None:
    """Who must have signed ``statement``; None when nobody may say it."""
    if isinstance(statement, LinkEntry):
        return statement.origin
    own = statement.state in _OWN_STATES
    if own != (statement.source == statement.name):
        return None  # ALIVE/LEFT said of another, or an accusation of oneself
    return statement.source
