"""The promise checker (sim/hosts/pbft_promises.py) flags every contradiction it names,
and nothing a correct replica may sign."""

from __future__ import annotations

from consensus.pbft.messages import (
    Checkpoint,
    Commit,
    NewView,
    Prepare,
    PreparedCert,
    PrePrepare,
    Request,
    ViewChange,
    seal,
)
from sim.hosts.pbft_cluster import identity_for
from sim.hosts.pbft_promises import SignedPromises

D1, D2 = b"\x01" * 32, b"\x02" * 32


def sent(p: SignedPromises, signer: str, body: object) -> str | None:
    return p.envelope(signer, seal(identity_for(signer), signer, body))


def cert(view: int, seq: int, dig: bytes) -> PreparedCert:
    primary = f"n{view % 4:02d}"
    pp = seal(identity_for(primary), primary, PrePrepare(view, seq, dig)).signed
    return PreparedCert(pp, ())


def test_two_digests_for_one_vote_are_flagged() -> None:
    for body in (PrePrepare, Prepare, Commit):
        p = SignedPromises()
        assert sent(p, "n01", body(1, 5, D1)) is None
        assert sent(p, "n01", body(1, 5, D1)) is None  # the same again: retransmission
        assert sent(p, "n02", body(1, 5, D2)) is None  # another signer
        assert "two digests" in (sent(p, "n01", body(1, 5, D2)) or "")


def test_a_second_new_view_or_a_diverging_checkpoint_is_flagged() -> None:
    p = SignedPromises()
    assert sent(p, "n01", NewView(1, (), ())) is None
    other = seal(identity_for("n01"), "n01", PrePrepare(1, 1, D1)).signed
    assert "two NEW-VIEWs" in (sent(p, "n01", NewView(1, (), (other,))) or "")
    assert sent(p, "n02", Checkpoint(8, D1)) is None
    assert "different states" in (sent(p, "n02", Checkpoint(8, D2)) or "")


def test_votes_in_a_view_the_replica_left_are_flagged() -> None:
    p = SignedPromises()
    assert sent(p, "n02", ViewChange(3, 0, (), ())) is None
    assert sent(p, "n02", Prepare(3, 1, D1)) is None
    assert "after its VIEW-CHANGE to view 3" in (sent(p, "n02", Commit(2, 1, D1)) or "")


def test_a_view_change_must_prove_every_sequence_number_it_committed() -> None:
    p = SignedPromises()
    assert sent(p, "n02", Commit(0, 4, D1)) is None
    assert sent(p, "n02", Commit(0, 9, D1)) is None
    # checkpoint 8 covers seq 4; seq 9 must be proven, in view 0 with D1 or later
    assert sent(p, "n02", ViewChange(1, 8, (), (cert(0, 9, D1),))) is None
    assert sent(p, "n02", ViewChange(2, 8, (), (cert(1, 9, D2),))) is None
    forgot = sent(p, "n02", ViewChange(3, 8, (), ()))
    assert forgot is not None and "forgets seq 9" in forgot
    p = SignedPromises()
    assert sent(p, "n02", Commit(1, 9, D1)) is None
    assert "forgets seq 9" in (sent(p, "n02", ViewChange(2, 0, (), (cert(1, 9, D2),))) or "")
    assert "forgets seq 9" in (sent(p, "n02", ViewChange(2, 0, (), (cert(0, 9, D1),))) or "")


def test_relayed_and_unchecked_messages_are_let_through() -> None:
    p = SignedPromises()
    request = seal(identity_for("n03"), "n03", Request("n03", 1, (b"x",)))
    assert p.envelope("n01", request) is None  # n01 forwards n03's request
    assert p.envelope("n03", request) is None  # a request promises nothing
    assert p.envelope("n01", object()) is None
    vote = seal(identity_for("n01"), "n01", Prepare(0, 1, D1))
    assert p.envelope("n01", vote) is None  # the one message checked
    assert p.checked == 1
    assert p.envelope("n01", vote) is None and p.checked == 1  # the same object: once
