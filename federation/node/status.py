"""What a node reports: the ``/api/status`` document and one migration's.

Read from the live objects at request time (nothing is cached, so a request never shows
a stale number), each through the narrow read-only interface it offers: the runtime's
links, the mesh control core's :meth:`~mesh.links.control_plane.MeshControl.status`, the
replica's :meth:`~consensus.pbft.replica.Replica.status_record`, the node core's
migration views (:mod:`federation.migration.dc_status`) and ledger, the VM backend's
list, and the data plane's :class:`~federation.migration.round_counters.TransferCounters`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import attrs

from consensus.ledger import SetPolicy
from federation.vms.backend import VmError, VmInfo
from mesh.hde.image import PAGE_SIZE
from mesh.links.routes import BULK, CONTROL

if TYPE_CHECKING:
    from federation.node.assembly import Node

__all__ = ["status", "migration_status", "policy_doc", "vms_doc", "vm_doc",
           "STATUS_MIGRATIONS"]

#: The migrations ``/api/status`` lists: the 100 begun last in the ledger, and every one
#: under way here (``migrations_total`` says how many there are in all; ``GET
#: /api/migrations/ID`` shows any one). The ledger keeps every migration's record, so a
#: list of them all grows with the federation's history, and so did the cost of a poll.
STATUS_MIGRATIONS = 100


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def policy_doc(policy: SetPolicy) -> dict[str, Any]:
    """The rollout policy as JSON (``GET``/``POST /api/policy``, ``policy`` in the status),
    its lists sorted and without repeats, as the ledger records them."""
    return {"v3_percent": policy.v3_percent, "target_dcs": sorted(set(policy.target_dcs)),
            "target_vms": sorted(set(policy.target_vms)),
            "target_regions": sorted(set(policy.target_regions)),
            "excluded_dcs": sorted(set(policy.excluded_dcs)),
            "kill_switch": policy.kill_switch,
            "max_abort_percent": policy.max_abort_percent, "min_ended": policy.min_ended,
            "max_verify_failures": policy.max_verify_failures,
            "v3_ended": policy.v3_ended, "v3_aborted": policy.v3_aborted,
            "v3_verify_failures": policy.v3_verify_failures,
            "rolled_back": policy.rolled_back}


def arrival(node: Node, vm: str, mid: str) -> dict[str, Any] | None:
    """How the guest of migration ``mid`` arrived here, where the VM backend measures it
    (qemu): ``downtime_ms`` and, phase by phase, ``stop_window_ms``."""
    get = getattr(node.backend, "arrival", None)
    if not callable(get):
        return None
    try:
        got = get(vm)
    except VmError:
        return None
    if not got or got.get("migration_id") != mid:
        return None
    return dict(got)


def downtime_ms(node: Node, vm: str, mid: str) -> float | None:
    """The guest's downtime in migration ``mid`` as this target measured it (the source's
    QMP ``stop`` to this node's ``cont``), where the VM backend measures one (qemu)."""
    got = arrival(node, vm, mid)
    return None if got is None else float(got["downtime_ms"])


def migration_status(node: Node, mid: str) -> dict[str, Any] | None:
    core = node.core
    view = core.migration(mid) if core is not None else None
    if view is None:
        return None
    out: dict[str, Any] = {"id": mid}
    rec, session = view.ledger, view.session
    if rec is not None:
        out.update(vm=rec.vm, source=rec.source, target=rec.target, epoch=rec.epoch,
                   ledger=rec.state)
    if session is not None:
        out.update(vm=session.vm, source=session.source, target=session.target,
                   role=session.role, phase=session.phase, round=session.round,
                   bytes_sent=session.bytes_sent, wire_bytes=session.wire_bytes,
                   pages_sent=session.bytes_sent // PAGE_SIZE,
                   total_bytes=session.total_bytes, dirty_rate=session.dirty_rate,
                   throughput=session.throughput, eta=_finite(session.eta),
                   version=session.version, reason=session.reason)
        counters = node.rounds.counters
        if session.target == node.name:
            out["received_bytes"] = counters.received.get(mid, 0)
            out["downtime_ms"] = downtime_ms(node, session.vm, mid)
            got = arrival(node, session.vm, mid)
            if got is not None:
                # the source's stop (wall clock): where the nodes' log times start the window
                out["stopped_at"] = float(got["stopped_at"])
                # the start's split: its durable write, then QMP status and cont
                out["start_split_ms"] = {k: got[k] for k in ("start_meta_ms", "start_cont_ms")
                                         if k in got}
            if got is not None and "stop_window_ms" in got:
                out["stop_window_ms"] = dict(got["stop_window_ms"])
        else:  # rounds delivered per data-plane version ("v1", "v3"), and the v3
            # bulk streams opened per DC that relayed them ("direct" for none)
            out["data_plane"] = dict(counters.paths.get(mid, {}))
            out["streams"] = dict(counters.streams.get(mid, {}))
            if session.stop_reserve or session.stop_bias != 1.0:
                # the stop window's fixed part the round policy reserved out of the limit
                out["stop_reserve_ms"] = round(session.stop_reserve * 1000, 1)
                out["stop_bias"] = round(session.stop_bias, 4)
                out["reserve_measured"] = list(session.reserve_measured)
            if session.stop_costs is not None:
                # what this migration measured of its own stop window (the next one's)
                out["stop_costs"] = {k: None if v is None else round(v, 4)
                                     for k, v in session.stop_costs.items()}
    if rec is not None and rec.reason:
        # why it aborted, in the words of the DC that decided, as every ledger holds it
        # (a side that only saw the ledger's abort knows no better reason of its own)
        out.update(reason=rec.reason, cause=rec.cause)
    if view.progress is not None:
        out["progress"] = attrs.asdict(view.progress)
        if not math.isfinite(view.progress.eta):
            out["progress"]["eta"] = None
    if view.outcome is not None:
        out["outcome"] = attrs.asdict(view.outcome)
    return out


def status(node: Node, local: list[VmInfo] | None = None) -> dict[str, Any]:
    """The ``/api/status`` document; ``local``: the backend's VM list if the caller read
    it already (off the event loop)."""
    mesh = node.control.status()
    links = node.runtime.links
    members = {p.peer: p.member.name.lower() for p in mesh.peers}
    estimates = {p.peer: {
        "connected": p.peer in links,
        "rtt_ms": p.rtt_ms,
        "loss": p.loss,
        "bandwidth_mbps": p.bandwidth_mbps,
        "down": p.down,
        "mode": None if p.mode is None else p.mode.value,
    } for p in mesh.peers}
    routes = {kind: {p.peer: None if (hops := p.route(kind)) is None else list(hops)
                     for p in mesh.peers} for kind in (CONTROL, BULK)}
    vms = vms_doc(node, local)
    core = node.core
    if core is None:
        ledger_doc: dict[str, Any] = {"unavailable": node.no_ledger}
        migrations: list[Any] = []
        total = 0
        policy = None
    else:
        rstat = core.replica.status_record()
        ledger_doc = {"height": rstat.last_executed, "view": rstat.view,
                      "primary": rstat.primary, "active": rstat.active,
                      "stable_checkpoint": rstat.stable_checkpoint,
                      "byzantine": rstat.evidence}
        policy = policy_doc(core.ledger.policy)
        ids, total = core.recent_migration_ids(STATUS_MIGRATIONS)
        migrations = [migration_status(node, m) for m in ids]
    return {
        "dc": node.name,
        "federation": node.fed.id,
        "data_plane": node.data_plane_summary,
        "members": members,
        "links": estimates,
        "routes": routes,
        "ledger": ledger_doc,
        "policy": policy,
        "vms": vms,
        "migrations": migrations,
        "migrations_total": total,
        "restoring": core.restoring() if core is not None else [],
        # the stop window's fixed part a migration from here reserves out of its
        # downtime limit, from this node's recent measurements (stop_costs.StopHistory)
        "stop_reserve": node.stop_history.summary(),
        "problems": peer_problems(node),
    }


def _vm_doc(name: str, rec: Any, info: Any) -> dict[str, Any]:
    return {"name": name,
            "owner": None if rec is None else rec.owner,
            "epoch": None if rec is None else rec.epoch,
            "migrating": None if rec is None else rec.migration_id,
            "here": None if info is None else info.state.value,
            "pages": None if info is None else info.total_pages}


def vms_doc(node: Node, listed: list[VmInfo] | None = None) -> list[dict[str, Any]]:
    """Every VM the ledger or this DC's backend knows (``GET /api/vms``, ``vms`` in the
    status), by name; ``listed``: the backend's list if the caller read it already."""
    local = {i.name: i for i in (node.backend.list_vms() if listed is None else listed)}
    ledger_vms = node.core.ledger.vms if node.core is not None else {}
    return [_vm_doc(name, ledger_vms.get(name), local.get(name))
            for name in sorted(set(ledger_vms) | set(local))]


def vm_doc(node: Node, name: str) -> dict[str, Any] | None:
    """One VM's entry of :func:`vms_doc` (``GET /api/vms/NAME``), from its own record and
    its own directory: an operator's script asking about one VM of a fleet of thousands
    does not make the node read every VM's metadata (None: nobody knows it)."""
    rec = node.core.ledger.vms.get(name) if node.core is not None else None
    try:
        info = node.backend.info(name)
    except VmError:
        info = None
    if rec is None and info is None:
        return None
    return _vm_doc(name, rec, info)


def peer_problems(node: Node) -> list[str]:
    """Peers this DC refused because they present another key than its federation file,
    or run another federation file (mesh.runtime.node_runtime.MISMATCHES), as sentences."""
    problems = node.runtime.peer_problems
    return [problems[p] for p in sorted(problems)]
