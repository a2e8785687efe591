"""Shared loopback fixtures of the AMST tests and benchmark: channels and a server."""

from __future__ import annotations

import random
from collections.abc import Callable

from mesh import identity
from mesh.channel import SecureChannel

KEYS = {name: identity.Identity.from_seed(bytes([i + 7]) * 32) for i, name in enumerate("st")}
PEERS = {name: ident.public for name, ident in KEYS.items()}


def channels(seed: int = 1) -> tuple[Callable[[], SecureChannel], Callable[[], SecureChannel]]:
    rng = random.Random(seed)

    def initiator() -> SecureChannel:
        return SecureChannel(
            identity=KEYS["s"],
            name="s",
            federation="amst",
            peers=PEERS,
            versions=(1, 3),
            initiator=True,
            peer="t",
            random_bytes=rng.randbytes,
        )

    def responder() -> SecureChannel:
        return SecureChannel(
            identity=KEYS["t"],
            name="t",
            federation="amst",
            peers=PEERS,
            versions=(1, 3),
            initiator=False,
            random_bytes=rng.randbytes,
        )

    return initiator, responder
