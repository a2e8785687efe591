"""The memo of verified operator signatures (consensus.authz._VERIFIED): one request is
verified once per process (the door, then the DC's own replica), and a warm memo never
lets through a signature that was not itself verified."""

from __future__ import annotations

from collections.abc import Iterator

import cbor2
import pytest

import consensus.authz as authz
from consensus import request_frames
from consensus.authz import (
    AuthError,
    Authorization,
    Operator,
    OperatorTable,
    RequestHead,
    Role,
    SignedRequest,
    authorize,
    open_authorization,
)
from consensus.ledger import ImportVm, Ledger, RegisterVm
from mesh import identity, wire
from mesh.identity import PublicKey

DCS = ("dc-a", "dc-b", "dc-c", "dc-d")
OPS = identity.Identity.from_seed(b"\x21" * 32)
MALLORY = identity.Identity.from_seed(b"\x22" * 32)
TABLE = OperatorTable.of("memo", [Operator("ops", OPS.public, Role.OPERATOR)])
T0 = 1_790_000_000.0


@pytest.fixture(autouse=True)
def verifications(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
    """A cold memo, and the list of messages actually verified with Ed25519."""
    monkeypatch.setattr(authz, "_VERIFIED", {})
    calls: list[bytes] = []
    real = PublicKey.verify

    def counted(self: PublicKey, data: bytes, signature: bytes) -> bool:
        calls.append(data)
        return real(self, data, signature)

    monkeypatch.setattr(PublicKey, "verify", counted)
    yield calls


def auth(vm: str, at: float = T0, key: identity.Identity = OPS) -> Authorization:
    return authorize(key, "memo", "ops", ImportVm(vm, "dc-a", "/m"), at, f"memo-{vm}-0001")


def with_signature(a: Authorization, signature: bytes) -> Authorization:
    signed = wire.decode(a.request, expect=(SignedRequest,))
    return Authorization(wire.encode(SignedRequest(signed.operator, signed.head, signature)),
                         a.body)


def test_one_request_is_verified_once_per_process(verifications: list[bytes]) -> None:
    a = auth("vm1")
    open_authorization(TABLE, a)
    open_authorization(TABLE, a)
    assert len(verifications) == 1


def test_a_forged_signature_is_refused_when_the_memo_holds_the_genuine_one(
        verifications: list[bytes]) -> None:
    good = auth("vm1")
    open_authorization(TABLE, good)
    sig = wire.decode(good.request, expect=(SignedRequest,)).signature
    for forged in (bytes([sig[0] ^ 1]) + sig[1:],  # the same head, a changed signature
                   MALLORY.sign(authz.SIGN_CONTEXT
                                + wire.decode(good.request, expect=(SignedRequest,)).head)):
        with pytest.raises(AuthError) as err:
            open_authorization(TABLE, with_signature(good, forged))
        assert err.value.reason == "bad-signature"
    # another head under the genuine request's signature
    other = auth("vm2")
    with pytest.raises(AuthError) as err:
        open_authorization(TABLE, with_signature(other, sig))
    assert err.value.reason == "bad-signature"
    assert len(verifications) == 4  # every one checked, none answered by the memo


def test_the_memo_is_per_key_a_rotated_operator_key_is_checked_again() -> None:
    a = auth("vm1")
    open_authorization(TABLE, a)
    rotated = OperatorTable.of("memo", [Operator("ops", MALLORY.public, Role.OPERATOR)])
    with pytest.raises(AuthError) as err:
        open_authorization(rotated, a)
    assert err.value.reason == "bad-signature"


def test_a_batch_with_one_forged_command_refuses_it_after_a_warm_memo() -> None:
    """As a replica executes a batch a Byzantine primary proposed: the genuine commands
    (already verified once here) apply, the forged one is refused."""
    ledger = Ledger(DCS, TABLE)
    genuine = [auth(f"vm{i}") for i in range(3)]
    for a in genuine:
        open_authorization(TABLE, a)  # the memo is warm with every genuine request
    sig0 = wire.decode(genuine[0].request, expect=(SignedRequest,)).signature
    forged = with_signature(auth("vm9"), sig0)  # vm9's head under vm0's signature
    batch = [RegisterVm("vm0", "dc-a", genuine[0]), RegisterVm("vm9", "dc-a", forged),
             RegisterVm("vm1", "dc-a", genuine[1]), RegisterVm("vm2", "dc-a", genuine[2])]
    results = [wire.decode(ledger.execute("dc-a", i + 1, wire.encode(c), T0))
               for i, c in enumerate(batch)]
    assert [r.ok for r in results] == [True, False, True, True]
    assert "not operator 'ops''s over this request" in results[1].error
    assert sorted(ledger.vms) == ["vm0", "vm1", "vm2"]


def test_the_memo_is_bounded_and_forgets_the_oldest(monkeypatch: pytest.MonkeyPatch,
                                                     verifications: list[bytes]) -> None:
    monkeypatch.setattr(authz, "_VERIFIED_CAPACITY", 2)
    a, b, c = auth("vm1"), auth("vm2"), auth("vm3")
    for x in (a, b, c):
        open_authorization(TABLE, x)
    assert len(authz._VERIFIED) == 2
    open_authorization(TABLE, c)  # still remembered
    assert len(verifications) == 3
    open_authorization(TABLE, a)  # forgotten: checked again
    assert len(verifications) == 4


def test_the_door_and_the_ledger_verify_a_request_once(verifications: list[bytes]) -> None:
    """The node's path: the API door checks the request, the DC's replica executes the
    command carrying it; one Ed25519 verification in the process."""
    from federation.api.auth import ReplayWindow, verify_request
    from federation.config import loads

    fed = loads('[federation]\nid = "memo"\n'
                f'[[dc]]\nname = "dc-a"\npublic_key = "{MALLORY.public}"\n'
                'control = "127.0.0.1:7101"\ndata = "127.0.0.1:7201"\napi = "127.0.0.1:7301"\n'
                f'[[operators]]\nname = "ops"\npublic_key = "{OPS.public}"\nrole = "operator"\n',
                "memo.toml")
    a = auth("vm1")
    verified = verify_request(fed, a.request, T0, ReplayWindow(), method="POST",
                              target=ImportVm.wire_tag, body=a.body,  # type: ignore[attr-defined]
                              need=Role.OPERATOR)
    ledger = Ledger(DCS, fed.operator_table())
    res = wire.decode(ledger.execute("dc-a", 1, wire.encode(
        RegisterVm("vm1", "dc-a", verified.authorization)), T0))
    assert res.ok, res.error
    assert len(verifications) == 1


def test_every_replica_checks_every_command_itself(verifications: list[bytes]) -> None:
    """A replica runs in its own process, with its own memo: executing a batch verifies
    each command's operator signature once, through the hand readers of
    consensus.request_frames (the frames are canonical), whatever another replica did."""
    commands = [RegisterVm(f"vm{i}", "dc-a", auth(f"vm{i}")) for i in range(4)]
    for c in commands:
        assert request_frames.read_signed(c.authorization.request) is not None
    for replica in range(2):  # the second replica: a fresh process, a cold memo
        authz._VERIFIED.clear()
        ledger = Ledger(DCS, TABLE)
        for i, c in enumerate(commands):
            assert wire.decode(ledger.execute("dc-a", i + 1, wire.encode(c), T0)).ok
        assert len(verifications) == 4 * (replica + 1)


def test_a_genuine_request_in_another_encoding_is_refused_beside_a_warm_memo() -> None:
    """The genuine head and signature (verified, in the memo) inside a wrapper that is not
    canonical CBOR, and a head the operator key signed that is not canonical: both are
    refused as malformed, by the checked decoder the hand readers leave them to."""
    good = auth("vm1")
    open_authorization(TABLE, good)
    signed = wire.decode(good.request, expect=(SignedRequest,))
    fields = cbor2.loads(good.request)[2]
    # the operator's name with a two-byte length where one byte does: not canonical
    padded = (good.request[:good.request.index(b"\x63ops")] + b"\x78\x03ops"
              + good.request[good.request.index(b"\x63ops") + 4:])
    assert cbor2.loads(padded)[2] == fields and padded != good.request
    assert request_frames.read_signed(padded) is None
    with pytest.raises(AuthError) as err:
        open_authorization(TABLE, Authorization(padded, good.body))
    assert err.value.reason == "malformed"
    # a head whose float is written as a double where a shorter width holds it
    head = wire.decode(signed.head, expect=(RequestHead,))
    wide = cbor2.dumps([1, RequestHead.wire_tag,  # type: ignore[attr-defined]
                        [head.federation, head.operator, head.method, head.target,
                         head.body_digest, 0.0, head.nonce]], canonical=True)
    wide = wide[:-len(head.nonce) - 1 - 3] + b"\xfb" + bytes(8) + wide[-len(head.nonce) - 1:]
    assert cbor2.loads(wide)[2][5] == 0.0
    assert request_frames.read_head(wide) is None
    resigned = wire.encode(SignedRequest("ops", wide, OPS.sign(authz.SIGN_CONTEXT + wide)))
    with pytest.raises(AuthError) as err:
        open_authorization(TABLE, Authorization(resigned, good.body))
    assert err.value.reason == "malformed" and "unreadable head" in str(err.value)
