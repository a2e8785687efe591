"""Helpers for invariant checkers.

A checker is ``fn(world) -> str | None`` run after every event (``World.add_checker``).
Most invariants are about what cores report: :func:`notify_checker` turns an
``inspect(record) -> str | None`` over :class:`sim.world.NotifyRecord` into a checker
that costs nothing between notifications, and stops the run on the event whose
Notify broke the invariant.
"""

from __future__ import annotations

from collections.abc import Callable

from sim.world import NotifyRecord, World

__all__ = ["notify_checker"]


def notify_checker(world: World, name: str,
                   inspect: Callable[[NotifyRecord], str | None]) -> None:
    """Run ``inspect`` on every Notify; the first message it returns is a violation."""
    failure: list[str] = []

    def listen(record: NotifyRecord) -> None:
        if not failure:
            message = inspect(record)
            if message is not None:
                failure.append(f"{record.node}/{record.core}: {message}")

    def check(_world: World) -> str | None:
        return failure[0] if failure else None

    world.on_notify(listen)
    world.add_checker(name, check)
