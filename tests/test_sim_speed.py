"""The simulator's speedups change no run (issue 14: affordable 10,000-seed sweeps).

Pinned trace hashes of a few seeds of each safety-sweep family, as main computed them
before the speedups (e27764f); the full check over 900 runs is
``python -m bench.sim_hashes --compare FILE``. And the decode memo the simulator turns
on (``mesh.wire.enable_decode_memo``) gives what the plain decoder gives.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh import wire
from mesh.wire import Bytes, Text, WireError, field
from sim.scenarios import run_scenario

# (family, nodes, seed, trace hash on main at e27764f)
PINNED = [
    ("pbft-crashpoints", 4, 0, "56138f69996c3e1eee4e0fe69938b71b"),
    ("pbft-crashpoints", 4, 3, "08582ca14b81f337155dbad18fbec95e"),
    ("pbft-swarm", 4, 1, "b2d961f142dac0fb47b2d3e3cd8dee04"),
    ("pbft-swarm", 4, 2, "a4550b584e531eca653e19af3b7c44ea"),
    ("migration-chaos", None, 1, "2cf82ccbd9840543a340dd4ce3a84706"),
]


@pytest.mark.parametrize(("family", "nodes", "seed", "trace_hash"), PINNED)
def test_sweep_runs_keep_their_trace(family: str, nodes: int | None, seed: int,
                                     trace_hash: str) -> None:
    result = run_scenario(family, seed, nodes)
    assert result.ok, result.violations
    assert result.trace_hash == trace_hash


@wire.message("test.memo-a", max_size=4096)
class MemoA:
    name: str = field(Text(64))
    data: bytes = field(Bytes(1024))


@wire.message("test.memo-b", max_size=4096)
class MemoB:
    name: str = field(Text(64))


@pytest.fixture
def memo() -> Iterator[None]:
    wire.enable_decode_memo(4)
    try:
        yield
    finally:
        wire.enable_decode_memo(0)


def test_memo_returns_the_same_message(memo: None) -> None:
    raw = wire.encode(MemoA("x", b"\x01\x02"))
    first = wire.decode(raw)
    assert first == MemoA("x", b"\x01\x02")
    assert wire.decode(bytearray(raw)) is first


def test_memo_hit_still_obeys_expect(memo: None) -> None:
    raw = wire.encode(MemoA("x", b""))
    wire.decode(raw)
    with pytest.raises(WireError):
        wire.decode(raw, expect=(MemoB,))
    assert wire.decode(raw, expect=(MemoA,)) == MemoA("x", b"")


def test_memo_is_bounded_and_keeps_no_failures(memo: None) -> None:
    frames = [wire.encode(MemoB(f"n{i}")) for i in range(10)]
    for raw in frames:
        wire.decode(raw)
    assert len(wire._memo or {}) == 4  # the oldest went first
    assert set(wire._memo or {}) == set(frames[-4:])
    bad = frames[0][:-1]
    for _ in range(2):
        with pytest.raises(WireError):
            wire.decode(bad)
    assert bad not in (wire._memo or {})


def test_memo_off_decodes_afresh() -> None:
    wire.enable_decode_memo(0)
    raw = wire.encode(MemoB("y"))
    assert wire.decode(raw) is not wire.decode(raw)


@given(st.binary(max_size=64) | st.builds(lambda n, d: wire.encode(MemoA(n, d)),
                                          st.text(max_size=8), st.binary(max_size=16)))
def test_memo_decodes_as_the_plain_decoder(raw: bytes) -> None:
    def outcome() -> object:
        try:
            return wire.decode(raw)
        except WireError as exc:
            return ("error", str(exc))

    wire.enable_decode_memo(0)
    plain = outcome()
    wire.enable_decode_memo(16)
    try:
        assert outcome() == plain
        assert outcome() == plain  # a hit, if it decoded
    finally:
        wire.enable_decode_memo(0)
