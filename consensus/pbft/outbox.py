"""Everything a PBFT replica says to the world during one step: :class:`Outbox`.

A phase never returns actions; it signs, sends, arms timers, persists and
notifies through the outbox, which keeps the actions in the order they were
made. The replica hands them to its driver at the end of the step, and the
driver executes them in that order: a ``Persist`` before every ``Send`` that
follows it, which is what makes "logged before sent" hold.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from consensus.pbft.messages import Envelope, Verifier, seal
from mesh.core import Action, CancelTimer, Notify, Offload, Persist, Send, SetTimer
from mesh.identity import Identity

__all__ = ["Outbox"]


class Outbox:
    """The actions of the current step, and the key that signs what the replica sends."""

    def __init__(self, name: str, identity: Identity, members: tuple[str, ...],
                 verifier: Verifier) -> None:
        self.name = name
        self._identity = identity
        self._peers = [m for m in members if m != name]
        self._verifier = verifier
        self._actions: list[Action] = []

    def sign(self, body: object, attachment: bytes = b"") -> Envelope:
        """``body`` signed by this replica (remembered as verified, for when it comes back
        inside a certificate)."""
        env = seal(self._identity, self.name, body, attachment)
        self._verifier.remember(env.signed, body)
        return env

    def send(self, peer: str, env: Envelope) -> None:
        if peer != self.name:
            self._actions.append(Send(peer, env))

    def broadcast(self, env: Envelope) -> None:
        for peer in self._peers:
            self._actions.append(Send(peer, env))

    def set_timer(self, key: Hashable, at: float) -> None:
        self._actions.append(SetTimer(key, at))

    def cancel_timer(self, key: Hashable) -> None:
        self._actions.append(CancelTimer(key))

    def persist(self, write: Persist) -> None:
        self._actions.append(write)

    def offload(self, work: Offload) -> None:
        self._actions.append(work)

    def notify(self, kind: str, detail: Any) -> None:
        self._actions.append(Notify(kind, detail))

    def extend(self, actions: list[Action]) -> None:
        """Actions made elsewhere (the ledger client's)."""
        self._actions.extend(actions)

    def flush(self) -> list[Action]:
        out, self._actions = self._actions, []
        return out
