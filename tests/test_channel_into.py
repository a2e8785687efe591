"""The secure channel's buffer API: ``send_into`` / ``receive_frame_into`` make the same
frames as ``send`` / ``receive_frame``, refuse tampering the same way, and refuse a
buffer too small without moving the stream."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.channel import (
    FRAME_OVERHEAD,
    MAX_PLAINTEXT,
    ChannelError,
    Closed,
    Data,
    FrameReader,
    SecureChannel,
    frame,
)
from tests.harness.channels import open_pair, pair

PAYLOADS = (b"first message", b"", b"third" * 20, bytes(range(256)) * 100)


def sealed(channel: SecureChannel, payload: bytes, slack: int = 7) -> bytes:
    """One frame made by send_into, in a buffer larger than needed and at an offset."""
    buf = bytearray(b"\xee" * (4 + len(payload) + FRAME_OVERHEAD + slack))
    n = channel.send_into(payload, memoryview(buf)[4:])
    assert n == len(payload) + FRAME_OVERHEAD
    assert buf[:4] == b"\xee" * 4 and buf[4 + n :] == b"\xee" * slack  # nothing else written
    return bytes(buf[4 : 4 + n])


def test_send_into_frames_are_what_receive_frame_accepts() -> None:
    a, b = open_pair()
    for payload in PAYLOADS:
        assert b.receive_frame(sealed(a, payload)) == [Data(payload)]
    assert b.receive_frame(a.close()) == [Closed()]
    b.end_of_stream()


def test_receive_frame_into_opens_what_send_makes() -> None:
    a, b = open_pair()
    out = bytearray(b"\xee" * 30000)
    for payload in PAYLOADS:
        n = b.receive_frame_into(memoryview(bytearray(a.send(payload))), out)
        assert n == len(payload) and out[:n] == payload
        assert out[25600:] == b"\xee" * 4400  # only the plaintext's bytes are written
    assert b.receive_frame_into(a.close(), out) == Closed()
    b.end_of_stream()


def into_stream() -> tuple[SecureChannel, list[bytes]]:
    a, b = open_pair(seed=9)
    return b, [sealed(a, p) for p in PAYLOADS[:3]] + [a.close()]


def test_every_flipped_byte_of_a_send_into_stream_is_refused_by_receive_frame_into() -> None:
    b, frames = into_stream()
    out = bytearray(4096)
    assert [b.receive_frame_into(f, out) for f in frames] == [13, 0, 100, Closed()]
    length = len(b"".join(frame(f) for f in frames))
    for pos in range(length):
        b, frames = into_stream()
        damaged = bytearray(b"".join(frame(f) for f in frames))
        damaged[pos] ^= 0x01
        with pytest.raises(ChannelError) as err:
            for f in FrameReader().feed(bytes(damaged)):
                b.receive_frame_into(f, out)
            b.end_of_stream()
        assert err.value.reason in ("tampered", "truncated", "oversized", "malformed")
        # refused, and dead from then on (an oversized length is the reader's refusal)
        assert err.value.reason == "oversized" or not b.is_open


def test_a_too_small_buffer_is_refused_and_the_stream_does_not_move() -> None:
    a, b = open_pair()
    payload = b"x" * 100
    with pytest.raises(ValueError, match="out buffer of 116 bytes, the frame needs 117"):
        a.send_into(payload, bytearray(len(payload) + FRAME_OVERHEAD - 1))
    with pytest.raises(BufferError):
        a.send_into(payload, bytes(len(payload) + FRAME_OVERHEAD))  # not writable
    f = sealed(a, payload)  # the refused calls did not advance the sender's stream
    with pytest.raises(ValueError, match="out buffer of 99 bytes"):
        b.receive_frame_into(f, bytearray(99))
    out = bytearray(100)
    assert b.is_open and b.receive_frame_into(f, out) == 100 and out == payload


def test_the_buffer_api_keeps_the_channel_rules() -> None:
    a, b = pair()
    with pytest.raises(ChannelError) as err:
        a.send_into(b"early", bytearray(64))
    assert err.value.reason == "closed"
    with pytest.raises(ChannelError) as err:
        b.receive_frame_into(b"\x00" * 40, bytearray(64))  # no handshake yet
    assert err.value.reason == "malformed" and not b.is_open
    a, b = open_pair()
    with pytest.raises(ChannelError) as err:
        a.send_into(memoryview(bytes(MAX_PLAINTEXT + 1)), bytearray(16))
    assert err.value.reason == "oversized"
    b.receive_frame_into(a.close(), bytearray(0))
    with pytest.raises(ChannelError) as err:
        a.send_into(b"late", bytearray(64))
    assert err.value.reason == "closed"
    with pytest.raises(ChannelError) as err:
        b.receive_frame_into(b"\x00" * 40, bytearray(64))
    assert err.value.reason == "malformed"  # data after the peer's final frame


@given(st.lists(st.binary(max_size=600), max_size=4))
def test_arbitrary_frames_into_receive_frame_into_give_only_channel_error(
    frames: list[bytes],
) -> None:
    _, b = open_pair()
    out = bytearray(600)
    for f in frames:
        try:
            b.receive_frame_into(f, out)
        except ChannelError:
            return
