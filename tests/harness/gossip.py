"""Signed gossip statements for the membership and link-state tests: every DC name has
a fixed key, so a test can say anything as anyone (mesh.gossip.statements)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from mesh import wire
from mesh.gossip.control_msgs import STATEMENT_MAX, LinkEntry, MemberUpdate, Signed
from mesh.gossip.statements import Statements
from mesh.identity import Identity


def identity_of(name: str) -> Identity:
    return Identity.from_seed(hashlib.sha256(b"dwcp-test-key/" + name.encode()).digest())


def statements_for(me: str, names: Iterable[str]) -> Statements:
    """DC ``me``'s statements in a federation of ``names`` (``me`` added if missing)."""
    everyone = sorted({me, *names})
    return Statements(me, identity_of(me), {n: identity_of(n).public for n in everyone})


def _speaker_statements(speaker: str) -> Statements:
    return Statements(speaker, identity_of(speaker), {speaker: identity_of(speaker).public})


def said(update: MemberUpdate) -> Signed:
    """``update`` signed by the DC it names as its source."""
    return _speaker_statements(update.source).sign_member(update)


def said_link(entry: LinkEntry) -> Signed:
    """``entry`` signed by its origin."""
    return _speaker_statements(entry.origin).sign_link(entry)


def forged(update: MemberUpdate | LinkEntry, by: str) -> Signed:
    """``update`` signed by ``by``'s key, whoever it names as its speaker."""
    s = _speaker_statements(by)
    if isinstance(update, LinkEntry):
        return Signed(wire.encode_struct(update), s.identity.sign(
            b"dwcp/1 link statement\x00" + wire.encode_struct(update)))
    return Signed(wire.encode_struct(update), s.identity.sign(
        b"dwcp/1 member statement\x00" + wire.encode_struct(update)))


def member_of(signed: Signed) -> MemberUpdate:
    """The update a signed member statement carries (no check of the signature)."""
    got: MemberUpdate = wire.decode_struct(signed.body, MemberUpdate, STATEMENT_MAX)
    return got

