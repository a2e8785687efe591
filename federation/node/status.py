"""What a node reports: the ``/api/status`` document and the ``/metrics`` families.

Both are read from the live objects at request time (nothing is cached, so a
scrape never shows a stale number): the runtime's links and refusals, the mesh
control core's members, link estimates, modes and routes, the replica's view,
height and counters, the ledger's VMs and migrations, the node core's sessions and
the data plane's counters.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import attrs
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from consensus.ledger import SetPolicy
from mesh.gossip.membership import State
from mesh.links.modes import Mode
from mesh.links.routes import BULK, CONTROL

if TYPE_CHECKING:
    from federation.migration.dc_core import NodeCore
    from federation.node.assembly import Node

__all__ = ["status", "migration_status", "policy_doc", "NodeCollector"]


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def policy_doc(policy: SetPolicy) -> dict[str, Any]:
    """The rollout policy as JSON (``GET``/``POST /api/policy``, ``policy`` in the status),
    its lists sorted and without repeats, as the ledger records them."""
    return {"v3_percent": policy.v3_percent, "target_dcs": sorted(set(policy.target_dcs)),
            "target_vms": sorted(set(policy.target_vms)), "kill_switch": policy.kill_switch}


def migration_status(node: Node, mid: str) -> dict[str, Any] | None:
    core = node.core
    if core is None:
        return None
    session = core.sessions.get(mid)
    rec = core.replica.ledger.migrations.get(mid)
    if session is None and rec is None:
        return None
    out: dict[str, Any] = {"id": mid}
    if rec is not None:
        out.update(vm=rec.vm, source=rec.source, target=rec.target, epoch=rec.epoch,
                   ledger=rec.state)
    if session is not None:
        out.update(vm=session.vm, source=session.source, target=session.target,
                   role=session.role.value, phase=session.phase.value, round=session.round,
                   bytes_sent=session.bytes_sent, wire_bytes=session.wire_bytes,
                   total_bytes=session.total_bytes, dirty_rate=session.dirty_rate,
                   throughput=session.throughput, eta=_finite(session.eta),
                   version=session.version, reason=session.reason)
        if session.target == node.name:
            out["received_bytes"] = node.received_bytes.get(mid, 0)
        else:  # rounds delivered per data-plane version ("v1", "v3"), and the v3
            # bulk streams opened per DC that relayed them ("direct" for none)
            out["data_plane"] = dict(node.transfer_paths.get(mid, {}))
            out["streams"] = dict(node.stream_paths.get(mid, {}))
    progress = core.progress.get(mid)
    if progress is not None:
        out["progress"] = attrs.asdict(progress)
        if not math.isfinite(progress.eta):
            out["progress"]["eta"] = None
    outcome = core.outcomes.get(mid)
    if outcome is not None:
        out["outcome"] = attrs.asdict(outcome)
    return out


def status(node: Node) -> dict[str, Any]:
    ctl = node.control
    me = node.name
    links = node.runtime.links
    members = {p: ctl.membership.state_of(p).name.lower() for p in ctl.peers}
    estimates: dict[str, Any] = {}
    for p in ctl.peers:
        view = ctl.table.view(me, p)
        own = ctl.table.entries.get((me, p))  # our measurements, before the peer reported
        mode = ctl.modes.mode(me, p)
        estimates[p] = {
            "connected": p in links,
            "rtt_ms": view.rtt_ms if view else (own.rtt_ms or None) if own else None,
            "loss": None if view is None else view.loss,
            "bandwidth_mbps": view.bw_mbps if view else own.bw_mbps if own else None,
            "down": None if view is None else view.down,
            "mode": None if mode is None else mode.value,
        }
    routes: dict[str, Any] = {}
    for kind in (CONTROL, BULK):
        for p in ctl.peers:
            route = ctl.route(kind, p)
            routes.setdefault(kind, {})[p] = None if route is None else list(route.hops)
    local = {i.name: i for i in node.backend.list_vms()}
    core = node.core
    ledger_vms = core.replica.ledger.vms if core is not None else {}
    vms = []
    for name in sorted(set(ledger_vms) | set(local)):
        rec = ledger_vms.get(name)
        info = local.get(name)
        vms.append({
            "name": name,
            "owner": None if rec is None else rec.owner,
            "epoch": None if rec is None else rec.epoch,
            "migrating": None if rec is None else rec.migration_id,
            "here": None if info is None else info.state.value,
            "pages": None if info is None else info.total_pages,
        })
    if core is None:
        ledger_doc: dict[str, Any] = {"unavailable": node.no_ledger}
        migrations: list[Any] = []
        policy = None
    else:
        rstat = core.replica.status()
        # byzantine: DCs convicted by a signed equivocation proof, and per peer the
        # messages refused for a bad signature or as malformed (consensus.evidence)
        ledger_doc = {"height": rstat["last_executed"], "view": rstat["view"],
                      "primary": rstat["primary"], "active": rstat["active"],
                      "stable_checkpoint": rstat["stable_checkpoint"],
                      "byzantine": rstat["evidence"]}
        policy = policy_doc(core.replica.ledger.policy)
        mids = sorted(set(core.sessions) | set(core.replica.ledger.migrations))
        migrations = [migration_status(node, m) for m in mids]
    return {
        "dc": me,
        "federation": node.fed.id,
        "data_plane": node.data_plane,
        "members": members,
        "links": estimates,
        "routes": routes,
        "ledger": ledger_doc,
        "policy": policy,
        "vms": vms,
        "migrations": migrations,
        "restoring": sorted(core.unrestored) if core is not None else [],
    }


class NodeCollector(Collector):
    """The node's Prometheus metrics, computed at scrape time."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        n = self.node
        ts = n.transfer_stats
        rounds = CounterMetricFamily("dwcp_transfer_rounds", "Pre-copy rounds sent, by result",
                                     labels=["result"])
        rounds.add_metric(["delivered"], ts["rounds_sent"])
        rounds.add_metric(["failed"], ts["rounds_failed"])
        yield rounds
        sent = CounterMetricFamily("dwcp_transfer_bytes", "VM state bytes moved by the data "
                                   "plane (logical: page bytes; wire: encoded messages)",
                                   labels=["direction", "kind"])
        sent.add_metric(["out", "logical"], ts["bytes_sent"])
        sent.add_metric(["out", "wire"], ts["wire_bytes_sent"])
        sent.add_metric(["in", "logical"], ts["bytes_received"])
        yield sent
        by_version = CounterMetricFamily(
            "dwcp_transfer_version_bytes", "VM state bytes sent by data-plane version "
            "(v1: one stream over the control link; v3: HDE over AMST)",
            labels=["version", "kind"])
        versioned = CounterMetricFamily("dwcp_transfer_version_rounds",
                                        "Pre-copy rounds delivered by data-plane version",
                                        labels=["version"])
        for v in ("v1", "v3"):
            by_version.add_metric([v, "logical"], ts[f"bytes_sent_{v}"])
            by_version.add_metric([v, "wire"], ts[f"wire_bytes_sent_{v}"])
            versioned.add_metric([v], ts[f"rounds_sent_{v}"])
        yield by_version
        yield versioned
        chunks = CounterMetricFamily("dwcp_transfer_chunks_received", "Page chunks received, "
                                     "by result", labels=["result"])
        chunks.add_metric(["written"], ts["chunks_received"])
        chunks.add_metric(["refused"], ts["chunks_refused"])
        yield chunks
        migs = CounterMetricFamily("dwcp_migrations", "Migrations ended, by role and outcome",
                                   labels=["role", "outcome"])
        ended: dict[tuple[str, str], int] = {}
        core = n.core
        for o in core.outcomes.values() if core is not None else ():
            ended[(o.role, o.outcome)] = ended.get((o.role, o.outcome), 0) + 1
        for role in ("source", "target"):
            for outcome in ("committed", "aborted", "refused"):
                migs.add_metric([role, outcome], ended.get((role, outcome), 0))
        yield migs
        active = GaugeMetricFamily("dwcp_migrations_active", "Migration sessions not ended")
        sessions = core.sessions.values() if core is not None else ()
        active.add_metric([], sum(1 for s in sessions if not s.done))
        yield active
        members = GaugeMetricFamily("dwcp_members", "Peers by membership state",
                                    labels=["state"])
        states = [n.control.membership.state_of(p) for p in n.control.peers]
        for st in State:
            members.add_metric([st.name.lower()], sum(1 for s in states if s is st))
        yield members
        modes = GaugeMetricFamily("dwcp_links", "Links from this DC by mode", labels=["mode"])
        seen = [n.control.modes.mode(n.name, p) for p in n.control.peers]
        for m in Mode:
            modes.add_metric([m.value], sum(1 for s in seen if s is m))
        modes.add_metric(["unclassified"], sum(1 for s in seen if s is None))
        yield modes
        connected = GaugeMetricFamily("dwcp_links_connected", "Peers with an open control link")
        connected.add_metric([], len(n.runtime.links))
        yield connected
        if core is not None:  # no ledger, no ledger figures (rather than made-up zeros)
            yield from _ledger_metrics(core)
        refused = CounterMetricFamily("dwcp_channels_refused", "Control channels refused or "
                                      "ended by a channel fault, by reason", labels=["reason"])
        for reason, count in sorted(n.runtime.refused.items()):
            refused.add_metric([reason], count)
        yield refused
        data_refused = CounterMetricFamily(
            "dwcp_data_connections_refused", "Data endpoint connections dropped or refused "
            "before or during their handshake, by reason", labels=["reason"])
        for reason, count in sorted(n.v3.receiver.server.refused.items()):
            data_refused.add_metric([reason], count)
        yield data_refused
        gossip = CounterMetricFamily("dwcp_gossip_refused", "Gossip statements refused "
                                     "(forged, out of range, over budget), by reason",
                                     labels=["reason"])
        for reason, count in sorted(n.control.statements.refused.items()):
            gossip.add_metric([reason], count)
        yield gossip
        vms = GaugeMetricFamily("dwcp_vms", "VMs held here, by state", labels=["state"])
        held: dict[str, int] = {}
        for info in n.backend.list_vms():
            held[info.state.value] = held.get(info.state.value, 0) + 1
        for state, count in sorted(held.items()):
            vms.add_metric([state], count)
        yield vms
        yield from n.v3.metrics()


def _ledger_metrics(core: NodeCore) -> Iterator[Metric]:
    rep = core.replica
    vc = CounterMetricFamily("dwcp_view_changes", "PBFT view changes", labels=["event"])
    vc.add_metric(["started"], rep.metrics.get("view_changes_started", 0))
    vc.add_metric(["completed"], rep.metrics.get("view_changes_completed", 0))
    yield vc
    view = GaugeMetricFamily("dwcp_ledger_view", "PBFT view of this replica")
    view.add_metric([], rep.view)
    yield view
    height = GaugeMetricFamily("dwcp_ledger_height", "Last executed ledger sequence number")
    height.add_metric([], rep.last_exec)
    yield height
    owned = GaugeMetricFamily("dwcp_ledger_vms", "VMs in the ledger, by owner", labels=["owner"])
    owners: dict[str, int] = {}
    for rec in rep.ledger.vms.values():
        owners[rec.owner] = owners.get(rec.owner, 0) + 1
    for owner in rep.q.members:
        owned.add_metric([owner], owners.get(owner, 0))
    yield owned
