"""Transfer protocol versions: what a DC offers, and what two offers have in common.

"Version" means two things in DWCP, each with its own name:

* the **frame version** (:data:`mesh.wire.FRAME_VERSION`): the layout of every wire
  frame, checked by the decoder; one value today;
* the **transfer versions** (this module): how VM state moves between two DCs. v1 is
  the baseline (one stream, no delta, no compression), v3 is HDE over AMST
  (DESIGN.md, "Protocol versions and rollout").

Each DC *offers* a set of transfer versions in its channel handshake (the federation's
``versions`` intersected with what its data plane carries); both offers are signed into
the handshake transcript (:mod:`mesh.channel`), and each end keeps the peer's whole
offer. A migration then uses the highest version of the intersection that the rollout
policy allows (:mod:`federation.migration.rollout`).

The same offer carries **capabilities**: numbers from :data:`CAPABILITY_MIN` up, which
no transfer version reaches. :func:`common` keeps known transfer versions only, so a
peer that does not know a capability ignores it (an offer keeps numbers it does not
know), and a format change that only some peers read is used only when both ends offer
it, without a new transfer version:

* :data:`AMST_SEALED` (offered on the data endpoint's channels): this end reads AMST
  chunks as ``amst.sealed`` frames, integrity-checked by the channel's AEAD alone,
  without the SHA-256 per chunk of ``amst.chunk`` (issue 17). Every version reads
  ``amst.chunk``; a sender uses ``amst.sealed`` only when both channel ends offer it.
* :data:`HDE_COPIES` (offered on the data endpoint's channels): this end decodes HDE
  chunk frames with the ``copies`` flag (:mod:`mesh.hde.codec`, magic ``HDE\x02``,
  flag 2: a page named as a copy of an earlier page of its chunk). A decoder of an older
  build refuses such a frame cleanly (flags out of bounds: the chunk is asked for again,
  then the transfer fails), so the v3 source asks for copies only in a migration whose
  target offered it on a data channel (federation.dataplane.v3_source), and only in
  pushed rounds (an HDE diff resolves equal pages by key and never sends the flag).
* :data:`CONTROL_FRAMES` (offered on the control endpoint's channels by
  :class:`mesh.runtime.node_runtime.Runtime`): after the link hello this end carries
  the channel's frames straight on the TCP stream, each a 4-byte big-endian length and
  one secretstream frame (:class:`mesh.channel.FrameReader`), instead of one RFC 6455
  websocket message per frame (issue 14: no websocket reader task, no memory channel per
  message, no masking). The switch point and the keepalive that replaces websocket pings
  are in :mod:`mesh.runtime.link_stream`. A peer that does not offer it keeps the
  websocket for the whole connection.
* :data:`COLD_PUSH` (offered on the control endpoint's channels by a node with v3): this
  end, as a v3 source, takes :class:`federation.dataplane.v3_push.V3Held` (the roots a
  target's incoming images hold, before round 1 moves) and then streams round 1 to a
  cold target as the VM's RAM is read, the root at the end (issue 17); as a v3 target,
  it sends V3Held to a source that offers it. An older source would fail the round on a
  diff message it does not know, so a target sends it only when the source offered
  COLD_PUSH; an older target never sends it, and the source diffs round 1 as before.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "V1",
    "V3",
    "KNOWN",
    "BASELINE",
    "OFFER_MAX",
    "VERSION_MAX",
    "CAPABILITY_MIN",
    "AMST_SEALED",
    "HDE_COPIES",
    "CONTROL_FRAMES",
    "COLD_PUSH",
    "VersionError",
    "offer",
    "both_offer",
    "common",
    "highest_common",
]

V1 = 1
V3 = 3
#: Every transfer version this code can carry, ascending.
KNOWN = (V1, V3)
#: The version every DC of a federation is assumed to carry when nothing else is known
#: (before a channel told the peer's offer): the simplest transfer.
BASELINE = V1
#: Most versions one offer may list, and the largest version number (the handshake's
#: wire limits, :class:`mesh.channel.Hello`): room for versions this code does not know.
OFFER_MAX = 16
VERSION_MAX = 255
#: Numbers from here up in an offer are capabilities, never transfer versions.
CAPABILITY_MIN = 128
#: AMST chunk frames without a SHA-256 per chunk (``amst.sealed``, mesh.amst.receiver).
AMST_SEALED = 128
#: HDE chunk frames with the ``copies`` flag (mesh.hde.codec).
HDE_COPIES = 129
#: Control-link frames length-prefixed on the TCP stream after the link hello
#: (mesh.runtime.link_stream).
CONTROL_FRAMES = 130
#: A v3 target tells the root of each incoming image before round 1 moves, and a v3
#: source streams round 1 to a cold one (federation.dataplane.v3_push.V3Held).
COLD_PUSH = 131


class VersionError(Exception):
    """An offer that is not a set of version numbers, or two offers with nothing in
    common; the message names both sides."""


def offer(versions: Iterable[int], *, who: str = "an offer") -> tuple[int, ...]:
    """``versions`` as an offer: distinct, ascending, each in 1..VERSION_MAX, at most
    OFFER_MAX of them, at least one. Unknown versions are kept (a newer peer may offer
    them; :func:`common` drops them)."""
    out = tuple(sorted(set(versions)))
    if not out:
        raise VersionError(f"{who} lists no transfer version")
    if len(out) > OFFER_MAX:
        raise VersionError(f"{who} lists {len(out)} transfer versions, at most {OFFER_MAX}")
    bad = [v for v in out if type(v) is not int or not 1 <= v <= VERSION_MAX]
    if bad:
        raise VersionError(f"{who}: {bad} are not transfer versions (1..{VERSION_MAX})")
    return out


def common(local: Iterable[int], peer: Iterable[int]) -> tuple[int, ...]:
    """The known versions both offers list, ascending."""
    both = set(local) & set(peer)
    return tuple(v for v in KNOWN if v in both)


def both_offer(capability: int, local: Iterable[int], peer: Iterable[int]) -> bool:
    """Whether both offers list ``capability`` (a number from :data:`CAPABILITY_MIN` up)."""
    assert capability >= CAPABILITY_MIN, f"{capability} is a transfer version"
    return capability in tuple(local) and capability in tuple(peer)


def highest_common(local: Iterable[int], peer: Iterable[int]) -> int:
    """The highest known version both offers list; :class:`VersionError` if none."""
    local, peer = tuple(local), tuple(peer)
    both = common(local, peer)
    if not both:
        raise VersionError(
            f"no common transfer version: we offer {sorted(set(local))}, "
            f"the peer offers {sorted(set(peer))}"
        )
    return both[-1]
