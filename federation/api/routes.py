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
``GET /api/status``                viewer members, links, routes, ledger, VMs, the migrations
                                          begun last (node.status.STATUS_MIGRATIONS) and
                                          ``migrations_total``
``GET /api/vms``                   viewer the ``vms`` part of the status
``GET /api/vms/NAME``              viewer one VM of it (404 if nobody knows it)
``POST /api/imports``              oper.  ``ImportVm``: copy the images (under the node
                                          config's import_dirs) -> 202; a staged VM
``GET /api/imports/NAME``          viewer the copy's state: copying, staged, failed
``POST /api/vms``                  oper.  ``ImportVm``: register the staged VM in the
                                          ledger and run it -> 201
``DELETE /api/vms/NAME``           oper.  ``DeleteVm``: unregister it in the ledger; the
                                          copies go (a staged, unregistered import: only
                                          here, without the ledger)
``POST /api/vms/NAME/purge``       oper.  ``PurgeVm``: remove this DC's retained copy
                                          (a VM that left) -> 200 ``{"freed_bytes"}``
``POST /api/vms/NAME/start|stop``  oper.  ``PowerVm``: boot or power off a qemu VM this
                                          DC owns -> 200
``GET /api/vms/NAME/console``      viewer the tail of a qemu VM's serial console
``POST /api/migrations``           oper.  ``MigrateVm`` (vm, target, source, epoch) ->
                                          202 ``{"id"}``
``GET /api/migrations/ID``         viewer one migration (404 if nobody knows it)
``POST /api/migrations/ID/cancel`` oper.  ``CancelMigration``: at the source its session
                                          aborts; elsewhere the operator's abort goes to
                                          the ledger -> 202 with the migration
``GET /api/requests/ID``           viewer the outcome of the caller's request ID:
                                          committed, refused, pending or unknown
``GET /api/requests/OPERATOR/ID``  viewer the same for another operator's request
``GET /api/policy``                viewer the rollout policy in this replica
``POST /api/policy``               admin  ``SetPolicy`` -> 200 once the ledger has it
=================================  ====== =============================================

Answers are JSON (``{"error": "..."}`` with a 4xx/5xx status), the dashboard HTML and
the metrics text excepted.

A request that goes to the ledger (``POST /api/vms``, ``DELETE /api/vms/NAME``, ``POST
/api/migrations``, a cancel, ``POST /api/policy``) is idempotent by its request id (the
nonce of its signed request, in every answer as ``request_id``): when the ledger does
not answer in time the answer is 202 ``{"pending": true, "request": {...}}`` ("pending,
id X"), and ``GET /api/requests/X`` tells the outcome later; the same request sent again
under its id is answered from the ledger's record (200 committed, 409 refused) or as
still pending (202), and never applies twice (:mod:`federation.node.requests`).

An intent must say what its route does: the VM of the path,
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
from federation.node.intents import PowerVm
from federation.node.metrics import NodeCollector
from federation.node.status import (
    migration_status,
    peer_problems,
    policy_doc,
    status,
    vm_doc,
    vms_doc,
)
from federation.vms.backend import VmInfo
from federation.vms.retention import PurgeVm
from mesh import wire

if TYPE_CHECKING:
    from federation.node.assembly import Node

__all__ = ["ApiError", "Answer", "handle_request", "pending_answer", "KNOWN"]

JSON = "application/json"
#: Routes that exist (for 405 versus 404).
KNOWN = ("/", "/dashboard", "/health", "/ready", "/metrics", "/api/status", "/api/vms",
         "/api/imports", "/api/migrations", "/api/policy", "/api/requests")


#: The reads that list every VM of the backend (read in a worker thread first).
LISTING = ("/api/status", "/api/vms", "/metrics")


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
    """Ready: the node runs, has a ledger, and reaches a PBFT quorum (itself included).
    Peers refused for another key or another federation file are named either way."""
    problems = peer_problems(node)
    if not node.started.is_set():
        return False, "starting"
    if node.core is None:
        return False, "; ".join([node.no_ledger, *problems])
    replica = node.core.replica.status_record()
    connected = len(node.runtime.links) + 1
    if connected < replica.quorum:
        return False, "; ".join([
            f"this DC cannot reach a quorum: {connected} of {len(replica.members)} DCs "
            f"connected, a quorum is {replica.quorum}", *problems])
    if problems:
        return True, "; ".join(["ready (a quorum is connected), but", *problems])
    return True, "ready"


def _tail(path: str, prefix: str) -> str:
    return urllib.parse.unquote(path[len(prefix):])


def _ledger_bound(method: str, path: str) -> bool:
    """The routes whose request goes to the ledger (idempotent by request id)."""
    return ((method == "POST" and path in ("/api/vms", "/api/migrations", "/api/policy"))
            or (method == "DELETE" and path.startswith("/api/vms/"))
            or (method == "POST" and path.startswith("/api/migrations/")
                and path.endswith("/cancel")))


def _with_subject(doc: dict[str, Any], request: dict[str, Any], path: str) -> dict[str, Any]:
    if path == "/api/migrations" and request.get("subject"):
        doc["id"] = request["subject"]  # the migration id
    return doc


def pending_answer(node: Node, caller: Caller, path: str, why: str) -> Answer:
    """202 "pending, id X": the ledger has not answered the caller's request yet."""
    assert caller.request is not None
    rid = caller.request.nonce
    request = node.request_outcome(caller.operator, rid)
    if request["outcome"] in ("committed", "refused"):
        return _recorded(request, path)
    return _json(202, _with_subject({
        "pending": True, "request_id": rid, "request": request,
        "message": f"pending, id {rid}: {why}; `dwcp status --request {rid}` (GET "
                   f"/api/requests/{rid}) tells committed or refused; sending the same "
                   "request again under this id never applies it twice"}, request, path))


def _recorded(request: dict[str, Any], path: str) -> Answer:
    """The answer to a request the ledger already executed: its first outcome."""
    rid = request["request_id"]
    doc = _with_subject({"request_id": rid, "request": request, "resubmitted": True},
                        request, path)
    if request["outcome"] == "refused":
        return _json(409, doc | {"error": f"request {rid} was refused by the ledger: "
                                          f"{request['error']}"})
    return _json(200, doc)


async def handle_request(node: Node, caller: Caller, method: str, path: str,
                         nursery: trio.Nursery) -> Answer:
    """The answer to one request the door let in (``nursery`` runs an import's copy)."""
    ledger_bound = caller.request is not None and _ledger_bound(method, path)
    try:
        if ledger_bound:
            assert caller.request is not None
            known = node.request_outcome(caller.operator, caller.request.nonce)
            if known["outcome"] in ("committed", "refused"):
                return _recorded(known, path)
            if known["outcome"] == "pending" and not known["timed_out"]:
                return pending_answer(node, caller, path, "this request is on its way "
                                      "to the ledger already")
            # a pending request this node stopped waiting for goes to the ledger again:
            # the ledger executes it once, whichever copy comes first
        answer = await _route(node, caller, method, path, nursery)
        if ledger_bound and answer.content_type == JSON and answer.status < 300:
            assert caller.request is not None
            doc = json.loads(answer.body)
            if isinstance(doc, dict):
                answer = _json(answer.status, doc | {"request_id": caller.request.nonce})
        return answer
    except LedgerTimeout as exc:
        if ledger_bound:
            return pending_answer(node, caller, path, str(exc))
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
    if method == "GET" and path.startswith("/api/requests/"):
        parts = _tail(path, "/api/requests/").split("/")
        if len(parts) == 1 and parts[0]:
            return _json(200, node.request_outcome(caller.operator, parts[0]))
        if len(parts) == 2 and all(parts):
            return _json(200, node.request_outcome(parts[0], parts[1]))
        raise ApiError(404, f"no route {path}: /api/requests/ID or /api/requests/OPERATOR/ID")
    if method == "GET":
        local = None
        if path in LISTING:
            # every VM's metadata, read from disk in a worker thread: about 1 ms per VM
            # under load (250 VMs: 230 ms), which on the event loop held up the links'
            # keepalives and PBFT for every dashboard poll of a fleet
            local = await trio.to_thread.run_sync(node.backend.list_vms)
        return _read(node, path, local)
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
    if method == "POST" and path.startswith("/api/vms/") and path.endswith(("/start", "/stop")):
        vm, _, verb = _tail(path, "/api/vms/").rpartition("/")
        _intent(caller, PowerVm)
        assert caller.request is not None
        info = await node.power_vm(vm, verb == "start", caller.request.authorization)
        return _json(200, {"name": info.name, "epoch": info.epoch, "state": info.state.value})
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
        if result is None:
            return _json(200, {"name": vm, "deleted": True, "epoch": None,
                               "staged_only": True})
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
        recorded = await node.set_policy(policy, authorization=caller.request.authorization)
        return _json(200, policy_doc(recorded))
    return _not_found(method, path)


def _read(node: Node, path: str, local: list[VmInfo] | None = None) -> Answer:
    if path == "/":
        return Answer(200, "text/html; charset=utf-8", PAGE)
    if path == "/health":
        return Answer(200, JSON, b'{"status":"ok"}')
    if path == "/ready":
        ok, why = _ready(node)
        return _json(200 if ok else 503, {"ready": ok, "reason": why,
                                          "problems": peer_problems(node)})
    if path == "/metrics":
        registry = CollectorRegistry(auto_describe=False)
        registry.register(NodeCollector(node, local))
        return Answer(200, CONTENT_TYPE_LATEST, generate_latest(registry))
    if path == "/api/status":
        return _json(200, status(node, local))
    if path == "/api/vms":
        return _json(200, vms_doc(node, local))
    if path.startswith("/api/vms/") and path.endswith("/console"):
        vm = _tail(path[:-len("/console")], "/api/vms/")
        return _json(200, {"name": vm, "console": node.console(vm)})
    if path.startswith("/api/vms/") and "/" not in path[len("/api/vms/"):]:
        vm = _tail(path, "/api/vms/")
        found = vm_doc(node, vm)
        if found is None:
            raise ApiError(404, f"no VM {vm!r} in the ledger or here")
        return _json(200, found)
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
