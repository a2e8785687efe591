"""The secure channel core: handshake, refusals, and tampering of every byte."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh import identity, versions
from mesh.channel import (
    ChannelError,
    Closed,
    Data,
    FrameReader,
    HandshakeComplete,
    SecureChannel,
    frame,
)
from tests.harness.channels import KEYS, PEERS, handshake, open_pair, pair


def test_handshake_opens_both_ways_with_the_highest_common_version() -> None:
    a, b = pair(versions_a=(1, 3), versions_b=(1, 3))
    ea, eb = handshake(a, b)
    assert ea == [HandshakeComplete("b", 3, (1, 3))] and eb == [HandshakeComplete("a", 3, (1, 3))]
    for payload in (b"", b"x", bytes(range(256)) * 100):
        assert b.receive_frame(a.send(payload)) == [Data(payload)]
        assert a.receive_frame(b.send(payload)) == [Data(payload)]
    assert b.receive_frame(a.close()) == [Closed()]
    b.end_of_stream()  # a clean close is not a truncation


def test_version_negotiation() -> None:
    a, b = pair(versions_a=(1,), versions_b=(1, 3))
    ea, eb = handshake(a, b)
    # each end keeps the other's whole offer, not only the version they agreed on
    assert ea == [HandshakeComplete("b", 1, (1, 3))] and eb == [HandshakeComplete("a", 1, (1,))]
    assert a.peer_versions == (1, 3) and b.peer_versions == (1,)
    # a version neither end knows is kept in the offer and never chosen
    a, b = pair(versions_a=(1, 3, 200), versions_b=(1, 3, 200))
    ea, _ = handshake(a, b)
    assert ea == [HandshakeComplete("b", 3, (1, 3, 200))]
    a, b = pair(versions_a=(3,), versions_b=(1,))
    with pytest.raises(ChannelError) as err:
        handshake(a, b)
    assert err.value.reason == "version_mismatch"


def test_a_capability_is_used_only_when_both_offers_list_it() -> None:
    """Capabilities (mesh.versions.CAPABILITY_MIN up) ride in the signed offer: a peer
    that does not know one keeps it and never chooses it as a transfer version."""
    sealed = versions.AMST_SEALED
    assert sealed >= versions.CAPABILITY_MIN and sealed not in versions.KNOWN
    for offer_a, offer_b, both in (((1, 3, sealed), (1, 3, sealed), True),
                                   ((1, 3, sealed), (1, 3), False),
                                   ((1, 3), (3, sealed), False)):  # fmt: skip
        a, b = pair(versions_a=offer_a, versions_b=offer_b)
        handshake(a, b)
        assert a.version == b.version == 3  # the capability is never a transfer version
        assert versions.both_offer(sealed, a.versions, a.peer_versions) is both
        assert versions.both_offer(sealed, b.versions, b.peer_versions) is both
    with pytest.raises(AssertionError):
        versions.both_offer(3, (3,), (3,))  # a transfer version is not a capability


def test_wrong_federation_is_refused() -> None:
    a, b = pair(fed_a="other", fed_b="fed")
    with pytest.raises(ChannelError) as err:
        handshake(a, b)
    assert err.value.reason == "wrong_federation"
    assert "other" in str(err.value)


def test_unknown_key_is_refused() -> None:
    # "a" signs with a key the federation does not list for it: b names both keys
    other = identity.Identity.from_seed(b"\x99" * 32)
    a, b = pair(ident_a=other)
    with pytest.raises(ChannelError) as err:
        handshake(a, b)
    assert err.value.reason == "key_mismatch"
    assert err.value.detail == (f"a presents key {other.public}, the federation file says "
                                f"{PEERS['a']}")
    # a name that is not in the federation at all
    a, b = pair(peers_b={"b": PEERS["b"], "c": PEERS["c"]})
    with pytest.raises(ChannelError) as err:
        handshake(a, b)
    assert err.value.reason == "unknown_peer"


def test_impersonating_responder_is_refused() -> None:
    # "c" answers a dial meant for "b"
    a = SecureChannel(
        identity=KEYS["a"],
        name="a",
        federation="fed",
        peers=PEERS,
        versions=(1, 3),
        initiator=True,
        peer="b",
    )
    c = SecureChannel(
        identity=KEYS["c"],
        name="c",
        federation="fed",
        peers=PEERS,
        versions=(1, 3),
        initiator=False,
    )
    with pytest.raises(ChannelError) as err:
        handshake(a, c)
    assert err.value.reason == "unknown_peer"


def record_handshake(seed: int) -> list[bytes]:
    a, b = pair(seed)
    frames: list[bytes] = []

    def keep(_: int, f: bytes) -> bytes:
        frames.append(f)
        return f

    handshake(a, b, keep)
    return frames


def test_replayed_handshake_is_refused() -> None:
    hello, welcome, finish = record_handshake(1)
    # Replay the initiator's frames to a fresh responder: its Welcome has a new
    # nonce and key, so the recorded Finish no longer verifies.
    _, b = pair(2)
    assert b.receive_frame(hello) == []
    with pytest.raises(ChannelError) as err:
        b.receive_frame(finish)
    assert err.value.reason == "bad_signature"
    # Replay the responder's Welcome to a fresh initiator.
    a, _ = pair(3)
    with pytest.raises(ChannelError) as err:
        a.receive_frame(welcome)
    assert err.value.reason == "bad_signature"


def test_every_flipped_byte_of_a_handshake_is_refused() -> None:
    recorded = record_handshake(7)
    flips = 0
    for index, original in enumerate(recorded):
        for pos in range(len(original)):
            a, b = pair(7)

            def mutate(
                i: int, f: bytes, index: int = index, pos: int = pos, original: bytes = original
            ) -> bytes:
                if i != index:
                    return f
                assert len(f) == len(original)  # same shape as the recording
                out = bytearray(f)
                out[pos] ^= 0x01
                return bytes(out)

            with pytest.raises(ChannelError):
                handshake(a, b, mutate)
            assert not (a.is_open and b.is_open)
            flips += 1
    assert flips > 400


def fresh_stream() -> tuple[SecureChannel, list[bytes]]:
    """A receiver and the data frames its peer sent it (libsodium draws each stream's
    header itself, so a recording only decrypts on the channel it was made for)."""
    a, b = open_pair()
    return b, [a.send(b"first message"), a.send(b""), a.send(b"third" * 20), a.close()]


def test_an_untouched_stream_is_accepted() -> None:
    b, frames = fresh_stream()
    events = [e for f in frames for e in b.receive_frame(f)]
    assert events == [Data(b"first message"), Data(b""), Data(b"third" * 20), Closed()]
    b.end_of_stream()


def test_every_flipped_byte_of_a_data_stream_is_refused() -> None:
    length = len(b"".join(frame(f) for f in fresh_stream()[1]))
    for pos in range(length):
        b, frames = fresh_stream()
        damaged = bytearray(b"".join(frame(f) for f in frames))
        damaged[pos] ^= 0x01
        reader = FrameReader()
        with pytest.raises(ChannelError) as err:
            for f in reader.feed(bytes(damaged)):
                b.receive_frame(f)
            b.end_of_stream()
        assert err.value.reason in ("tampered", "truncated", "oversized", "malformed")


def test_truncated_reordered_and_replayed_streams_are_refused() -> None:
    b, (first, second, third, final) = fresh_stream()
    b.receive_frame(first)
    with pytest.raises(ChannelError) as err:
        b.end_of_stream()
    assert err.value.reason == "truncated"
    b, (first, second, third, final) = fresh_stream()
    with pytest.raises(ChannelError) as err:
        b.receive_frame(second)
    assert err.value.reason == "tampered"
    b, (first, second, third, final) = fresh_stream()
    b.receive_frame(first)
    with pytest.raises(ChannelError) as err:
        b.receive_frame(first)
    assert err.value.reason == "tampered"
    b, (first, second, third, final) = fresh_stream()
    for f in (first, second, third, final):
        b.receive_frame(f)
    with pytest.raises(ChannelError):
        b.receive_frame(third)


def test_a_dead_channel_stays_dead() -> None:
    a, b = open_pair()
    good = a.send(b"ok")
    with pytest.raises(ChannelError):
        b.receive_frame(b"\x00" * 40)
    with pytest.raises(ChannelError):
        b.receive_frame(good)


@given(st.binary(max_size=1200))
def test_arbitrary_bytes_into_a_responder_give_only_channel_error(data: bytes) -> None:
    _, b = pair()
    try:
        b.receive_frame(data)
    except ChannelError:
        pass


@given(st.binary(max_size=1200))
def test_arbitrary_bytes_into_an_initiator_give_only_channel_error(data: bytes) -> None:
    a, _ = pair()
    try:
        a.receive_frame(data)
    except ChannelError:
        pass


@given(st.lists(st.binary(max_size=600), max_size=4))
def test_arbitrary_frames_into_an_open_channel_give_only_channel_error(frames: list[bytes]) -> None:
    _, b = open_pair()
    for f in frames:
        try:
            b.receive_frame(f)
        except ChannelError:
            return


@given(st.binary(max_size=600), st.integers(1, 64))
def test_frame_reader_splits_any_chunking(payload: bytes, step: int) -> None:
    stream = frame(payload) + frame(payload[::-1])
    reader = FrameReader()
    out = []
    for i in range(0, len(stream), step):
        out += reader.feed(stream[i : i + step])
    assert out == [payload, payload[::-1]] and reader.pending == 0


def test_frame_reader_refuses_oversized_frames() -> None:
    with pytest.raises(ChannelError) as err:
        FrameReader(max_frame=100).feed((101).to_bytes(4, "big"))
    assert err.value.reason == "oversized"
