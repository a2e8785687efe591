"""Bounds on the API's connections: how many at once, from one source, and how long a
client may take to send a request or to read an answer.

The API is an operator's door, not a public web server: a handful of people and their
scripts, Prometheus, a dashboard tab. Anyone who can reach the port can still open
connections before any signature is checked, so what one peer can hold is bounded
(:class:`ConnectionCap`), and a client that trickles bytes (slowloris) or never reads
its answer is cut off (:data:`REQUEST_DEADLINE`, :data:`SEND_DEADLINE`).
"""

from __future__ import annotations

import attrs

__all__ = ["ApiLimits", "DEFAULT_LIMITS", "ConnectionCap", "REQUEST_DEADLINE",
           "SEND_DEADLINE", "MAX_BODY", "MAX_HEAD"]

#: A client sends its whole request (head and body) within this: nginx's
#: client_header_timeout and client_body_timeout default to 60 s; an operator API on a
#: management network needs far less, and a slowloris client holds a slot at most this long.
REQUEST_DEADLINE = 10.0
#: An answer must be taken by the client within this (nginx's send_timeout is 60 s; the
#: largest answer, /api/status of a big federation, is a few hundred KiB).
SEND_DEADLINE = 10.0
#: Largest request body: a signed intent is at most 4 KiB (consensus.authz.MAX_BODY);
#: 64 KiB leaves room and is still nothing to buffer.
MAX_BODY = 64 * 1024
#: Largest request head (request line and headers): h11's default is 16 KiB, the
#: signed-request header is under 3 KiB (federation.api.auth).
MAX_HEAD = 16 * 1024


@attrs.frozen
class ApiLimits:
    """Concurrent connections in all and per source address. 64 in all is a dashboard per
    operator plus scripts with room to spare (Apache's MaxRequestWorkers default is 256 for
    a public server); 16 per source keeps one host from taking them all (nginx's
    limit_conn is the usual place for such a cap)."""

    total: int = 64
    per_source: int = 16

    def __attrs_post_init__(self) -> None:
        if not 1 <= self.per_source <= self.total:
            raise ValueError(f"API limits need 1 <= per_source <= total: {self}")


DEFAULT_LIMITS = ApiLimits()


class ConnectionCap:
    """The API's open connections, by source address. :meth:`admit` says whether a new one
    may be served; :meth:`release` when it ends."""

    def __init__(self, limits: ApiLimits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self.open = 0
        self.by_source: dict[str, int] = {}
        #: refusals by reason ("total", "source"), for the log and the metrics
        self.refused: dict[str, int] = {}

    def admit(self, source: str) -> str | None:
        """None if a connection from ``source`` is admitted (and counted), else why not."""
        if self.by_source.get(source, 0) >= self.limits.per_source:
            reason = "source"
        elif self.open >= self.limits.total:
            reason = "total"
        else:
            self.open += 1
            self.by_source[source] = self.by_source.get(source, 0) + 1
            return None
        self.refused[reason] = self.refused.get(reason, 0) + 1
        return reason

    def release(self, source: str) -> None:
        self.open -= 1
        left = self.by_source[source] - 1
        if left:
            self.by_source[source] = left
        else:
            del self.by_source[source]
