"""The wire decoder's fast path (cbor2's C decoder, a canonical re-encode, a decoder
written out per class) takes exactly the frames the checked path takes, as the same
messages, and a hostile frame makes it build nothing but plain values."""

from __future__ import annotations

import tracemalloc

import cbor2
import pytest
from hypothesis import given, reject
from hypothesis import strategies as st

from mesh import wire
from mesh.wire import WireError
from tests.harness.wire_strategies import for_class, import_all_messages

ALL_TYPES = import_all_messages()


def _outcome(fn: object, data: bytes) -> tuple[str, object]:
    try:
        return "ok", fn(data, None)  # type: ignore[operator]
    except WireError as exc:
        return "refused", str(exc)


def _both(data: bytes) -> None:
    """decode() (fast path first) and the checked path alone agree on ``data``."""
    fast = wire._decode_fast(data, None)
    checked = _outcome(wire._decode_checked, data)
    if fast is not None:
        assert checked == ("ok", fast), "the fast path took a frame the checked path refuses"
    assert _outcome(lambda d, e: wire.decode(d), data) == checked


@given(st.data())
def test_fast_and_checked_paths_agree_on_valid_and_mutated_frames(data: st.DataObject) -> None:
    cls = data.draw(st.sampled_from(ALL_TYPES))
    try:
        frame = bytearray(wire.encode(data.draw(for_class(cls))))
    except WireError:
        reject()
    assert wire._decode_fast(bytes(frame), None) is not None, "a valid frame takes the fast path"
    _both(bytes(frame))
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, max(0, len(frame) - 1)))
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip" and frame:
            frame[pos] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del frame[pos:]
        else:
            frame[pos:pos] = data.draw(st.binary(min_size=1, max_size=9))
        _both(bytes(frame))


@given(st.binary(max_size=512))
def test_fast_and_checked_paths_agree_on_arbitrary_bytes(data: bytes) -> None:
    _both(data)


def test_a_non_canonical_twin_of_a_valid_frame_is_refused_with_the_checked_reason() -> None:
    frame = cbor2.dumps([1, "pbft.prepare", [3, 4, b"\x00" * 32]])
    good = wire.decode(frame)
    # the same value with the view as a two-byte integer head (0x19 0x00 0x03)
    twin = frame.replace(b"\x83\x03\x04", b"\x83\x19\x00\x03\x04", 1)
    assert twin != frame and cbor2.loads(twin) == cbor2.loads(frame)
    assert wire._decode_fast(twin, None) is None
    with pytest.raises(WireError, match="non-canonical"):
        wire.decode(twin)
    assert wire.decode(frame) == good


@pytest.mark.parametrize("tag", [0, 1, 2, 3, 4, 25, 28, 29, 30, 35, 36, 37, 256, 258, 55799])
def test_every_tag_is_refused_before_its_content_is_read(tag: int) -> None:
    # cbor2 would otherwise build a datetime, a bignum, a compiled regular
    # expression, a MIME message, a shared (possibly cyclic) reference, a set...
    for content in ("(a+)+$", b"\x00" * 8, 0, ["x", 1]):
        data = cbor2.dumps([1, "pbft.prepare", cbor2.CBORTag(tag, content)])
        with pytest.raises(cbor2.CBORDecodeError) as caught:
            wire._strict_loads(data)
        assert "tags are not accepted" in str(caught.value.__cause__)
        with pytest.raises(WireError, match="tags"):
            wire.decode(data)


def test_length_claims_past_the_frame_allocate_nothing_on_the_fast_path() -> None:
    claims = [b"\x9b" + (2**40).to_bytes(8, "big"), b"\x5b" + (2**62).to_bytes(8, "big"),
              b"\xbb" + (2**40).to_bytes(8, "big"), b"\x83\x01\x6cpbft.prepare\x9a\xff\xff\xff\xff"]
    tracemalloc.start()
    try:
        for data in claims:
            assert wire._decode_fast(data, None) is None
            with pytest.raises(WireError):
                wire.decode(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes for frames of a few bytes"


def test_deep_nesting_is_refused_on_the_fast_path_without_recursion() -> None:
    deep = b"\x81" * 100_000 + b"\x00"
    assert wire._decode_fast(deep, None) is None
    with pytest.raises(WireError, match="nesting"):
        wire.decode(deep)


def test_written_out_codecs_check_what_the_generic_kinds_check() -> None:
    from consensus.pbft.messages import Prepare

    enc = wire._class_encoder(Prepare)
    dec = wire._class_decoder(Prepare)
    assert dec(enc(Prepare(1, 2, b"\x01" * 32))) == Prepare(1, 2, b"\x01" * 32)
    for bad in ([-1, 2, b"\x01" * 32], [1, 2**64, b"\x01" * 32], [1, 2, b"\x01" * 31],
                [True, 2, b"\x01" * 32], [1, 2, "x" * 32], [1, 2], "not a list"):
        with pytest.raises(wire._Decline):
            dec(bad)
    with pytest.raises(wire._Decline):
        enc(Prepare(1, 2, b"\x01" * 31))


def test_wire_bench_measures_every_frame_it_names() -> None:
    from bench.wire_codec import frames, run

    out = run(passes=1)
    for name, data in frames().items():
        assert out[name]["bytes"] == len(data)
        assert out[name]["decode_us"] > 0 and out[name]["encode_us"] > 0
        assert wire._decode_fast(data, None) is not None, f"{name} takes the fast path"
