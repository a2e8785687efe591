"""Accepting connections from nobody: caps on unauthenticated connections, early drop,
and an accept loop that survives running out of descriptors.

Until its channel handshake completes, a connection is from nobody: anyone who can
reach the port can open one. A :class:`StartupGate` bounds how many such connections a
listener holds, the way OpenSSH's ``MaxStartups start:rate:full`` does (sshd_config(5);
``drop_connection`` in sshd.c): up to ``start`` are accepted, from ``full`` on every new
one is dropped, and in between a new one is dropped with a probability rising linearly
from ``rate`` % to 100 %. Like OpenSSH's ``PerSourceMaxStartups``, one source address
holds at most ``per_source`` of them, so a flood from one address cannot crowd out the
handshakes of real peers. A connection leaves the count when its handshake completes
(:meth:`Startup.authenticated`) or when it ends.

:func:`serve_listeners` replaces ``trio.serve_listeners``: it asks the gate before a
handler starts, runs each connection's handler so that whatever it raises ends that
connection only (logged and counted), and when ``accept`` fails for lack of descriptors
or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) it backs off exponentially instead of
retrying every 100 ms with a traceback each time.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from mesh.runtime.log import JsonLog

__all__ = [
    "StartupLimits",
    "StartupGate",
    "Startup",
    "serve_listeners",
    "source_of",
    "ACCEPT_BACKOFF_MIN",
    "ACCEPT_BACKOFF_MAX",
    "CAPACITY_ERRNOS",
]

#: accept() errors that mean "out of descriptors or memory for now" (trio's own list).
CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: The accept loop's back-off after such an error: 5 ms doubling to 1 s, as Go's
#: net/http ``Server.Serve`` does for temporary accept errors.
ACCEPT_BACKOFF_MIN = 0.005
ACCEPT_BACKOFF_MAX = 1.0


@attrs.frozen
class StartupLimits:
    """``start:rate:full`` of OpenSSH's MaxStartups, and a cap per source address."""

    start: int
    rate: int  # percent
    full: int
    per_source: int

    def __attrs_post_init__(self) -> None:
        if not 0 < self.start <= self.full or not 0 <= self.rate <= 100 or self.per_source < 1:
            raise ValueError(f"startup limits need 0 < start <= full, rate in 0..100 and "
                             f"per_source >= 1: {self}")


@attrs.define(eq=False)
class Startup:
    """One admitted connection's place in the count of unauthenticated connections."""

    gate: StartupGate
    source: str
    counted: bool = True

    def authenticated(self) -> None:
        """The handshake completed: the connection is no longer from nobody."""
        self.gate._release(self)

    def close(self) -> None:
        self.gate._release(self)


class StartupGate:
    """The unauthenticated connections of one listener; ``rng`` draws the early drops."""

    def __init__(self, limits: StartupLimits, rng: random.Random) -> None:
        self.limits = limits
        self.rng = rng
        self.pending = 0
        self.by_source: dict[str, int] = {}

    def drop_reason(self, source: str) -> str | None:
        """Why a new connection from ``source`` is dropped now, or None to admit it."""
        lim = self.limits
        if self.by_source.get(source, 0) >= lim.per_source:
            return "source_limit"
        if self.pending < lim.start:
            return None
        if self.pending >= lim.full:
            return "startups_full"
        # sshd.c drop_connection: p = rate + (100 - rate) * (n - start) / (full - start)
        p = lim.rate + (100 - lim.rate) * (self.pending - lim.start) / (lim.full - lim.start)
        return "early_drop" if self.rng.random() * 100 < p else None

    def admit(self, source: str) -> Startup | str:
        """A :class:`Startup` for an admitted connection, else the reason it is dropped."""
        reason = self.drop_reason(source)
        if reason is not None:
            return reason
        self.pending += 1
        self.by_source[source] = self.by_source.get(source, 0) + 1
        return Startup(self, source)

    def _release(self, startup: Startup) -> None:
        if not startup.counted:
            return
        startup.counted = False
        self.pending -= 1
        left = self.by_source[startup.source] - 1
        if left:
            self.by_source[startup.source] = left
        else:
            del self.by_source[startup.source]


def source_of(stream: trio.abc.Stream) -> str:
    """The remote address of a TCP stream ("?" for anything else or a gone peer)."""
    sock = getattr(stream, "socket", None)
    try:
        peer = sock.getpeername() if sock is not None else None
    except OSError:
        return "?"
    return str(peer[0]) if isinstance(peer, tuple) and peer else "?"


Handler = Callable[[trio.SocketStream, Startup], Awaitable[Any]]


async def serve_listeners(
    handler: Handler,
    listeners: list[trio.SocketListener],
    gate: StartupGate,
    *,
    log: JsonLog,
    count: Callable[[str], None],
    what: str,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept on every listener until cancelled; ``handler(stream, startup)`` serves each
    admitted connection and calls ``startup.authenticated()`` once the peer proved who it
    is. ``count(reason)`` is called for every dropped connection ("source_limit",
    "early_drop", "startups_full"), every connection whose handler raised
    ("connection_failed") and every accept that ran out of descriptors
    ("accept_backoff"). ``what`` names the listener in log lines."""
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept_loop, listener, nursery, handler, gate, log, count, what)
        task_status.started()


async def _accept_loop(
    listener: trio.SocketListener,
    nursery: trio.Nursery,
    handler: Handler,
    gate: StartupGate,
    log: JsonLog,
    count: Callable[[str], None],
    what: str,
) -> None:
    backoff = 0.0
    failed = 0
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in CAPACITY_ERRNOS:
                    raise
                count("accept_backoff")
                failed += 1
                backoff = min(max(2 * backoff, ACCEPT_BACKOFF_MIN), ACCEPT_BACKOFF_MAX)
                if failed == 1:
                    log.event("accept_backoff", listener=what, error=errno.errorcode[exc.errno],
                              retry_in=backoff)
                await trio.sleep(backoff)
                continue
            if failed:
                log.event("accept_recovered", listener=what, failures=failed)
                backoff, failed = 0.0, 0
            source = source_of(stream)
            startup = gate.admit(source)
            if isinstance(startup, str):
                count(startup)
                await trio.aclose_forcefully(stream)
                continue
            nursery.start_soon(_run_one, handler, stream, startup, log, count, what)


async def _run_one(
    handler: Handler,
    stream: trio.SocketStream,
    startup: Startup,
    log: JsonLog,
    count: Callable[[str], None],
    what: str,
) -> None:
    try:
        await handler(stream, startup)
    except* Exception as group:  # one connection's fault ends that connection, not the node
        count("connection_failed")
        exc = group.exceptions[0]
        log.event("connection_failed", listener=what, remote=startup.source,
                  error=f"{type(exc).__name__}: {exc}"[:300])
    finally:
        startup.close()
        await trio.aclose_forcefully(stream)
