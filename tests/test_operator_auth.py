"""The operator's signed request at the node's door (federation.api.auth): every refusal
says exactly why, replays are refused within the window, and the decoder takes any
bytes without an exception other than AuthError (issue 15 item 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consensus.authz import FRESHNESS_WINDOW, AuthError, RequestHead, Role, SignedRequest
from federation import config
from federation.api.auth import (
    OperatorKey,
    ReplayWindow,
    decode_header,
    encode_header,
    required_role,
    sign_request,
    verify_request,
)
from mesh import identity, wire
from tests.harness.wire_strategies import for_class

NOW = 1_790_000_000.0
DC_KEY = identity.Identity.from_seed(b"\x01" * 32)
KEYS = {name: identity.Identity.from_seed(bytes([10 + i]) * 32)
        for i, name in enumerate(("ann", "oli", "vic", "eve"))}
FED = config.loads(
    '[federation]\nid = "prod"\n'
    f'[[dc]]\nname = "dc1"\npublic_key = "{DC_KEY.public}"\n'
    'control = "127.0.0.1:7101"\ndata = "127.0.0.1:7201"\napi = "127.0.0.1:7301"\n'
    + "".join(f'[[operators]]\nname = "{n}"\npublic_key = "{KEYS[n].public}"\nrole = "{r}"\n'
              for n, r in (("ann", "admin"), ("oli", "operator"), ("vic", "viewer"))),
    "prod.toml")
BODY = b'{"vm": "web1", "to": "dc3"}'  # any body: the door checks its digest


def key(name: str) -> OperatorKey:
    return OperatorKey(name, KEYS[name])


def signed(name: str = "oli", *, method: str = "POST", target: str = "/api/migrations",
           body: bytes = BODY, at: float = NOW, nonce: str | None = None,
           fed: str = "prod") -> bytes:
    return sign_request(key(name), fed, method, target, body, at, nonce)


def verify(raw: bytes, *, window: ReplayWindow | None = None, body: bytes = BODY,
           method: str = "POST", target: str = "/api/migrations", now: float = NOW,
           need: Role = Role.OPERATOR) -> object:
    return verify_request(FED, raw, now, window if window is not None else ReplayWindow(),
                          method=method, target=target, body=body, need=need)


def why(raw: bytes, **kwargs: object) -> str:
    with pytest.raises(AuthError) as err:
        verify(raw, **kwargs)  # type: ignore[arg-type]
    return f"{err.value.reason}: {err.value}"


def test_a_signed_request_verifies_to_its_operator_and_role() -> None:
    raw = signed(nonce="req-00000001")
    got = verify(raw)
    assert (got.operator, got.role, got.nonce, got.created) == (  # type: ignore[attr-defined]
        "oli", Role.OPERATOR, "req-00000001", NOW)
    assert got.authorization.request == raw and got.authorization.body == BODY  # type: ignore[attr-defined]


def test_every_refusal_says_exactly_why() -> None:
    assert why(signed("eve")).startswith(
        "unknown-operator: operator 'eve' is not in federation 'prod'")
    forged = sign_request(OperatorKey("ann", KEYS["eve"]), "prod", "POST", "/api/migrations",
                          BODY, NOW)
    assert why(forged).startswith("bad-signature: the signature is not operator 'ann''s")
    assert why(signed(fed="staging")).startswith(
        "wrong-federation: the request is for federation 'staging', this is 'prod'")
    assert why(signed(at=NOW - FRESHNESS_WINDOW - 1)).startswith("expired: request ")
    assert why(signed(at=NOW + FRESHNESS_WINDOW + 1)).startswith("from-the-future: request ")
    assert why(signed("vic"), need=Role.OPERATOR) == (
        "role: operator 'vic' has role viewer; this needs operator")
    assert why(signed(), target="/api/policy").startswith(
        "wrong-request: the request was signed for POST /api/migrations, not POST /api/policy")
    assert why(signed(), body=BODY + b"x").startswith("body-mismatch: the body is not the one")
    assert why(b"\x00junk").startswith("malformed: not a signed operator request")
    window = ReplayWindow()
    raw = signed(method="GET", target="/api/status", body=b"")
    verify(raw, window=window, method="GET", target="/api/status", body=b"")
    assert why(raw, window=window, method="GET", target="/api/status",
               body=b"").startswith("replayed: request ")
    # a state-changing request's id reused for another intent is a replay too
    verify(signed(nonce="n-0000002"), window=window)
    other = signed(nonce="n-0000002", body=BODY + b" ")
    assert why(other, window=window, body=BODY + b" ").startswith("replayed: request ")


def test_the_same_state_changing_request_again_is_a_resubmission() -> None:
    """Signed again under its request id (the first answer was lost), the same intent
    is let through and marked; the ledger gives it the first one's outcome."""
    window = ReplayWindow()
    first = verify(signed(nonce="n-0000003"), window=window)
    again = verify(signed(nonce="n-0000003", at=NOW + 60), window=window, now=NOW + 60)
    assert not first.resubmitted and again.resubmitted  # type: ignore[attr-defined]
    assert first.nonce == again.nonce  # type: ignore[attr-defined]


def test_a_refused_request_does_not_use_up_its_nonce() -> None:
    window = ReplayWindow()
    with pytest.raises(AuthError):
        verify(signed("vic", nonce="n-0000001"), window=window, need=Role.ADMIN)
    verify(signed("vic", nonce="n-0000001"), window=window, need=Role.VIEWER)
    assert ("vic", "n-0000001") in window


def test_the_replay_window_forgets_what_has_expired_and_is_bounded() -> None:
    window = ReplayWindow(capacity=2)
    window.add("oli", "a-000001", NOW, NOW)
    window.add("oli", "b-000001", NOW + 1, NOW + 1)
    with pytest.raises(AuthError, match="2 requests within the last 300 s"):
        window.add("oli", "c-000001", NOW + 2, NOW + 2)
    window.add("oli", "c-000001", NOW + FRESHNESS_WINDOW + 0.5, NOW + FRESHNESS_WINDOW + 0.5)
    assert ("oli", "a-000001") not in window and len(window) == 2


def test_roles_of_the_routes() -> None:
    assert required_role("GET", "/health") is None and required_role("GET", "/ready") is None
    assert required_role("GET", "/api/status") is Role.VIEWER
    assert required_role("GET", "/metrics") is Role.VIEWER
    assert required_role("POST", "/api/vms") is Role.OPERATOR
    assert required_role("DELETE", "/api/vms/web1") is Role.OPERATOR
    assert required_role("POST", "/api/migrations/m1/cancel") is Role.OPERATOR
    assert required_role("POST", "/api/policy") is Role.ADMIN
    assert required_role("PUT", "/anything") is Role.ADMIN  # fail closed
    assert required_role("POST", "/api/vmsx") is Role.ADMIN


def test_the_header_round_trips_and_refuses_junk() -> None:
    raw = signed()
    assert decode_header(encode_header(raw)) == raw
    with pytest.raises(AuthError, match="not base64url"):
        decode_header("a")
    with pytest.raises(AuthError, match="characters, over"):
        decode_header("A" * 10_000)


def test_a_nonce_outside_the_alphabet_is_refused_when_signing() -> None:
    with pytest.raises(ValueError, match="nonce"):
        signed(nonce="has space")


# --------------------------------------------------------------------------- decoders


@settings(max_examples=300)
@given(st.binary(max_size=600))
def test_any_bytes_are_refused_with_auth_error_only(data: bytes) -> None:
    with pytest.raises(AuthError):
        verify(data)


_GOOD = signed(nonce="fixed-0000001")


@settings(max_examples=300)
@given(st.integers(0, len(_GOOD) - 1), st.integers(1, 255))
def test_every_changed_byte_of_a_signed_request_is_refused(pos: int, flip: int) -> None:
    bad = bytearray(_GOOD)
    bad[pos] ^= flip
    with pytest.raises(AuthError):
        verify(bytes(bad))


@settings(max_examples=200)
@given(for_class(SignedRequest), for_class(RequestHead))
def test_well_formed_frames_of_any_content_are_refused_with_auth_error(
    outer: SignedRequest, head: RequestHead,
) -> None:
    # a frame with the head of someone else's request inside, and a random one
    for frame in (outer, SignedRequest(outer.operator, wire.encode(head), outer.signature)):
        with pytest.raises(AuthError):
            verify(wire.encode(frame))


def test_operator_keys_on_disk(tmp_path: Path) -> None:
    from federation.api.auth import load_operator_key, write_operator_key

    path = tmp_path / "oli.key"
    write_operator_key(path, KEYS["oli"])
    got = load_operator_key(path, FED)
    assert got.name == "oli" and got.identity.seed == KEYS["oli"].seed
