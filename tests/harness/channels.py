"""Secure channels for the tests: pairs of channel cores between members a and b of a
federation of three (a, b, c), and the channel factories of AMST's loopback streams
(between s and t)."""

from __future__ import annotations

import random
from collections.abc import Callable

from mesh import identity
from mesh.channel import SecureChannel

KEYS = {
    name: identity.Identity.from_seed(bytes([i + 1]) * 32) for i, name in enumerate(["a", "b", "c"])
}
PEERS = {name: ident.public for name, ident in KEYS.items()}


def seeded(seed: int) -> Callable[[int], bytes]:
    """Deterministic ephemeral keys and nonces, so recorded handshakes replay."""
    rng = random.Random(seed)
    return lambda n: rng.randbytes(n)


def pair(
    seed: int = 1,
    *,
    fed_a: str = "fed",
    fed_b: str = "fed",
    versions_a: tuple[int, ...] = (1, 3),
    versions_b: tuple[int, ...] = (1, 3),
    peers_b: dict | None = None,
    ident_a: identity.Identity | None = None,
) -> tuple[SecureChannel, SecureChannel]:
    """Initiator a and responder b, not yet handshaken."""
    a = SecureChannel(
        identity=ident_a or KEYS["a"],
        name="a",
        federation=fed_a,
        peers=PEERS,
        versions=versions_a,
        initiator=True,
        peer="b",
        random_bytes=seeded(seed),
    )
    b = SecureChannel(
        identity=KEYS["b"],
        name="b",
        federation=fed_b,
        peers=peers_b or PEERS,
        versions=versions_b,
        initiator=False,
        random_bytes=seeded(seed + 1000),
    )
    return a, b


def handshake(a: SecureChannel, b: SecureChannel, mutate=None) -> tuple[list, list]:
    """Run the handshake, passing every frame through ``mutate(index, frame)``."""
    events_a: list = []
    events_b: list = []
    index = 0
    for _ in range(3):
        for f in a.frames_to_send():
            events_b += b.receive_frame(mutate(index, f) if mutate else f)
            index += 1
        for f in b.frames_to_send():
            events_a += a.receive_frame(mutate(index, f) if mutate else f)
            index += 1
    return events_a, events_b


def open_pair(seed: int = 5) -> tuple[SecureChannel, SecureChannel]:
    """a and b with the handshake done: both open."""
    a, b = pair(seed)
    handshake(a, b)
    return a, b


AMST_KEYS = {name: identity.Identity.from_seed(bytes([i + 7]) * 32) for i, name in enumerate("st")}
AMST_PEERS = {name: ident.public for name, ident in AMST_KEYS.items()}


def channels(
    seed: int = 1, *, offer_s: tuple[int, ...] = (1, 3), offer_t: tuple[int, ...] = (1, 3)
) -> tuple[Callable[[], SecureChannel], Callable[[], SecureChannel]]:
    """Factories of s's (initiator) and t's (responder) channel for AMST streams, offering
    ``offer_s`` and ``offer_t`` (transfer versions and capabilities, mesh.versions)."""
    rng = random.Random(seed)

    def initiator() -> SecureChannel:
        return SecureChannel(
            identity=AMST_KEYS["s"],
            name="s",
            federation="amst",
            peers=AMST_PEERS,
            versions=offer_s,
            initiator=True,
            peer="t",
            random_bytes=rng.randbytes,
        )

    def responder() -> SecureChannel:
        return SecureChannel(
            identity=AMST_KEYS["t"],
            name="t",
            federation="amst",
            peers=AMST_PEERS,
            versions=offer_t,
            initiator=False,
            random_bytes=rng.randbytes,
        )

    return initiator, responder
