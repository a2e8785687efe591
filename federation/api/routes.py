"""The API's routes: what each one does for a caller the door let in.

=================================  ====== =============================================
route                              role   body (state-changing: a signed CBOR intent)
=================================  ====== =============================================
``GET /``                          viewer the dashboard (:mod:`federation.api.dashboard`)
``GET /dashboard?token=T``         link   exchanges a ``dwcp dashboard`` link for a
                                          session cookie, then 303 to ``/``
``GET /health``                    open   200 while the process serves (liveness)
``GET /ready``                     open   200 once the mesh runs and a PBFT quorum is
                                          connected; else 503 with the reason
``GET /metrics``                   viewer Prometheus text (or the metrics bearer token)
``GET /api/status``                viewer members, links, routes, ledger, VMs, migrations
``GET /api/vms``                   viewer the ``vms`` part of the status
``POST /api/imports``              oper.  ``ImportVm``: copy the images (under the node
                                          config's import_dirs) -> 202; a staged VM
``GET /api/imports/NAME``          viewer the copy's state: copying, staged, failed
``POST /api/vms``                  oper.  ``ImportVm``: register the staged VM in the
                                          ledger and run it -> 201
``DELETE /api/vms/NAME``           oper.  ``DeleteVm``: unregister it in the ledger
``POST /api/vms/NAME/purge``       oper.  ``PurgeVm``: remove this DC's retained copy
                                          (a VM that left) -> 200 ``{"freed_bytes"}``
``POST /api/migrations``           oper.  ``MigrateVm`` (vm, target, source, epoch) ->
                                          202 ``{"id"}``
``GET /api/migrations/ID``         viewer one migration (404 if nobody knows it)
``POST /api/migrations/ID/cancel`` oper.  ``CancelMigration``: at the source its session
                                          aborts; elsewhere the operator's abort goes to
                                          the ledger -> 202 with the migration
``GET /api/policy``                viewer the rollout policy in this replica
``POST /api/policy``               admin  ``SetPolicy`` -> 200 once the ledger has it
=================================  ====== =============================================

Answers are JSON (``{"error": "..."}`` with a 4xx/5xx status), the dashboard HTML and
the metrics text excepted. An intent must say what its route does: the VM of the path,
this DC as the importer or the source; the node checks that again
(:meth:`federation.node.assembly.Node.intent`) and every replica checks the signature.
"""

from __future__ import annotations

import json
import urllib.parse
from typing import TYPE_CHECKING, Any

import attrs
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from consensus.ledger import CancelMigration, ImportVm, MigrateVm, SetPolicy
from federation.api.dashboard import PAGE
from federation.api.door import Caller
from federation.node.errors import LedgerTimeout, NodeError, UnknownMigration
from federation.node.imports import ImportRefused
from federation.node.metrics import NodeCollector
from federation.node.status import migration_status, policy_doc, status
from federation.vms.retention import PurgeVm
from mesh import wire

if TYPE_CHECKING:
    from federation.node.assembly import Node

__all__ = ["ApiError", "Answer", "handle_request", "KNOWN"]

JSON = "application/json"
#: Routes that exist (for 405 versus 404).
KNOWN = ("/", "/dashboard", "/health", "/ready", "/metrics", "/api/status", "/api/vms",
         "/api/imports", "/api/migrations", "/api/policy")


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@attrs.frozen
class Answer:
    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


def _json(status: int, doc: Any) -> Answer:
    return Answer(status, JSON, json.dumps(doc).encode())


def _error(status: int, message: str) -> Answer:
    return _json(status, {"error": message})


def _intent(caller: Caller, kind: type) -> Any:
    """The signed body of the caller's request, decoded as a ``kind`` intent."""
    assert caller.request is not None, "a state-changing route runs only on a signed request"
    try:
        return wire.decode(caller.request.authorization.body, expect=(kind,))
    except wire.WireError as exc:
        raise ApiError(400, f"the body is not a {kind.__name__} intent: {exc}") from None


def _ready(node: Node) -> tuple[bool, str]:
    if not node.started.is_set():
        return False, "starting"
    if node.core is None:
        return False, node.no_ledger
    replica = node.core.replica.status_record()
    connected = len(node.runtime.links) + 1
    if connected < replica.quorum:
        return False, (f"{connected} of {len(replica.members)} DCs connected, a quorum is "
                       f"{replica.quorum}")
    return True, "ready"


def _tail(path: str, prefix: str) -> str:
    return urllib.parse.unquote(path[len(prefix):])


async def handle_request(node: Node, caller: Caller, method: str, path: str,
                         nursery: trio.Nursery) -> Answer:
    """The answer to one request the door let in (``nursery`` runs an import's copy)."""
    try:
        return await _route(node, caller, method, path, nursery)
    except LedgerTimeout as exc:
        return _error(504, str(exc))
    except UnknownMigration as exc:
        return _error(404, str(exc))
    except ImportRefused as exc:
        return _error(403, str(exc))
    except NodeError as exc:
        return _error(409, str(exc))
    except ApiError as exc:
        return _error(exc.status, str(exc))


async def _route(node: Node, caller: Caller, method: str, path: str,
                 nursery: trio.Nursery) -> Answer:
    if method == "GET":
        return _read(node, path)
    if method == "POST" and path == "/api/imports":
        intent = _intent(caller, ImportVm)
        if intent.dc != node.name:
            raise ApiError(400, f"dc: the operator asked to import at {intent.dc!r}, this "
                                f"is {node.name!r}")
        staged, fds = node.imports.begin(intent.vm, intent.memory, intent.disks)
        nursery.start_soon(node.imports.copy, staged, fds)
        return _json(202, staged.doc())
    if method == "POST" and path == "/api/vms":
        intent = _intent(caller, ImportVm)
        assert caller.request is not None
        info = await node.import_vm(intent.vm, caller.request.authorization)
        return _json(201, {"name": info.name, "epoch": info.epoch, "state": info.state.value,
                           "layout": info.layout})
    if method == "POST" and path.startswith("/api/vms/") and path.endswith("/purge"):
        vm = _tail(path[:-len("/purge")], "/api/vms/")
        intent = _intent(caller, PurgeVm)
        if intent.vm != vm:
            raise ApiError(400, f"vm: the operator signed the purge of {intent.vm!r}, the "
                                f"path names {vm!r}")
        assert caller.request is not None
        freed = await node.purge_vm(vm, caller.request.authorization)
        return _json(200, {"name": vm, "purged": True, "freed_bytes": freed})
    if method == "DELETE" and path.startswith("/api/vms/"):
        vm = _tail(path, "/api/vms/")
        assert caller.request is not None
        result = await node.delete_vm(vm, caller.request.authorization)
        return _json(200, {"name": vm, "deleted": True, "epoch": result.epoch})
    if method == "POST" and path == "/api/migrations":
        intent = _intent(caller, MigrateVm)
        assert caller.request is not None
        mid = await node.migrate(intent.vm, intent.target, caller.request.authorization)
        return _json(202, {"id": mid})
    if method == "POST" and path.startswith("/api/migrations/") and path.endswith("/cancel"):
        mid = _tail(path[:-len("/cancel")], "/api/migrations/")
        _intent(caller, CancelMigration)
        assert caller.request is not None
        await node.cancel_migration(mid, caller.request.authorization)
        return _json(202, migration_status(node, mid) or {"id": mid})
    if method == "POST" and path == "/api/policy":
        policy = _intent(caller, SetPolicy)
        assert caller.request is not None
        recorded = await node.set_policy(
            policy.v3_percent, policy.target_dcs, policy.target_vms, policy.kill_switch,
            authorization=caller.request.authorization)
        return _json(200, policy_doc(recorded))
    return _not_found(method, path)


def _read(node: Node, path: str) -> Answer:
    if path == "/":
        return Answer(200, "text/html; charset=utf-8", PAGE)
    if path == "/health":
        return Answer(200, JSON, b'{"status":"ok"}')
    if path == "/ready":
        ok, why = _ready(node)
        return _json(200 if ok else 503, {"ready": ok, "reason": why})
    if path == "/metrics":
        registry = CollectorRegistry(auto_describe=False)
        registry.register(NodeCollector(node))
        return Answer(200, CONTENT_TYPE_LATEST, generate_latest(registry))
    if path == "/api/status":
        return _json(200, status(node))
    if path == "/api/vms":
        return _json(200, status(node)["vms"])
    if path == "/api/policy":
        return _json(200, policy_doc(node.need_core().ledger.policy))
    if path.startswith("/api/imports/"):
        vm = _tail(path, "/api/imports/")
        staged = node.imports.status(vm)
        if staged is None:
            raise ApiError(404, f"no import of {vm!r} here")
        return _json(200, staged.doc())
    if path.startswith("/api/migrations/"):
        mid = _tail(path, "/api/migrations/")
        found = migration_status(node, mid)
        if found is None:
            raise ApiError(404, f"no migration {mid!r}")
        return _json(200, found)
    return _not_found("GET", path)


def _not_found(method: str, path: str) -> Answer:
    if path in KNOWN or any(path.startswith(k + "/") for k in KNOWN[6:]):
        return _error(405, f"{method} is not allowed on {path}")
    return _error(404, f"no route {path}")
