"""A client of a node's API that signs every request with an operator's key: what the
``dwcp`` commands, the demo and the tests use.

Each request carries the operator's signed envelope (:func:`federation.api.auth.sign_request`
over the method, the whole target and the body) in the ``DWCP-Request`` header. A
state-changing request's body is the canonical CBOR of its intent
(:mod:`consensus.ledger_commands`), sent as ``application/cbor``; answers are JSON.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from consensus.authz import OperatorKey
from consensus.ledger import ImportVm, MigrateVm
from federation import config
from federation.api.auth import HEADER, encode_header, load_operator_key, sign_request
from mesh import identity, wire

__all__ = ["ApiClient", "ClientError", "Signer", "load_signer", "KEY_ENV", "CONFIG_ENV",
           "HTTP_TIMEOUT", "dashboard_url", "import_vm", "migrate_request"]

#: The environment variables that name the operator's key file and the federation file.
KEY_ENV = "DWCP_OPERATOR_KEY"
CONFIG_ENV = "DWCP_CONFIG"
#: An HTTP request that gets no answer in this long fails (the API's own bound for an
#: operation is 120 s, federation.api.http.OPERATION_TIMEOUT).
HTTP_TIMEOUT = 180.0


class ClientError(Exception):
    """The node cannot be reached, or answered what is not JSON; the message says which."""


class Signer:
    """Signs requests as operator ``key.name`` of federation ``federation``."""

    def __init__(self, key: OperatorKey, federation: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.key = key
        self.federation = federation
        self.clock = clock

    def header(self, method: str, target: str, body: bytes, nonce: str | None = None) -> str:
        """``nonce``: the request id (default: a fresh one)."""
        return encode_header(sign_request(self.key, self.federation, method, target, body,
                                          self.clock(), nonce))


def load_signer(key_path: Path | str | None, config_path: Path | str | None) -> Signer:
    """The signer of ``key_path`` (else ``$DWCP_OPERATOR_KEY``) in the federation file
    ``config_path`` (else ``$DWCP_CONFIG``); ClientError saying what is missing."""
    key_path = key_path or os.environ.get(KEY_ENV)
    if not key_path:
        raise ClientError(f"no operator key: give --key FILE or set {KEY_ENV} (an operator "
                          "makes one with 'dwcp keygen --operator --out FILE' and is listed "
                          "in the federation file's [[operators]])")
    config_path = config_path or os.environ.get(CONFIG_ENV)
    if not config_path:
        raise ClientError(f"signing needs the federation file: give --config FILE or set "
                          f"{CONFIG_ENV} (it names the federation and your operator entry)")
    try:
        fed = config.load(config_path)
        key = load_operator_key(key_path, fed)
    except (config.ConfigError, identity.IdentityError) as exc:
        raise ClientError(str(exc)) from None
    except OSError as exc:
        raise ClientError(f"{key_path}: {exc.strerror}") from None
    return Signer(key, fed.id)


def dashboard_url(api: str, signer: Signer) -> str:
    """A dashboard link for ``api`` (``http://HOST:PORT``): a signed ``GET /dashboard``
    in the query, exchanged once for a session cookie (federation.api.sessions)."""
    token = signer.header("GET", "/dashboard", b"")
    return f"{api}/dashboard?token={token}"


class ApiClient:
    """A small JSON client of one node's API, signing with ``signer`` (None: unsigned,
    which only ``/health`` and ``/ready`` answer). ``request_id``: the id the next
    state-changing request is signed under (then cleared), to send a request again under
    the id an earlier answer gave; otherwise each request gets a fresh one."""

    def __init__(self, url: str, signer: Signer | None = None,
                 timeout: float = HTTP_TIMEOUT) -> None:
        self.request_id: str | None = None
        parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ClientError(f"--api {url!r}: expected http://HOST:PORT")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        self.url = f"http://{host}:{parts.port}"
        self.host, self.port = parts.hostname, parts.port
        self.signer = signer
        self.timeout = timeout

    def request(self, method: str, path: str, intent: object = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """One request: (status, raw answer). ``intent``: a state-changing body."""
        body = b"" if intent is None else wire.encode(intent)
        sent = {"host": f"{self.url[len('http://'):]}"} | (headers or {})
        if intent is not None:
            sent["content-type"] = "application/cbor"
        if self.signer is not None:
            nonce = None
            if method != "GET":
                nonce, self.request_id = self.request_id, None
            sent[HEADER] = self.signer.header(method, path, body, nonce)
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request(method, path, body=body if intent is not None else None,
                         headers=sent)
            resp = conn.getresponse()
            return resp.status, resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ClientError(f"cannot reach the node at {self.url}: {exc}") from None
        finally:
            conn.close()

    def call(self, method: str, path: str, intent: object = None) -> tuple[int, Any]:
        code, raw = self.request(method, path, intent)
        try:
            return code, json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ClientError(f"{self.url}{path}: the node answered {code} with a body "
                              "that is not JSON") from None

    def ok(self, method: str, path: str, intent: object = None) -> Any:
        code, doc = self.call(method, path, intent)
        if code >= 400:
            why = doc.get("error", doc) if isinstance(doc, dict) else doc
            raise ClientError(f"{why} (HTTP {code})")
        return doc


def import_vm(api: ApiClient, vm: str, memory: str, disks: tuple[str, ...] = (),
              poll: float = 0.25) -> Any:
    """Import ``vm`` at ``api``'s node as ``dwcp vm import`` does: stage (the node copies
    the images from its import directories), wait for the copy, then register with a
    request signed now (federation.node.imports). Returns the register's answer."""
    dc = str(api.ok("GET", "/api/status")["dc"])
    intent = ImportVm(vm, dc, memory, disks)
    path = f"/api/imports/{urllib.parse.quote(vm, safe='')}"
    code, staged = api.call("GET", path)
    if code != 200 or staged.get("state") != "staged":  # staged already: an import again
        rid, api.request_id = api.request_id, None  # the id is the register's
        staged = api.ok("POST", "/api/imports", intent)
        api.request_id = rid
    while staged["state"] == "copying":
        time.sleep(poll)
        staged = api.ok("GET", path)
    if staged["state"] != "staged":
        raise ClientError(f"copying the images of {vm} failed: {staged['error']}")
    return api.ok("POST", "/api/vms", intent)


def migrate_request(api: ApiClient, vm: str, target: str) -> MigrateVm:
    """The operator's request to move ``vm`` to ``target`` from where the ledger has it
    now: its owner and epoch, as ``api``'s node reports them."""
    code, found = api.call("GET", f"/api/vms/{urllib.parse.quote(vm, safe='')}")
    if code == 404:
        found = None
    elif code >= 400:
        raise ClientError(f"{found.get('error', found) if isinstance(found, dict) else found} "
                          f"(HTTP {code})")
    if found is None or found["owner"] is None:
        raise ClientError(f"VM {vm!r} is not in the ledger")
    return MigrateVm(vm, target, found["owner"], found["epoch"])
