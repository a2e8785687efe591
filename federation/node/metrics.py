"""The node's ``/metrics`` families (Prometheus), computed at scrape time from the same
read-only interfaces as the status (:mod:`federation.node.status`): the data plane's
:class:`~federation.migration.round_counters.TransferCounters`, the node core's
outcomes, the mesh control core's :meth:`~mesh.links.control_plane.MeshControl.status`,
the replica's :meth:`~consensus.pbft.replica.Replica.status_record`, the runtime's
refusals, the VM backend's list and the relay's own counters."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from federation.dataplane.relay import DataRelay
from federation.migration.dc_core import NodeCore
from federation.migration.rollout import KNOWN_VERSIONS
from federation.migration.round_counters import TransferCounters, version_label
from federation.vms.backend import VmInfo
from federation.vms.retention import VmUsage
from mesh.gossip.members import State
from mesh.links.modes import Mode

if TYPE_CHECKING:
    from federation.node.assembly import Node

__all__ = ["NodeCollector", "trio_task_count"]


def trio_task_count() -> int | None:
    """The trio tasks alive in this process: the root task and every task under it
    (``dwcp bench soak`` watches it for tasks that are started and never end); None
    outside a trio run."""
    try:
        root = trio.lowlevel.current_root_task()
    except RuntimeError:
        return None
    if root is None:
        return None
    count, stack = 0, [root]
    while stack:
        task = stack.pop()
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


class NodeCollector(Collector):
    """The node's Prometheus metrics, computed at scrape time; ``local``: the backend's
    VM list if the caller read it already (off the event loop, :mod:`federation.api.routes`)."""

    def __init__(self, node: Node, local: list[VmInfo] | None = None) -> None:
        self.node = node
        self.local = local

    def collect(self) -> Iterator[Metric]:
        n = self.node
        yield from _transfer_metrics(n.rounds.counters)
        core = n.core
        yield from _migration_metrics(core)
        mesh = n.control.status()
        members = GaugeMetricFamily("dwcp_members", "Peers by membership state",
                                    labels=["state"])
        states = [p.member for p in mesh.peers]
        for st in State:
            members.add_metric([st.name.lower()], sum(1 for s in states if s is st))
        yield members
        modes = GaugeMetricFamily("dwcp_links", "Links from this DC by mode", labels=["mode"])
        seen = [p.mode for p in mesh.peers]
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
        for reason, count in mesh.gossip_refused:
            gossip.add_metric([reason], count)
        yield gossip
        vms = GaugeMetricFamily("dwcp_vms", "VMs held here, by state", labels=["state"])
        held: dict[str, int] = {}
        for info in self.local if self.local is not None else n.backend.list_vms():
            held[info.state.value] = held.get(info.state.value, 0) + 1
        for state, count in sorted(held.items()):
            vms.add_metric([state], count)
        yield vms
        yield from _disk_metrics(n.backend)
        tasks = trio_task_count()
        if tasks is not None:  # scraped inside the node's trio run, as the API does
            alive = GaugeMetricFamily("dwcp_trio_tasks", "Trio tasks alive in the node "
                                      "process (the root task and every task under it)")
            alive.add_metric([], tasks)
            yield alive
        yield from _relay_metrics(n.v3.relay, n.rounds.counters)


def _disk_metrics(backend: object) -> Iterator[Metric]:
    """What the VMs take on this DC's disk (a backend with ``usage``: the image backend),
    the retained copies against their budget, and what the budget and operators removed."""
    usage = getattr(backend, "usage", None)
    if usage is None:
        return
    held: list[VmUsage] = usage()
    disk = GaugeMetricFamily("dwcp_vm_disk_bytes", "Bytes allocated on disk to each VM "
                             "held here, by state", labels=["vm", "state"])
    for u in held:
        disk.add_metric([u.name, u.state.value], u.disk_bytes)
    yield disk
    retained = [u for u in held if u.retained]
    rbytes = GaugeMetricFamily("dwcp_retained_bytes", "Bytes of the retained copies (VMs "
                               "that migrated away, kept as bases for later deltas)")
    rbytes.add_metric([], sum(u.disk_bytes for u in retained))
    yield rbytes
    rcount = GaugeMetricFamily("dwcp_retained_copies", "Retained copies held here")
    rcount.add_metric([], len(retained))
    yield rcount
    budget = getattr(backend, "retain_bytes", None)
    if budget is not None:
        b = GaugeMetricFamily("dwcp_retained_budget_bytes", "The retained copies' budget; "
                              "beyond it the least recently used are removed")
        b.add_metric([], budget)
        yield b
    purged: dict[str, tuple[int, int]] = getattr(backend, "purged", {})
    removed = CounterMetricFamily("dwcp_retained_removed", "Copies removed since start, by "
                                  "reason (budget, purge, staged)", labels=["reason"])
    removed_bytes = CounterMetricFamily("dwcp_retained_removed_bytes", "Bytes freed by "
                                        "removing copies since start, by reason",
                                        labels=["reason"])
    for reason in ("budget", "purge", "staged"):
        count, size = purged.get(reason, (0, 0))
        removed.add_metric([reason], count)
        removed_bytes.add_metric([reason], size)
    yield removed
    yield removed_bytes
    sealed = GaugeMetricFamily("dwcp_at_rest_sealed", "1 if this node seals VM images at "
                               "rest with its at-rest key, else 0")
    sealed.add_metric([], 1 if getattr(backend, "seal_key", None) is not None else 0)
    yield sealed


def _transfer_metrics(c: TransferCounters) -> Iterator[Metric]:
    rounds = CounterMetricFamily("dwcp_transfer_rounds", "Pre-copy rounds sent, by result",
                                 labels=["result"])
    rounds.add_metric(["delivered"], c.rounds_sent)
    rounds.add_metric(["failed"], c.rounds_failed)
    yield rounds
    sent = CounterMetricFamily("dwcp_transfer_bytes", "VM state bytes moved by the data "
                               "plane (logical: page bytes; wire: encoded messages)",
                               labels=["direction", "kind"])
    sent.add_metric(["out", "logical"], c.bytes_sent)
    sent.add_metric(["out", "wire"], c.wire_bytes_sent)
    sent.add_metric(["in", "logical"], c.bytes_received)
    yield sent
    by_version = CounterMetricFamily(
        "dwcp_transfer_version_bytes", "VM state bytes sent by data-plane version "
        "(v1: one stream over the control link; v3: HDE over AMST)",
        labels=["version", "kind"])
    versioned = CounterMetricFamily("dwcp_transfer_version_rounds",
                                    "Pre-copy rounds delivered by data-plane version",
                                    labels=["version"])
    for v in KNOWN_VERSIONS:
        counts, label = c.version(v), version_label(v)
        by_version.add_metric([label, "logical"], counts.bytes)
        by_version.add_metric([label, "wire"], counts.wire_bytes)
        versioned.add_metric([label], counts.rounds)
    yield by_version
    yield versioned
    chunks = CounterMetricFamily("dwcp_transfer_chunks_received", "Page chunks received, "
                                 "by result", labels=["result"])
    chunks.add_metric(["written"], c.chunks_received)
    chunks.add_metric(["refused"], c.chunks_refused)
    yield chunks


def _migration_metrics(core: NodeCore | None) -> Iterator[Metric]:
    migs = CounterMetricFamily("dwcp_migrations", "Migrations ended, by role and outcome",
                               labels=["role", "outcome"])
    ended = core.outcome_counts() if core is not None else {}
    for role in ("source", "target"):
        for outcome in ("committed", "aborted", "refused"):
            migs.add_metric([role, outcome], ended.get((role, outcome), 0))
    yield migs
    active = GaugeMetricFamily("dwcp_migrations_active", "Migration sessions not ended")
    active.add_metric([], core.active_sessions() if core is not None else 0)
    yield active


def _ledger_metrics(core: NodeCore) -> Iterator[Metric]:
    rstat = core.replica.status_record()
    vc = CounterMetricFamily("dwcp_view_changes", "PBFT view changes", labels=["event"])
    vc.add_metric(["started"], rstat.view_changes_started)
    vc.add_metric(["completed"], rstat.view_changes_completed)
    yield vc
    view = GaugeMetricFamily("dwcp_ledger_view", "PBFT view of this replica")
    view.add_metric([], rstat.view)
    yield view
    height = GaugeMetricFamily("dwcp_ledger_height", "Last executed ledger sequence number")
    height.add_metric([], rstat.last_executed)
    yield height
    owned = GaugeMetricFamily("dwcp_ledger_vms", "VMs in the ledger, by owner", labels=["owner"])
    owners: dict[str, int] = {}
    for rec in core.ledger.vms.values():
        owners[rec.owner] = owners.get(rec.owner, 0) + 1
    for owner in rstat.members:
        owned.add_metric([owner], owners.get(owner, 0))
    yield owned
    yield from _rollout_metrics(core)


def _rollout_metrics(core: NodeCore) -> Iterator[Metric]:
    """The ledger's rollout policy and its counters (consensus.ledger_commands.SetPolicy):
    what docs/deploy/prometheus/alerts.yml watches."""
    p = core.ledger.policy
    pct = GaugeMetricFamily("dwcp_rollout_v3_percent", "The policy's v3 percentage")
    pct.add_metric([], p.v3_percent)
    yield pct
    kill = GaugeMetricFamily("dwcp_rollout_kill_switch", "1 while the kill switch is on "
                             "(v1 for every migration), by an admin or an automatic rollback")
    kill.add_metric([], int(p.kill_switch))
    yield kill
    rolled = GaugeMetricFamily("dwcp_rollout_rolled_back", "1 once the ledger rolled the "
                               "policy back to v1 on its own (a threshold crossed)")
    rolled.add_metric([], int(bool(p.rolled_back)))
    yield rolled
    ended = GaugeMetricFamily("dwcp_rollout_v3_migrations", "v3 migrations ended since the "
                              "policy was recorded, by result (aborted: not counting "
                              "operators' cancels)", labels=["result"])
    ended.add_metric(["ended"], p.v3_ended)
    ended.add_metric(["aborted"], p.v3_aborted)
    ended.add_metric(["verify_failed"], p.v3_verify_failures)
    yield ended
    limits = GaugeMetricFamily("dwcp_rollout_threshold", "The policy's rollback thresholds "
                               "(0: no such rule)", labels=["rule"])
    limits.add_metric(["max_abort_percent"], p.max_abort_percent)
    limits.add_metric(["min_ended"], p.min_ended)
    limits.add_metric(["max_verify_failures"], p.max_verify_failures)
    yield limits


def _relay_metrics(relay: DataRelay, c: TransferCounters) -> Iterator[Metric]:
    """The v3 data plane's relay (what this DC spliced for others) and the bulk paths its
    own streams took."""
    relayed = CounterMetricFamily("dwcp_relayed_bytes", "Bytes this DC spliced between "
                                  "other DCs' AMST streams (both ways; end-to-end "
                                  "encrypted, never decrypted here)")
    relayed.add_metric([], relay.relayed_bytes)
    yield relayed
    active = GaugeMetricFamily("dwcp_relays_active", "Connections this DC relays now")
    active.add_metric([], relay.active)
    yield active
    asked = CounterMetricFamily("dwcp_relay_requests", "Relay requests to this DC, by "
                                "answer", labels=["answer"])
    asked.add_metric(["accepted"], relay.accepted)
    for kind, count in sorted(relay.refused.items()):
        asked.add_metric([kind], count)
    yield asked
    paths = CounterMetricFamily("dwcp_bulk_streams", "AMST streams this DC opened "
                                "through a relay, and relay attempts that fell back to "
                                "the direct path", labels=["path"])
    paths.add_metric(["relayed"], c.relayed_streams)
    paths.add_metric(["fallback_direct"], c.relay_fallbacks)
    yield paths
