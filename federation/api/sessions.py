"""The dashboard's way in: a short-lived signed link, exchanged once for a session cookie.

A browser cannot sign each request with an operator's key, so ``dwcp dashboard`` does
it once, the way Jupyter prints a token URL and the Kubernetes dashboard takes a
bearer token: it signs ``GET /dashboard`` (an ordinary signed operator request,
:mod:`federation.api.auth`) and prints ``http://API/dashboard?token=<the request>``.
The node checks that request like any other — the operator's signature, this
federation, fresh — and also that it is at most :data:`LINK_TTL` old; the nonce is
remembered in the replay window, so the link works once. In exchange the node sets a
session cookie (``HttpOnly; SameSite=Strict; Path=/``) and redirects to ``/``, which
takes the token out of the address bar and the history.

A session is bound to the operator and an expiry (idle and absolute), and it can only
*read*: it is worth a viewer's ``GET`` whatever the operator's role. Everything that
changes state still needs the operator's own signature per request, which a session
cannot make, so a stolen cookie or a cross-site request can at most read the status.
"""

from __future__ import annotations

import hmac
import secrets

import attrs

from consensus.authz import Role

__all__ = ["DashboardSession", "DashboardSessions", "COOKIE", "LINK_TTL", "SESSION_IDLE",
           "SESSION_MAX", "MAX_SESSIONS", "cookie_header", "session_cookie"]

#: The session cookie's name.
COOKIE = "dwcp_session"
#: How old a dashboard link may be when it is opened: two minutes from ``dwcp dashboard``
#: to a click (Jupyter's token URL lives as long as the server; a link in a terminal's
#: scroll-back should not).
LINK_TTL = 120.0
#: A session ends after this long without a request: the Kubernetes dashboard's default
#: ``--token-ttl`` (900 s). The page polls every second, so an open tab keeps it.
SESSION_IDLE = 900.0
#: And at the latest this long after it began (a working day), however busy.
SESSION_MAX = 12 * 3600.0
#: Sessions a node keeps; beyond it the oldest is dropped (its tab needs a new link).
MAX_SESSIONS = 256


@attrs.define
class DashboardSession:
    operator: str
    began: float
    seen: float

    #: what a session may do, whatever the operator's own role (see the module docstring)
    role: Role = Role.VIEWER


class DashboardSessions:
    """The sessions of one node, in memory (a restart ends them: open a new link)."""

    def __init__(self) -> None:
        self._by_id: dict[str, DashboardSession] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def open(self, operator: str, now: float) -> str:
        """A new session for ``operator``; returns its id (the cookie's value)."""
        while len(self._by_id) >= MAX_SESSIONS:
            oldest = min(self._by_id, key=lambda k: self._by_id[k].began)
            del self._by_id[oldest]
        sid = secrets.token_urlsafe(32)
        self._by_id[sid] = DashboardSession(operator, now, now)
        return sid

    def get(self, sid: str, now: float) -> DashboardSession | None:
        """The live session ``sid`` names (compared in constant time), else None."""
        found = None
        for key, session in self._by_id.items():
            if hmac.compare_digest(key, sid):
                found = key, session
        if found is None:
            return None
        key, session = found
        if now - session.seen > SESSION_IDLE or now - session.began > SESSION_MAX:
            del self._by_id[key]
            return None
        session.seen = now
        return session


def cookie_header(sid: str) -> str:
    """The ``Set-Cookie`` value of a new session."""
    return (f"{COOKIE}={sid}; HttpOnly; SameSite=Strict; Path=/; "
            f"Max-Age={int(SESSION_MAX)}")


def session_cookie(header: str) -> str | None:
    """The session id in a ``Cookie`` header, if any."""
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name == COOKIE and value:
            return value
    return None
