"""Signed PBFT messages, certificates and Byzantine evidence."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consensus.pbft.evidence import EquivocationProof, EvidenceBook, check_proof
from consensus.pbft.messages import (
    NULL_DIGEST,
    Commit,
    Envelope,
    Prepare,
    PreparedCert,
    PrePrepare,
    SignatureError,
    Signed,
    Verifier,
    ViewChange,
    open_signed,
    seal,
    set_memo_capacity,
    sign,
)
from consensus.pbft.quorum import (
    CertificateError,
    Quorum,
    check_checkpoint_proof,
    check_commit_cert,
    check_prepared,
    check_view_change,
    new_view_plan,
)
from mesh import wire
from mesh.identity import Identity

NAMES = ("a", "b", "c", "d")
IDS = {n: Identity.from_seed(hashlib.sha256(n.encode()).digest()) for n in NAMES}
KEYS = {n: i.public for n, i in IDS.items()}
Q = Quorum.of(KEYS)
D1, D2 = b"\x01" * 32, b"\x02" * 32


def s(name: str, body: object) -> Signed:
    return sign(IDS[name], name, body)


def test_signature_is_checked_over_the_received_bytes() -> None:
    env = seal(IDS["a"], "a", Prepare(0, 1, D1))
    assert open_signed(env.signed, KEYS) == Prepare(0, 1, D1)
    tampered = bytearray(env.body)
    tampered[-1] ^= 1
    with pytest.raises(SignatureError) as bad:
        open_signed(Signed("a", bytes(tampered), env.sig), KEYS)
    assert bad.value.kind == "signature"
    with pytest.raises(SignatureError, match="not a member"):
        open_signed(Signed("zz", env.body, env.sig), KEYS)
    with pytest.raises(SignatureError):  # a's signature does not pass as b's
        open_signed(Signed("b", env.body, env.sig), KEYS)


def test_signed_garbage_is_malformed_not_a_crash() -> None:
    body = b"\x83\x01\x6bpbft.commit\x80"
    sig = IDS["a"].sign(b"dwcp/pbft/1\x00" + body)
    with pytest.raises(SignatureError) as bad:
        open_signed(Signed("a", body, sig), KEYS)
    assert bad.value.kind == "malformed"


@given(st.binary(max_size=400))
def test_envelope_decoder_raises_only_wire_error(data: bytes) -> None:
    try:
        env = wire.decode(data, expect=(Envelope,))
    except wire.WireError:
        return
    try:
        open_signed(env.signed, KEYS)
    except SignatureError:
        pass


def prepared(view: int, seq: int, dig: bytes) -> PreparedCert:
    primary = Q.primary(view)
    backups = [n for n in NAMES if n != primary][:2]
    return PreparedCert(s(primary, PrePrepare(view, seq, dig)),
                        tuple(s(b, Prepare(view, seq, dig)) for b in backups))


def test_prepared_certificate_checks() -> None:
    v = Verifier(KEYS)
    assert check_prepared(v, Q, prepared(1, 3, D1), 0, 256).digest == D1
    cert = prepared(1, 3, D1)
    with pytest.raises(CertificateError, match="primary"):
        check_prepared(v, Q, PreparedCert(s("c", PrePrepare(1, 3, D1)), cert.prepares), 0, 256)
    with pytest.raises(CertificateError, match="signed twice"):
        check_prepared(v, Q, PreparedCert(cert.preprepare, cert.prepares[:1] * 2), 0, 256)
    with pytest.raises(CertificateError, match="does not match"):
        bad = (cert.prepares[0], s("d", Prepare(1, 3, D2)))
        check_prepared(v, Q, PreparedCert(cert.preprepare, bad), 0, 256)
    with pytest.raises(CertificateError, match="window"):
        check_prepared(v, Q, cert, 3, 256)
    forged = Signed("c", cert.prepares[0].body, cert.prepares[0].sig)
    with pytest.raises(CertificateError):
        check_prepared(v, Q, PreparedCert(cert.preprepare, (cert.prepares[0], forged)), 0, 256)


def test_checkpoint_and_commit_certificates() -> None:
    from consensus.pbft.messages import Checkpoint

    v = Verifier(KEYS)
    proof = tuple(s(n, Checkpoint(8, D1)) for n in "abc")
    assert check_checkpoint_proof(v, Q, 8, proof, b"g" * 32) == D1
    assert check_checkpoint_proof(v, Q, 0, (), b"g" * 32) == b"g" * 32
    with pytest.raises(CertificateError):
        check_checkpoint_proof(v, Q, 8, proof[:2], b"g" * 32)
    with pytest.raises(CertificateError):
        check_checkpoint_proof(v, Q, 16, proof, b"g" * 32)
    mixed = proof[:2] + (s("d", Checkpoint(8, D2)),)
    with pytest.raises(CertificateError, match="disagree"):
        check_checkpoint_proof(v, Q, 8, mixed, b"g" * 32)
    commits = tuple(s(n, Commit(2, 5, D1)) for n in "bcd")
    assert check_commit_cert(v, Q, 5, commits) == D1
    with pytest.raises(CertificateError):
        check_commit_cert(v, Q, 5, commits[:2] + (s("a", Commit(3, 5, D1)),))


def test_one_bad_certificate_neither_hides_nor_spoils_good_ones() -> None:
    v = Verifier(KEYS)
    good = prepared(0, 2, D1)
    # a forged certificate for the same seq in a higher view: prepares not really signed
    pp = s("b", PrePrepare(1, 2, D2))
    fake = tuple(Signed(n, wire.encode(Prepare(1, 2, D2)), b"\x00" * 64) for n in "cd")
    vc = ViewChange(2, 0, (), (PreparedCert(pp, fake), good, prepared(0, 3, D2)))
    valid = check_view_change(v, Q, s("d", vc), 256, b"g" * 32)
    assert valid.dropped == 1
    assert valid.prepared == {2: (0, D1), 3: (0, D2)}
    min_s, plan = new_view_plan([valid])
    assert min_s == 0 and plan == [(1, NULL_DIGEST), (2, D1), (3, D2)]


def test_certificate_for_a_view_not_reached_is_dropped() -> None:
    v = Verifier(KEYS)
    vc = ViewChange(1, 0, (), (prepared(5, 1, D1),))
    assert check_view_change(v, Q, s("c", vc), 256, b"g" * 32).prepared == {}


def test_highest_view_wins_in_new_view_plan() -> None:
    v = Verifier(KEYS)
    low = check_view_change(v, Q, s("c", ViewChange(3, 0, (), (prepared(0, 1, D1),))), 256, b"")
    high = check_view_change(v, Q, s("d", ViewChange(3, 0, (), (prepared(2, 1, D2),))), 256, b"")
    assert new_view_plan([low, high])[1] == [(1, D2)]
    assert new_view_plan([high, low])[1] == [(1, D2)]


def test_equivocation_proof_is_checkable_by_anyone() -> None:
    book = EvidenceBook()
    first = s("a", PrePrepare(0, 7, D1))
    second = s("a", PrePrepare(0, 7, D2))
    assert book.observe(first, PrePrepare(0, 7, D1)) is None
    assert book.observe(first, PrePrepare(0, 7, D1)) is None  # a replay proves nothing
    proof = book.observe(second, PrePrepare(0, 7, D2))
    assert proof is not None and check_proof(proof, KEYS)
    assert book.summary()["convicted"] == ["a"]
    # not proofs: different slots, same digest, a signature that does not check, another DC
    assert not check_proof(EquivocationProof("a", first, s("a", PrePrepare(0, 8, D2))), KEYS)
    assert not check_proof(EquivocationProof("a", first, first), KEYS)
    broken = Signed("a", second.body, b"\x00" * 64)
    assert not check_proof(EquivocationProof("a", first, broken), KEYS)
    assert not check_proof(EquivocationProof("b", first, second), KEYS)
    # different phases of one slot are not a conflict
    assert book.observe(s("a", Prepare(0, 7, D2)), Prepare(0, 7, D2)) is None


def test_the_signature_memo_keeps_at_most_its_capacity_the_oldest_going_first() -> None:
    """A node lowers the process-wide memo to its own size (federation.cli.run_node
    SIGNATURE_MEMO): remembering fewer changes no outcome, only how often one checks."""
    from consensus.pbft import messages

    was = messages._GOOD_CAPACITY
    try:
        set_memo_capacity(4)
        assert len(messages._GOOD) <= 4
        signed = [s("a", Prepare(0, seq, D1)) for seq in range(1, 11)]
        for x in signed:
            assert open_signed(x, KEYS) == wire.decode(x.body)
        memo = list(messages._GOOD)
        assert len(memo) == 4 and memo[-1][1] == signed[-1].sig  # the newest kept
        assert open_signed(signed[0], KEYS) is not None  # forgotten: checked again, same
        set_memo_capacity(0)
        assert not messages._GOOD and open_signed(signed[1], KEYS) is not None
        assert not messages._GOOD
        with pytest.raises(ValueError, match="capacity"):
            set_memo_capacity(-1)
    finally:
        set_memo_capacity(was)
