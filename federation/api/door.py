"""Who is asking, and may they: the checks every API request passes before a route runs.

In order (each refusal says which check failed and what to do):

1. ``Host`` must name this node's API endpoint (``host:port`` as the federation file
   has it; ``localhost:PORT`` too for a loopback address). A web page that re-binds its
   own DNS name to the node's address (DNS rebinding) sends its own name: 421.
2. ``/health`` and ``/ready`` are open (probes of load balancers and orchestrators).
3. A request that may change state (anything but ``GET``/``HEAD``) must not come from
   another web origin: an ``Origin`` header, if sent, must be this API's own origin,
   and ``Sec-Fetch-Site``, if sent, ``same-origin`` or ``none`` (403); its body must be
   ``application/cbor`` (415), a type no HTML form can send, so a cross-site form post
   never reaches a route.
4. ``GET /dashboard?token=T``: a dashboard link (:mod:`federation.api.sessions`).
5. A ``DWCP-Request`` header: the operator's signed request
   (:func:`federation.api.auth.verify_request`) over this method, target and body, of
   the role the route needs (:func:`federation.api.auth.required_role`).
6. Otherwise a dashboard session cookie, which reads only (``GET``, viewer).
7. Otherwise, for ``GET /metrics`` only, the node's metrics bearer token if it has one
   (Prometheus cannot sign requests).

Anything else is 401. The time is the node's wall clock (the signature's ``created`` is
the operator's).
"""

from __future__ import annotations

import hmac
import ipaddress
import urllib.parse
from collections.abc import Mapping

import attrs

from consensus.authz import Role
from federation import config
from federation.api.auth import (
    HEADER,
    AuthError,
    ReplayWindow,
    VerifiedRequest,
    decode_header,
    required_role,
    verify_request,
)
from federation.api.sessions import LINK_TTL, DashboardSessions, session_cookie

__all__ = ["Door", "Caller", "Refused", "DashboardLink", "OPEN_PATHS", "CBOR",
           "AUTH_STATUS", "api_authorities"]

#: The probes anyone may call.
OPEN_PATHS = ("/health", "/ready")
#: The content type of every state-changing body: a signed intent in canonical CBOR
#: (RFC 8949 §9.5 registers ``application/cbor``).
CBOR = "application/cbor"
#: HTTP status per :class:`consensus.authz.AuthError` reason.
AUTH_STATUS = {
    "malformed": 401, "unknown-operator": 401, "bad-signature": 401, "wrong-federation": 401,
    "role": 403, "replayed": 409, "too-many": 429,
    "expired": 401, "from-the-future": 401, "wrong-request": 401, "body-mismatch": 401,
}
_SAFE = ("GET", "HEAD")


class Refused(Exception):
    """A request the door turns away: ``status`` and a message saying why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@attrs.frozen
class Caller:
    """Who a request is from. ``request`` is the verified signed request (None for an
    open probe, a dashboard session or the metrics token)."""

    operator: str
    role: Role | None
    via: str  # "open" | "signature" | "session" | "metrics-token"
    request: VerifiedRequest | None = None


@attrs.frozen
class DashboardLink:
    """A checked dashboard link: open a session for ``operator``."""

    operator: str


def api_authorities(host: str, port: int) -> frozenset[str]:
    """The ``Host`` values that name an API endpoint: its own, and ``localhost:PORT``
    when it is a loopback address (a browser on the node's machine may say either)."""
    shown = f"[{host}]" if ":" in host else host
    names = {f"{shown}:{port}".lower()}
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host.lower() == "localhost"
    if loopback:
        names.add(f"localhost:{port}")
    return frozenset(names)


class Door:
    """The checks of one node's API (see the module docstring)."""

    def __init__(self, fed: config.Federation, authorities: frozenset[str], *,
                 metrics_token: str = "") -> None:
        self.fed = fed
        self.authorities = authorities
        self.origins = frozenset(f"http://{a}" for a in authorities)
        self.metrics_token = metrics_token
        self.replays = ReplayWindow()
        self.sessions = DashboardSessions()

    def check(self, method: str, target: str, headers: Mapping[str, str], body: bytes,
              now: float) -> Caller | DashboardLink:
        """The caller of one request, or :class:`Refused`. ``headers``: lower-case names,
        one value each (a repeated header is refused before this, by the server)."""
        host = headers.get("host", "").lower()
        if host not in self.authorities:
            raise Refused(421, f"Host {host!r} is not this node's API "
                               f"({', '.join(sorted(self.authorities))}); refused so that a "
                               "web page cannot reach the API under another name")
        path, _, query = target.partition("?")
        if method in _SAFE and path in OPEN_PATHS:
            return Caller("", None, "open")
        if method not in _SAFE:
            self._same_origin(headers)
            ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if ctype != CBOR:
                raise Refused(415, f"content-type {ctype or 'missing'!r}: a request that "
                                   f"changes state carries a signed {CBOR} body")
        if method == "GET" and path == "/dashboard":
            return self._link(query, now)
        signed = headers.get(HEADER.lower())
        if signed is not None:
            return self._signed(method, target, path, signed, body, now)
        sid = session_cookie(headers.get("cookie", ""))
        session = self.sessions.get(sid, now) if sid else None
        if session is not None:
            if method not in _SAFE:
                raise Refused(403, "a dashboard session only reads; sign the request with "
                                   "an operator key (dwcp --key)")
            return Caller(session.operator, session.role, "session")
        bearer = headers.get("authorization", "")
        if (self.metrics_token and method in _SAFE and path == "/metrics"
                and hmac.compare_digest(bearer, f"Bearer {self.metrics_token}")):
            return Caller("metrics", Role.VIEWER, "metrics-token")
        raise Refused(401, f"{method} {path} needs an operator's signed request ({HEADER} "
                           "header: dwcp --key FILE or DWCP_OPERATOR_KEY), or a dashboard "
                           "session from the link 'dwcp dashboard' prints")

    def _same_origin(self, headers: Mapping[str, str]) -> None:
        origin = headers.get("origin")
        if origin is not None and origin.lower() not in self.origins:
            raise Refused(403, f"Origin {origin!r} is not this API's own origin; a "
                               "cross-site request may not change state")
        site = headers.get("sec-fetch-site")
        if site is not None and site.lower() not in ("same-origin", "none"):
            raise Refused(403, f"Sec-Fetch-Site {site!r}: a cross-site request may not "
                               "change state")

    def _signed(self, method: str, target: str, path: str, header: str, body: bytes,
                now: float) -> Caller:
        need = required_role(method, path)
        try:
            raw = decode_header(header)
            v = verify_request(self.fed, raw, now, self.replays, method=method, target=target,
                               body=body, need=need or Role.VIEWER)
        except AuthError as exc:
            raise Refused(AUTH_STATUS.get(exc.reason, 401),
                          f"operator request refused ({exc.reason}): {exc}") from None
        return Caller(v.operator, v.role, "signature", v)

    def _link(self, query: str, now: float) -> DashboardLink:
        tokens = urllib.parse.parse_qs(query, keep_blank_values=True).get("token", [])
        if len(tokens) != 1:
            raise Refused(401, "a dashboard link carries one token: open the URL "
                               "'dwcp dashboard' prints")
        try:
            raw = decode_header(tokens[0])
            v = verify_request(self.fed, raw, now, self.replays, method="GET",
                               target="/dashboard", body=b"", need=Role.VIEWER)
        except AuthError as exc:
            why = "it was used already" if exc.reason == "replayed" else str(exc)
            raise Refused(AUTH_STATUS.get(exc.reason, 401),
                          f"dashboard link refused ({exc.reason}): {why}; run "
                          "'dwcp dashboard' for a new one") from None
        if now - v.created > LINK_TTL:
            raise Refused(401, f"dashboard link refused (expired): it is "
                               f"{now - v.created:.0f} s old, a link lives {LINK_TTL:.0f} s; "
                               "run 'dwcp dashboard' for a new one")
        return DashboardLink(v.operator)
