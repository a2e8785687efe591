"""The wire codec: every registered type round-trips, and no bytes make the decoder
raise anything but WireError or allocate beyond the frame."""

from __future__ import annotations

import struct

import cbor2
import pytest
from hypothesis import given, reject
from hypothesis import strategies as st

from mesh import wire
from mesh.wire import U64, Bytes, ListOf, Optional, Struct, Text, WireError, field
from tests.harness.wire_strategies import for_class, import_all_messages


@wire.struct_type
class _Point:
    x: int = field(U64(1000))
    label: str = field(Text(8))


@wire.message("test.sample", max_size=4096)
class _Sample:
    id: int = field(U64())
    name: str = field(Text(16))
    blob: bytes = field(Bytes(64))
    points: tuple[_Point, ...] = field(ListOf(Struct(_Point), 4))
    note: str | None = field(Optional(Text(8)))


ALL_TYPES = import_all_messages()


def test_registry_holds_every_type() -> None:
    assert _Sample in ALL_TYPES
    assert len({cls.wire_tag for cls in ALL_TYPES}) == len(ALL_TYPES)


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda c: c.wire_tag)
def test_every_message_type_round_trips(cls: type) -> None:
    @given(for_class(cls))
    def round_trip(msg: object) -> None:
        try:
            data = wire.encode(msg)
        except WireError:
            reject()  # a generated value over the type's own size limit
        assert wire.decode(data) == msg
        # canonical: encoding is a function of the value
        assert wire.encode(wire.decode(data)) == data

    round_trip()


@given(st.binary(max_size=2048))
def test_arbitrary_bytes_give_only_wire_error(data: bytes) -> None:
    try:
        wire.decode(data)
    except WireError:
        pass


@given(st.data())
def test_mutated_valid_frames_give_only_wire_error(data: st.DataObject) -> None:
    cls = data.draw(st.sampled_from(ALL_TYPES))
    msg = data.draw(for_class(cls))
    try:
        frame = bytearray(wire.encode(msg))
    except WireError:
        reject()
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(0, len(frame) - 1)))
        if op == "flip" and frame:
            frame[pos] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del frame[pos:]
        else:
            frame[pos:pos] = data.draw(st.binary(min_size=1, max_size=9))
    try:
        out = wire.decode(bytes(frame))
    except WireError:
        return
    assert type(out) in ALL_TYPES


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.binary(max_size=20) | st.text(max_size=20),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=4), children, max_size=4)
        ),
        max_leaves=30,
    )
)
def test_arbitrary_cbor_values_give_only_wire_error(value: object) -> None:
    for candidate in (value, [1, "test.sample", value], [1, "test.sample", [value] * 5]):
        try:
            wire.decode(cbor2.dumps(candidate))
        except WireError:
            pass


def test_deep_nesting_is_refused_without_recursion() -> None:
    deep = b"\x81" * 100_000 + b"\x00"
    with pytest.raises(WireError, match="nesting"):
        wire.decode(deep)


def test_length_claims_beyond_the_frame_are_refused() -> None:
    # a byte string claiming 2**62 bytes, and an array claiming 2**32 items
    with pytest.raises(WireError, match="past the end"):
        wire.decode(b"\x5b" + (2**62).to_bytes(8, "big"))
    with pytest.raises(WireError, match="more items"):
        wire.decode(b"\x9a" + (2**32 - 1).to_bytes(4, "big"))


@pytest.mark.parametrize(
    "data, reason",
    [
        (cbor2.dumps([1, "test.sample", [1, "a", b"", [], None]]) + b"\x00", "trailing"),
        (b"\x9f\xff", "indefinite"),
        (b"\xc1\x00", "tags"),
        (b"\xf7", "simple value"),
        (b"\x18\x05", "non-canonical"),
        (cbor2.dumps([2, "test.sample", []]), "version"),
        (cbor2.dumps([1, "no.such", []]), "unknown message type"),
        (cbor2.dumps([1, "test.sample", [1, "a", b""]]), "fields"),
        (cbor2.dumps([1, "test.sample", [-1, "a", b"", [], None]]), "test.sample.id"),
        (cbor2.dumps([1, "test.sample", [1, "a" * 17, b"", [], None]]), "test.sample.name"),
        (cbor2.dumps([1, "test.sample", [1, "a", b"x" * 65, [], None]]), "test.sample.blob"),
        (
            cbor2.dumps([1, "test.sample", [1, "a", b"", [[1, "p"]] * 5, None]]),
            "test.sample.points",
        ),
        (cbor2.dumps([1, "test.sample", [1, "a", b"", [[1001, "p"]], None]]), r"points\[0\].x"),
        (cbor2.dumps([1, "test.sample", [1, "a", b"", [], 7]]), "test.sample.note"),
        (cbor2.dumps([1, "test.sample", [1.0, "a", b"", [], None]]), "test.sample.id"),
        (cbor2.dumps([1, "test.sample", [True, "a", b"", [], None]]), "test.sample.id"),
        (b"\x63\xff\xfe\xfd", "UTF-8"),
    ],
)
def test_errors_say_what_is_wrong(data: bytes, reason: str) -> None:
    with pytest.raises(WireError, match=reason):
        wire.decode(data)


def test_non_canonical_frames_are_refused() -> None:
    @wire.message("test.map")
    class WithMap:
        pairs: tuple[tuple[str, int], ...] = field(wire.MapOf(Text(4), U64(), 4))
        ratio: float = field(wire.Float())

    msg = WithMap({"a": 1, "b": 2}, 1.5)
    data = wire.encode(msg)
    assert wire.decode(data) == msg
    swapped = data.replace(b"\x61a\x01\x61b\x02", b"\x61b\x02\x61a\x01")
    assert swapped != data
    with pytest.raises(WireError, match="canonical"):
        wire.decode(swapped)
    wide = cbor2.dumps([1, "test.map", [{"a": 1, "b": 2}, 1.5]], canonical=False)
    wide = wide.replace(b"\xf9\x3e\x00", b"\xfb" + struct.pack(">d", 1.5))
    with pytest.raises(WireError, match="canonical"):
        wire.decode(wide)


def test_per_type_size_limit() -> None:
    @wire.message("test.tiny", max_size=16)
    class Tiny:
        blob: bytes = field(Bytes(100))

    with pytest.raises(WireError, match="exceeds 16"):
        wire.encode(Tiny(b"x" * 40))
    with pytest.raises(WireError, match="exceeds 16"):
        wire.decode(cbor2.dumps([1, "test.tiny", [b"x" * 40]]))


def test_expect_restricts_types() -> None:
    data = wire.encode(_Sample(1, "a", b"", (), None))
    with pytest.raises(WireError, match="unexpected message type"):
        wire.decode(data, expect=(_Point,))


def test_unregistered_objects_cannot_be_encoded() -> None:
    with pytest.raises(WireError, match="not a registered"):
        wire.encode(object())


def test_a_tag_cannot_be_registered_twice() -> None:
    with pytest.raises(ValueError, match="already registered"):

        @wire.message("test.sample")
        class Other:
            x: int = field(U64())


# --------------------------------------------------------------------------- bulk frames
# A long byte string that ends a frame is written and read by hand (wire.TAIL_MIN), not by
# cbor2: the frame must be byte for byte the one cbor2 writes, and read as strictly.


@wire.message("test.bulk", max_size=(1 << 21) + 64)
class _Bulk:
    id: int = field(U64())
    tag4: bytes = field(Bytes(4, exact=True))
    payload: bytes = field(Bytes(1 << 21))


@wire.message("test.bulk-nested", max_size=(1 << 22) + 64)
class _BulkNested:
    id: int = field(U64())
    parts: tuple[bytes, ...] = field(ListOf(Bytes(1 << 21), 4))


_SIZES = [0, 23, 24, wire.TAIL_MIN - 1, wire.TAIL_MIN, 65535, 65536, (1 << 20) + 3, 1 << 21]


@pytest.mark.parametrize("size", _SIZES)
def test_bulk_frames_are_the_canonical_cbor_and_read_from_a_reused_buffer(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    msg = _Bulk(7, b"abcd", payload)
    frame = wire.encode(msg)
    assert frame == cbor2.dumps([wire.FRAME_VERSION, "test.bulk", [7, b"abcd", payload]],
                                canonical=True)  # fmt: skip
    head, tail = wire.encode_parts(msg)
    assert head + tail == frame
    assert tail is payload if size >= wire.TAIL_MIN else tail == b""  # not copied
    buf = bytearray(frame) + b"spare room"
    got = wire.decode(memoryview(buf)[: len(frame)])
    buf[:] = bytes(len(buf))  # the caller reuses its buffer: the message keeps its bytes
    assert got == msg and type(got.payload) is bytes
    nested = _BulkNested(1, (b"x", payload))
    assert wire.decode(bytearray(wire.encode(nested))) == nested


def test_bulk_frames_keep_every_limit() -> None:
    big = _Bulk(1, b"abcd", bytes(1 << 20))
    frame = wire.encode(big)
    with pytest.raises(WireError, match="exactly 4 bytes"):
        wire.decode(frame.replace(b"Dabcd", b"Cabc", 1))
    with pytest.raises(WireError):  # one byte short of what the payload's head claims
        wire.decode(memoryview(frame)[:-1])
    with pytest.raises(WireError, match="trailing"):
        wire.decode(frame + b"\0")
    with pytest.raises(WireError, match="exceeds"):
        wire.encode(_Bulk(1, b"abcd", bytes((1 << 21) + 1)))
    over = cbor2.dumps([wire.FRAME_VERSION, "test.bulk", [1, b"abcd", bytes((1 << 21) + 1)]])
    with pytest.raises(WireError, match="exceeds"):  # a payload over its field's limit
        wire.decode(over)
    nested = cbor2.dumps([wire.FRAME_VERSION, "test.bulk-nested", [1, [b"x", bytes(1 << 20)]]])
    with pytest.raises(WireError, match="unexpected"):
        wire.decode(nested, expect=(_Bulk,))
    # a trailing string whose head is not minimal is refused, as everywhere
    n = len(big.payload)
    long_head = frame.replace(b"\x5a" + n.to_bytes(4, "big"), b"\x5b" + n.to_bytes(8, "big"), 1)
    with pytest.raises(WireError, match="non-canonical"):
        wire.decode(long_head)


@given(st.data())
def test_mutated_bulk_frames_give_only_wire_error(data: st.DataObject) -> None:
    size = data.draw(st.sampled_from(_SIZES[3:7]))
    msg = _Bulk(data.draw(st.integers(0, 2**64 - 1)), b"abcd", bytes([size % 251]) * size)
    frame = bytearray(wire.encode(msg))
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        last = max(0, len(frame) - 1)
        pos = data.draw(st.integers(0, min(last, 64)) | st.integers(0, last))
        if op == "flip" and frame:
            frame[pos] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del frame[pos:]
        else:
            frame[pos:pos] = data.draw(st.binary(min_size=1, max_size=9))
    try:
        out = wire.decode(memoryview(frame))
    except WireError:
        return
    assert type(out) in (_Bulk, *ALL_TYPES)
