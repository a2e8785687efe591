"""consensus.request_frames: the hand readers of an operator's signed request take a frame
only where wire.decode takes it, as the same message, and the digest made from the head's
bytes is the digest of the head encoded again."""

from __future__ import annotations

import math
import struct

import cbor2
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

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
    request_digest,
)
from consensus.ledger import ImportVm
from mesh import identity, wire

OPS = identity.Identity.from_seed(b"\x31" * 32)
TABLE = OperatorTable.of("frames", [Operator("ops", OPS.public, Role.OPERATOR)])

texts = st.text(max_size=80)
nonces = st.text(alphabet="abcdefXYZ019._-", min_size=8, max_size=64)
floats = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(width=16, allow_nan=False, allow_infinity=False),
    st.floats(width=32, allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, -0.0, 1.0, 65504.0, 65520.0, 3.4028234663852886e38, 5.96e-08,
                     1.401298464324817e-45, 2.0**-149, 2.0**-150, 1_790_000_000.25]),
)


@st.composite
def heads(draw: st.DrawFn) -> RequestHead:
    return RequestHead(draw(st.text(max_size=64)), draw(st.text(max_size=64)),
                       draw(st.text(max_size=16)), draw(st.text(max_size=300)),
                       draw(st.binary(min_size=32, max_size=32)), draw(floats), draw(nonces))


def _decoded(data: bytes, cls: type) -> object | None:
    try:
        return wire.decode(data, expect=(cls,))
    except wire.WireError:
        return None


def _mutations(data: bytes, draw: st.DrawFn) -> bytes:
    """``data`` with one random byte changed, inserted, removed, or cut short."""
    how = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "append"]))
    i = draw(st.integers(0, max(0, len(data) - 1)))
    if how == "flip":
        return data[:i] + bytes((data[i] ^ (1 << draw(st.integers(0, 7))),)) + data[i + 1:]
    if how == "set":
        return data[:i] + bytes((draw(st.integers(0, 255)),)) + data[i + 1:]
    if how == "insert":
        return data[:i] + bytes((draw(st.integers(0, 255)),)) + data[i:]
    if how == "delete":
        return data[:i] + data[i + 1:]
    if how == "truncate":
        return data[:i]
    return data + bytes((draw(st.integers(0, 255)),))


def _check_head(data: bytes) -> None:
    fast = request_frames.read_head(data)
    slow = _decoded(data, RequestHead)
    if fast is not None:
        assert RequestHead(*fast) == slow
        assert slow is not None and wire.encode(slow) == data


def _check_signed(data: bytes) -> None:
    fast = request_frames.read_signed(data)
    slow = _decoded(data, SignedRequest)
    if fast is not None:
        assert SignedRequest(*fast) == slow
        assert slow is not None and wire.encode(slow) == data


@given(heads())
def test_a_valid_head_is_read_as_wire_decodes_it(head: RequestHead) -> None:
    data = wire.encode(head)
    got = request_frames.read_head(data)
    assert got is not None and RequestHead(*got) == wire.decode(data)


@given(heads(), st.data())
def test_a_mutated_head_is_read_only_where_wire_decode_takes_it(
        head: RequestHead, data: st.DataObject) -> None:
    _check_head(_mutations(wire.encode(head), data.draw))


@given(st.text(max_size=70), st.binary(max_size=300), st.binary(min_size=64, max_size=64),
       st.data())
def test_signed_frames_valid_and_mutated(operator: str, head: bytes, signature: bytes,
                                         data: st.DataObject) -> None:
    assume(len(operator) <= 64)
    raw = wire.encode(SignedRequest(operator, head, signature))
    got = request_frames.read_signed(raw)
    assert got is not None and SignedRequest(*got) == wire.decode(raw)
    _check_signed(_mutations(raw, data.draw))


@pytest.mark.parametrize("value", [1.0, 0.5, 65504.0, -2.0, 0.0])
def test_a_float_wider_than_its_shortest_form_is_left_to_wire_decode(value: float) -> None:
    """1.0 as a single or a double is not canonical: the reader declines, wire.decode
    refuses it with its own message."""
    head = RequestHead("f", "ops", "POST", "t", b"\x00" * 32, value, "nonce-0001")
    canonical = wire.encode(head)
    half = b"\xf9" + struct.pack(">e", value)
    assert half in canonical
    for wide in (b"\xfa" + struct.pack(">f", value), b"\xfb" + struct.pack(">d", value)):
        data = canonical.replace(half, wide)
        assert request_frames.read_head(data) is None
        with pytest.raises(wire.WireError, match="canonical"):
            wire.decode(data, expect=(RequestHead,))


@given(floats)
def test_the_canonical_width_is_cbor2s(value: float) -> None:
    assert 1 + request_frames.canonical_float_width(value) == len(
        cbor2.dumps(value, canonical=True))


@given(heads())
def test_the_undated_digest_from_bytes_is_the_digest_of_the_head_encoded_again(
        head: RequestHead) -> None:
    data = wire.encode(head)
    assert request_frames.undated_digest(data, head.created, head.nonce) == request_digest(head)


def test_non_finite_created_goes_to_wire_decode_which_refuses_it() -> None:
    for value in (math.inf, -math.inf, math.nan):
        fields = ["f", "ops", "POST", "t", b"\x00" * 32, value, "nonce-0001"]
        data = cbor2.dumps([wire.FRAME_VERSION, RequestHead.wire_tag, fields], canonical=True)  # type: ignore[attr-defined]
        assert request_frames.read_head(data) is None
        with pytest.raises(wire.WireError, match="finite float"):
            wire.decode(data, expect=(RequestHead,))


def test_a_frame_with_a_non_minimal_length_is_refused_as_before() -> None:
    """A text length written in two bytes where one would do: not canonical; opening it
    gives the refusal wire.decode gives."""
    a = authorize(OPS, "frames", "ops", ImportVm("vm1", "dc-a", "/m"), 1e9, "frames-0001")
    raw = a.request
    prefix = wire.encode(SignedRequest("", b"", b"\x00" * 64))[:-68]
    assert raw.startswith(prefix + b"\x63ops")
    padded = prefix + b"\x78\x03ops" + raw[len(prefix) + 4:]
    assert request_frames.read_signed(padded) is None
    with pytest.raises(AuthError) as err:
        open_authorization(TABLE, Authorization(padded, a.body))
    assert err.value.reason == "malformed"
    assert "not a signed operator request" in str(err.value)


def _frame(tag: str, fields: list[object]) -> bytes:
    return cbor2.dumps([wire.FRAME_VERSION, tag, fields], canonical=True)


HEAD = ["f", "ops", "POST", "t", b"\x00" * 32, 1.5, "nonce-0001"]


@pytest.mark.parametrize("index,value", [
    (0, "f" * 65), (1, "o" * 65), (2, "M" * 17), (3, "t" * 1025), (4, b"\x00" * 31),
    (4, b"\x00" * 33), (4, "not bytes"), (5, 1), (6, "n" * 65), (6, b"nonce-0001"),
])
def test_a_head_field_out_of_its_limits_is_left_to_wire_decode(index: int,
                                                               value: object) -> None:
    fields = list(HEAD)
    fields[index] = value
    data = _frame(RequestHead.wire_tag, fields)  # type: ignore[attr-defined]
    assert request_frames.read_head(data) is None
    with pytest.raises(wire.WireError):
        wire.decode(data, expect=(RequestHead,))


@pytest.mark.parametrize("fields", [
    ["o" * 65, b"h", b"\x00" * 64], ["ops", b"h" * 1889, b"\x00" * 64],
    ["ops", b"h", b"\x00" * 63], ["ops", b"h", b"\x00" * 65], ["ops", "h", b"\x00" * 64],
    ["ops", b"h"], ["ops", b"h", b"\x00" * 64, b""],
])
def test_a_signed_request_out_of_its_limits_is_left_to_wire_decode(fields: list[object]
                                                                   ) -> None:
    data = _frame(SignedRequest.wire_tag, fields)  # type: ignore[attr-defined]
    assert request_frames.read_signed(data) is None
    with pytest.raises(wire.WireError):
        wire.decode(data, expect=(SignedRequest,))
