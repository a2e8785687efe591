"""One DC's node, assembled: what ``dwcp node`` runs.

:class:`Node` is wiring. Over one SQLite store in the data directory it connects, on the
control mesh's runtime (:class:`mesh.runtime.node_runtime.Runtime`):

- the mesh control core (:mod:`mesh.links.control_plane`: membership, link estimates and
  modes, routes);
- the node core (:mod:`federation.migration.dc_core`): the PBFT replica and ledger, and
  the migration sessions keyed by migration id; its ledger client
  (:mod:`federation.node.ledger_client`);
- the rounds core (:mod:`federation.migration.rounds`), hosted by the round scheduler
  (:mod:`federation.dataplane.scheduler`), with the data plane that carries its rounds:
  v1, one stream over the control link, and v3, HDE over AMST on the DC's ``data``
  endpoint (:mod:`federation.dataplane.v3`); each migration uses the highest version both
  DCs offered in their channel handshake and the ledger's rollout policy allows
  (:mod:`federation.migration.rollout`), round by round;
- the VM backend it is given (by default the ``image`` backend under ``<data dir>/vms``)
  and :class:`~federation.vms.actions.VmActions`, the one interpreter of the migration's
  VM actions: the sessions' through the VM worker (:mod:`federation.node.vm_worker`), the
  rounds' page actions through the scheduler.

The HTTP API (:mod:`federation.api.http`) is a front end over the node:
:func:`federation.api.http.serve_node` runs both.

State-changing operations (import, migrate, cancel, delete, policy) carry an
operator's signed request into the ledger, which every replica checks
(consensus.ledger): each operation takes the request the API verified at its door
(federation.api.door) as ``authorization``, and checks that its intent says what the
operation does. The node holds no operator key and signs nothing for anyone. An import
is staged first (the copy, confined to the node config's import directories,
:mod:`federation.node.imports`), then registered on a request signed after the copy.

``await node.ledger.submit(command)`` returns once f+1 replicas sent the same result
(:class:`consensus.ledger.LedgerResult`) and raises :class:`LedgerTimeout` when the
client gives up. After a restart the replica recovers from its durable log, every VM
that ran here and that the ledger gives to this DC runs again, and every persisted
migration record is restored (:mod:`federation.migration.restore`): resumed or aborted,
never lost.

A federation whose size is not 3f+1 >= 4 has no ledger: such a node runs the mesh
and its API, reports why in ``/api/status`` and ``/ready``, and refuses VM operations.
"""

from __future__ import annotations

import random
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from consensus.authz import Authorization
from consensus.ledger import (
    AbortMigration,
    CancelMigration,
    ChangePolicy,
    DeleteVm,
    ImportVm,
    LedgerResult,
    MigrateVm,
    RegisterVm,
    SetPolicy,
    UnregisterVm,
    recorded_policy,
)
from consensus.pbft.durable import ReplicaLog
from consensus.pbft.messages import MAX_COMMAND
from consensus.pbft.replica import Replica
from consensus.pbft.state import PbftConfig
from federation import config
from federation.config_print import federation_print
from federation.dataplane.scheduler import RoundEvents, RoundScheduler
from federation.dataplane.v3 import V3DataPlane
from federation.migration.dc_core import TAGS, NodeCore
from federation.migration.rollout import V1, V3, RolloutError
from federation.migration.round_events import SessionView
from federation.migration.rounds import RoundsCore
from federation.migration.source import SourceSession
from federation.migration.stop_costs import StopHistory, costs_of_arrival
from federation.migration.vocabulary import (
    MAX_MACHINE_SPEC,
    CancelRequested,
    CancelRound,
    MigrationError,
    SendRound,
    record_key,
)
from federation.node import reconcile
from federation.node.data_lock import DataDirLock
from federation.node.errors import LedgerTimeout, NodeError, NotTheSource, UnknownMigration
from federation.node.imports import ImportDirs, ImportStaging
from federation.node.intents import PowerVm
from federation.node.ledger_client import NodeLedger
from federation.node.node_config import DEFAULT_REQUEST_TIMEOUT
from federation.node.private_dir import private_dir
from federation.node.requests import OperatorRequests, request_key
from federation.node.vm_worker import VmWorker
from federation.vms.actions import VM_ACTIONS, VmActions
from federation.vms.backend import VmBackend, VmError, VmInfo, VmState
from federation.vms.image_backend import ImageBackend
from federation.vms.retention import PurgeVm
from federation.vms.sealing import SealKey
from mesh import identity, wire
from mesh.links import control_plane as control
from mesh.links.estimates import LinkTable
from mesh.runtime.log import JsonLog
from mesh.runtime.node_runtime import Peer, Runtime, wall_clock
from mesh.runtime.sqlite_store import SQLiteStore, StoreError
from mesh.versions import COLD_PUSH

__all__ = ["Node", "NodeError", "LedgerTimeout", "UnknownMigration", "NotTheSource",
           "DATA_PLANE", "TRANSFER_VERSIONS", "DOWNTIME_LIMIT", "link_Bps"]

#: What this node's data plane is (reported in /api/status; each migration's rounds by
#: version are in its own status, ``data_plane``).
DATA_PLANE = ("v1 single stream over the control link; v3 HDE over AMST on the data "
              "endpoint; per migration the highest version both DCs offer and the rollout "
              "policy allows")
#: The downtime a running guest's migration aims at unless its node config says otherwise
#: (``[qemu] downtime_limit_ms``): QEMU's default downtime-limit, 300 ms
#: (migration/options.c, DEFAULT_MIGRATE_SET_DOWNTIME), as issue 17 asks.
DOWNTIME_LIMIT = 0.3
#: A VM whose resume after a restart failed with an OSError (a full disk) is tried again
#: after 0.5 s, doubling to 8 s between tries (Node._resume_later).
RESUME_RETRY_S = (0.5, 8.0)
#: Ended migration sessions a node keeps (their status, last progress and outcome, for
#: ``/api/migrations/ID`` and ``/api/status``): those that ended in the last hour, at most
#: the 1,000 last. A forgotten one's view is then its ledger record alone (the ledger
#: keeps every migration's record); its outcome stays counted in the metrics, and its
#: persisted ``migration/<id>`` record is deleted (Node._drop_records). Without a bound,
#: a node keeps every session that ever ended here: ``dwcp bench soak`` made ~1,300 an
#: hour per node.
ENDED_KEEP_SECONDS = 3600.0
ENDED_KEEP_MAX = 1000
#: How often the node forgets what is past those bounds.
ENDED_SWEEP_SECONDS = 60.0
#: Transfer versions the node's data plane can carry: v1 (the rounds core over the control
#: link) and v3 (federation.dataplane.v3).
TRANSFER_VERSIONS = (V1, V3)


def _tag(intent: type) -> str:
    """An operator intent's wire tag (what the ledger's request record names)."""
    return str(intent.wire_tag)  # type: ignore[attr-defined]


def link_Bps(table: LinkTable, me: str, dst: str) -> float | None:
    """Bytes per second of the link ``me`` -> ``dst`` as the mesh measured it, for the round
    policy's judgement of round 1's dirty sample (federation.migration.precopy); where that
    direction has no figure yet, the other direction's (a return trip: the trip there
    measured ``dst`` -> ``me``, and DCs are joined by symmetric links far more often than
    not; without it a return's short round 1 was judged by its own pace on the wire, which
    it often did not last long enough to show, and the guest went unthrottled). None when
    neither direction was measured."""
    for src, to in ((me, dst), (dst, me)):
        view = table.view(src, to)
        mbps = None if view is None else view.bw_mbps
        if mbps:
            return mbps * 1e6 / 8
    return None


class _KeptIfItCan:
    """The node's store for what only helps (the stop window's history): a write that
    fails (a full disk, netns-chaos's fault) is logged, never raised into the core that
    measured it; the figures stay in memory."""

    def __init__(self, store: SQLiteStore, log: JsonLog) -> None:
        self.store = store
        self.log = log

    def get(self, key: str) -> bytes | None:
        return self.store.get(key)

    def keys(self, prefix: str = "") -> list[str]:
        return self.store.keys(prefix)

    def put(self, key: str, value: bytes, sync: bool = True) -> None:
        try:
            self.store.put(key, value, sync)
        except (StoreError, sqlite3.Error) as exc:
            self.log.event("store_write_skipped", key=key, error=str(exc))


class Node:
    def __init__(
        self,
        fed: config.Federation,
        name: str,
        ident: identity.Identity,
        data_dir: Path,
        *,
        backend: VmBackend | None = None,
        log: JsonLog | None = None,
        rng: random.Random | None = None,
        transfer_versions: Sequence[int] = TRANSFER_VERSIONS,
        import_dirs: Sequence[Path] = (),
        lock: DataDirLock | None = None,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        at_rest_key: SealKey | None = None,
        retained_max: int | None = None,
        downtime_limit: float = DOWNTIME_LIMIT,
        control_frames: bool = True,
        store: SQLiteStore | None = None,
    ) -> None:
        me = fed.dc(name)
        if ident.public != me.public_key:
            raise NodeError(f"the key's public key {ident.public} is not {name!r}'s key "
                            f"in {fed.source} ({me.public_key})")
        self.fed = fed
        self.name = name
        #: what this node offers in its channel handshakes: the federation's versions that
        #: its data plane carries (a DC may be configured down to v1 for a rollback)
        self.transfer_versions = tuple(sorted(set(fed.versions) & set(transfer_versions)))
        if not self.transfer_versions:
            raise NodeError(f"none of the transfer versions {sorted(set(transfer_versions))} "
                            f"is allowed by {fed.source} ({list(fed.versions)})")
        self.data_dir = data_dir
        #: the downtime a running guest's migration aims at (a VM with a machine spec)
        self.downtime_limit = downtime_limit
        self.rng = rng if rng is not None else random.Random()
        self.log = log if log is not None else JsonLog(name)
        private_dir(data_dir, self.log)
        # before anything in the directory is read: one node per data directory (a caller
        # that reads the directory first, e.g. to make a VM backend, takes it itself)
        self.lock = lock if lock is not None else DataDirLock(data_dir)
        try:
            # ``store``: <data dir>/node.sqlite3 opened by the caller (``dwcp node`` waits
            # for room to open it on a full disk: federation.cli.run_node)
            self.store = store if store is not None else SQLiteStore(data_dir / "node.sqlite3")
        except BaseException:
            self.lock.release()
            raise
        peers = [Peer(dc.name, dc.public_key, dc.control.host, dc.control.port)
                 for dc in fed.dcs if dc.name != name]
        self.runtime = Runtime(
            name=name, federation=fed.id, identity=ident, public_key=me.public_key,
            peers=peers, listen_host=me.control.host, listen_port=me.control.port,
            versions=self.transfer_versions, store=self.store, log=self.log,
            rng=random.Random(self.rng.getrandbits(64)), fed_print=federation_print(fed),
            framed=control_frames,
            # a v3 source takes the target's incoming roots before round 1 (V3Held)
            capabilities=(COLD_PUSH,) if V3 in self.transfer_versions else (),
        )
        self.control = control.attach(
            self.runtime, name, [p.name for p in peers], random.Random(self.rng.getrandbits(64)),
            store=self.store, modes=fed.modes)
        self.backend: VmBackend = (
            backend if backend is not None
            else ImageBackend(data_dir / "vms", seal_key=at_rest_key, retain_bytes=retained_max))
        # the fence's catch-up and the target's index refreshes hash changed 1 MiB blocks
        # on both cores (SHA-256 releases the GIL): they sit in the stop window
        self._hashing = ThreadPoolExecutor(max_workers=2, thread_name_prefix="vm-index")
        self.vm_actions = VmActions(self.backend, self._hashing)
        #: imports: the copy from the import directories, before the register
        self.imports = ImportStaging(self.backend, ImportDirs(import_dirs), self.log)
        #: None when the federation cannot run PBFT (n != 3f+1 >= 4); ``no_ledger`` says why
        self.core: NodeCore | None = None
        #: the fixed part of this node's stop windows, as its migrations measured it at
        #: either end (federation.migration.stop_costs): the round policy reserves it;
        #: kept in the node's store, so a restart does not fall back to the prior
        self.stop_history = StopHistory(store=_KeptIfItCan(self.store, self.log))
        if self.stop_history.load_error:
            self.log.event("stop_history_unreadable", error=self.stop_history.load_error)
        self.no_ledger = ""
        replica: Replica | None = None
        try:
            replica = Replica(name, ident, self.runtime.keys, ReplicaLog(self.store),
                              random.Random(self.rng.getrandbits(64)),
                              # a transferred checkpoint's ledger is rebuilt in a worker
                              # thread, not on the event loop (consensus.pbft.transfer)
                              PbftConfig(client_timeout=request_timeout,
                                         offload_restore=True),
                              operators=fed.operator_table(), wall=wall_clock,
                              previous_keys=fed.previous_keys())
        except ValueError as exc:
            self.no_ledger = f"no ledger in this federation: {exc}"
        self.ledger = NodeLedger(self.runtime, self.no_ledger)
        if replica is not None:
            self.core = NodeCore(name, replica, on_ledger_done=self.ledger.done,
                                 mode_of=lambda dst: self.control.modes.mode(name, dst),
                                 bandwidth_of=lambda dst: self._link_Bps(name, dst),
                                 on_ledger_moved=self._ledger_moved,
                                 regions={dc.name: dc.region for dc in fed.dcs if dc.region},
                                 stop_history=self.stop_history)
            self.core.unrestored.update(self._stored_records())
            self.runtime.add_core("node", self.core, TAGS, effects=self._effect)
        events = RoundEvents()
        self.v3 = V3DataPlane(fed=fed, name=name, runtime=self.runtime, control=self.control,
                              backend=self.backend, incoming=self.vm_actions.incoming.get,
                              data_dir=data_dir, log=self.log, report=events.put,
                              seal_shadows=at_rest_key is not None,
                              index_of=self.vm_actions.incoming_index,
                              fenced_indexes=self.vm_actions.fenced_indexes)
        self.vm_actions.shadow_digests = self.v3.sender.shadow_digests
        self.rounds = RoundScheduler(
            runtime=self.runtime, core=RoundsCore(name, self._session_view), events=events,
            vm_actions=self.vm_actions, v3=self.v3, log=self.log, to_session=self.to_session)
        self.vm_worker = VmWorker(self.vm_actions, self.log, self.to_session, events.put,
                                  on_arrival=self._arrived)
        self.api_host, self.api_port = me.api.host, me.api.port
        self.data_plane_summary = (f"{DATA_PLANE}; offered here: "
                                   f"{', '.join(f'v{v}' for v in self.transfer_versions)}")
        self.started = trio.Event()
        #: operator requests this node carries to the ledger (federation.node.requests)
        self.requests = OperatorRequests()
        #: set after the ledger executed something: the VMs are reconciled with it
        self._ledger_changed = trio.Event()
        self._ledger_changed.set()  # once at start, against the recovered ledger
        #: VM starts and removals one at a time (an import's own start, the reconciler)
        self._vm_lock = trio.Lock()
        #: VMs an operation of this node is handling (the reconciler leaves them alone)
        self._busy: set[str] = set()
        #: (ledger height when forgotten, key) of the persisted records of forgotten
        #: sessions not deleted yet: waiting for a stable checkpoint at that height, or
        #: after a delete that failed
        self._records_to_drop: list[tuple[int, str]] = []
        #: persisted records deleted since start (their sessions forgotten)
        self.records_dropped = 0

    def _stored_records(self) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for key in self.store.keys(record_key("")):
            raw = self.store.get(key)
            if raw is not None:
                out[key[len(record_key("")):]] = raw
        return out

    def _session_view(self, migration_id: str) -> SessionView | None:
        return self.core.session_view(migration_id) if self.core is not None else None

    def need_core(self) -> NodeCore:
        """The ledger-and-migration core; raises :class:`NodeError` if there is none."""
        if self.core is None:
            raise NodeError(self.no_ledger)
        return self.core

    # ------------------------------------------------------------------ running

    async def run(self, *, task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`shutdown` (or a fatal error); binds the control and data
        endpoints first so a :class:`mesh.runtime.node_runtime.ListenError` is a plain
        exception."""
        await self.bind()
        async with trio.open_nursery() as nursery:

            async def mesh(
                task_status: trio.TaskStatus[Runtime] = trio.TASK_STATUS_IGNORED,
            ) -> None:
                await self.runtime.run(task_status=task_status)
                nursery.cancel_scope.cancel()  # shut down: the data plane and workers end too

            if self.core is not None:  # the cores' clock is trio's; reasons show UTC
                self.core.set_wall_offset(time.time() - trio.current_time())
            unresumed = await trio.to_thread.run_sync(self._resume_vms)
            if unresumed:
                nursery.start_soon(self._resume_later, unresumed)
            await self.v3.serve(nursery)
            await self.rounds.run(nursery)
            nursery.start_soon(self.vm_worker.run)
            await nursery.start(mesh)
            nursery.start_soon(self._reconcile_loop)
            nursery.start_soon(self._forget_loop)
            self.log.event("node_ready", api=f"{self.api_host}:{self.api_port}",
                           data_plane=self.data_plane_summary,
                           data=f"{self.v3.host}:{self.v3.port}",
                           restoring=self.core.restoring() if self.core else [],
                           ledger=self.no_ledger or "pbft")
            self.started.set()
            task_status.started(self)

    async def bind(self) -> None:
        """Bind the control and data endpoints (raises ListenError / NodeError). :meth:`run`
        calls it if the caller has not; the CLI binds first so the error is plain."""
        await self.runtime.listen()
        try:
            await self.v3.bind()
        except OSError as exc:
            raise NodeError(f"cannot listen on the data endpoint {self.v3.host}:"
                            f"{self.v3.port}: {exc.strerror or exc}") from None

    def _resume_vms(self, only: Collection[str] | None = None) -> list[str]:
        """After a restart, run again every VM that ran here (of ``only``, if given) and
        that the recovered ledger says this DC owns. A VM the ledger gives to another DC,
        or does not know yet, stays stopped. Returns the VMs whose start failed with an
        OSError (a full disk: make netns-chaos seed 32, where that error ended the node
        as it started): :meth:`_resume_later` tries them again."""
        ledger = self.core.ledger if self.core is not None else None
        again = []
        for info in self.backend.list_vms():
            if info.state is not VmState.RUNNING or (only is not None and info.name not in only):
                continue
            owner = ledger.owner(info.name) if ledger is not None else None
            if owner != self.name:
                self.log.event("vm_not_resumed", vm=info.name, ledger_owner=owner)
                continue
            try:
                self.backend.start(info.name, info.epoch)
            except VmError as exc:
                self.log.event("vm_resume_failed", vm=info.name, error=str(exc))
            except OSError as exc:
                self.log.event("vm_resume_failed", vm=info.name, error=str(exc), retry=True)
                again.append(info.name)
        return again

    async def _resume_later(self, names: list[str]) -> None:
        """Try to resume ``names`` again, 0.5 s doubling to 8 s apart, until none fails
        with an OSError (each try asks the ledger again who owns the VM)."""
        wait = RESUME_RETRY_S[0]
        while names:
            await trio.sleep(wait)
            wait = min(wait * 2, RESUME_RETRY_S[1])
            names = await trio.to_thread.run_sync(self._resume_vms, set(names))

    def _ledger_moved(self) -> None:
        self._ledger_changed.set()

    async def _reconcile_loop(self) -> None:
        while True:
            await self._ledger_changed.wait()
            self._ledger_changed = trio.Event()
            await self.reconcile()

    async def _forget_loop(self) -> None:
        while True:
            await trio.sleep(ENDED_SWEEP_SECONDS)
            await self.forget_ended()

    async def forget_ended(self, keep_for: float = ENDED_KEEP_SECONDS,
                           keep_most: int = ENDED_KEEP_MAX) -> list[str]:
        """Forget the ended sessions past the bounds (NodeCore.forget_ended) and their
        data-plane figures; returns their migration ids."""
        if self.core is None:
            return []
        gone: list[str] = []
        marks: list[int] = []

        def forget(core: NodeCore, now: float) -> list[Any]:
            gone.extend(core.forget_ended(now, keep_for, keep_most))
            # the ledger's height now (each forgotten session is decided at or below it)
            # and the stable checkpoint, whose writes are durable by now (the runtime
            # writes a step's Persists before it runs an invocation)
            marks[:] = [core.replica.last_exec, core.replica.low]
            return []

        await self.runtime.invoke("node", forget, "forget-ended")
        if gone:
            await self.rounds.forget(gone)
        height, stable = marks
        self._records_to_drop.extend((height, record_key(mid)) for mid in gone)
        await self._drop_records(stable)
        return gone

    async def _drop_records(self, stable: int) -> None:
        """Delete the persisted ``migration/<id>`` records of the forgotten sessions whose
        decision the durable stable checkpoint (``stable``) holds, in one transaction.

        A forgotten session is decided in this DC's ledger (NodeCore.forget_ended), and
        this DC's ledger never shows it begun again, so its record has nothing left to
        restore: after a restart the ledger alone says where the VM is (the reconciler
        carries out a decided migration's VM step the session did not). But a restart
        recovers the ledger from its stable checkpoint and replays the log above it, so
        the record goes only once the checkpoint is at or above the height at which the
        session was forgotten: no recovery can then show the migration begun and not
        decided. Kept, every record was restored at each start and a node's table grew
        by one row per migration it took part in, for good (``dwcp bench soak``: ~1,300
        an hour per node). A crash between the forget and the delete leaves the record:
        the next start restores it as ended and the node forgets it again. A delete that
        fails (a full disk) is logged and tried again at the next sweep."""
        keys = [key for height, key in self._records_to_drop if height <= stable]
        if not keys:
            return
        try:
            await trio.to_thread.run_sync(self.store.delete_many, keys)
        except (StoreError, sqlite3.Error) as exc:
            self.log.event("records_kept", count=len(keys), error=str(exc))
            return
        self._records_to_drop = [(h, k) for h, k in self._records_to_drop if h > stable]
        self.records_dropped += len(keys)

    async def reconcile(self) -> None:
        """Bring this DC's VMs in line with the ledger (federation.node.reconcile): start
        a staged VM whose register committed after the API stopped waiting, remove the
        copies of a VM the ledger deleted."""
        if self.core is None:
            return
        async with self._vm_lock:
            local = await trio.to_thread.run_sync(self.backend.list_vms)
            busy = self._busy | {v for v, st in self.imports.copies.items()
                                 if st.state == "copying"}
            for step in reconcile.plan(self.name, self.core.ledger, local, busy):
                if isinstance(step, VM_ACTIONS):
                    # a decided migration's step its session did not carry out (killed in
                    # between): on the VM worker, in order with the sessions' own
                    self.log.event("vm_reconcile", vm=step.vm, step=type(step).__name__,
                                   migration_id=step.migration_id)
                    self.vm_worker.submit(step)
                    continue
                try:
                    if isinstance(step, reconcile.StartStaged):
                        await trio.to_thread.run_sync(self.backend.start, step.vm, step.epoch)
                        self.imports.copies.pop(step.vm, None)
                        self.log.event("vm_imported", vm=step.vm, epoch=step.epoch,
                                       late=True)
                    else:
                        await trio.to_thread.run_sync(self.backend.remove, step.vm)
                        self.log.event("vm_removed", vm=step.vm, deleted_at_epoch=step.epoch)
                except (VmError, OSError) as exc:
                    self.log.event("vm_reconcile_failed", vm=step.vm, step=type(step).__name__,
                                   error=str(exc))

    def _arrived(self, vm: str, arrival: dict[str, Any]) -> None:
        """A guest started here after its migration: its stop window's part after the
        final round, as this target measured it, for this node's next migrations."""
        window = arrival.get("stop_window_ms")
        if isinstance(window, dict):
            self.stop_history.record(vm, costs_of_arrival(window))

    def _link_Bps(self, me: str, dst: str) -> float | None:
        """Bytes per second of the link to ``dst`` as the mesh measured it (None: not yet);
        see :func:`link_Bps`."""
        return link_Bps(self.control.table, me, dst)

    def shutdown(self) -> None:
        """Close every link with its final frame and return from run()."""
        self.runtime.shutdown()

    def close(self) -> None:
        self.v3.close()
        self._hashing.shutdown(wait=False)
        self.backend.close()
        self.store.close()
        self.lock.release()

    # ------------------------------------------------------------------ session effects

    def _effect(self, action: object) -> bool:
        """The node core's non-core actions, taken in order after the persists before them."""
        if isinstance(action, VM_ACTIONS):
            self.vm_worker.submit(action)
            return True
        if isinstance(action, (SendRound, CancelRound)):
            self.rounds.submit(action)
            return True
        return False

    async def to_session(self, migration_id: str, event: object) -> None:
        await self.runtime.invoke(
            "node", lambda core, now: core.to_session(now, migration_id, event), "session-event")

    # ------------------------------------------------------------------ operations

    @staticmethod
    def intent(authorization: Authorization, kind: type, **fields: object) -> Any:
        """The operator's intent in ``authorization``: a ``kind`` whose ``fields`` are what
        the operation does (NodeError otherwise; the ledger checks the same again)."""
        try:
            intent = wire.decode(authorization.body, expect=(kind,))
        except wire.WireError as exc:
            raise NodeError(f"the operator's request is not a {kind.__name__}: {exc}") from None
        asked = {k: getattr(intent, k) for k in fields}
        if asked != fields:
            said = ", ".join(f"{k}={v!r}" for k, v in asked.items())
            here = ", ".join(f"{k}={v!r}" for k, v in fields.items())
            raise NodeError(f"the operator signed {said}; this operation is {here}")
        return intent

    @staticmethod
    def _fits(command: Any) -> Any:
        """``command`` if it fits a ledger command (consensus.pbft.messages.MAX_COMMAND)."""
        try:
            size = len(wire.encode(command))
        except wire.WireError as exc:
            raise NodeError(str(exc)) from None
        if size > MAX_COMMAND:
            raise NodeError(f"the request is {size} bytes as a ledger command; the limit is "
                            f"{MAX_COMMAND}")
        return command

    async def import_vm(self, name: str, authorization: Authorization) -> VmInfo:
        """Register the staged VM ``name`` (:mod:`federation.node.imports`) in the ledger
        as ours, on the operator's ``ImportVm``, and run it."""
        self.intent(authorization, ImportVm, vm=name, dc=self.name)
        register = self._fits(RegisterVm(name, self.name, authorization))
        owner = self.need_core().ledger.owner(name)
        if owner is not None:
            raise NodeError(f"VM {name!r} is already registered in the ledger (owner {owner})")
        staged = self.imports.status(name)
        if staged is None or staged.state != "staged":
            why = "not staged here" if staged is None else f"{staged.state}: {staged.error}" \
                if staged.error else staged.state
            raise NodeError(f"VM {name!r} is {why}; stage its images first (POST /api/imports)")
        self._busy.add(name)
        try:
            async with self._carrying(authorization, _tag(ImportVm), name):
                result = await self.ledger.submit(register)
            if not result.ok:
                # refused for good: the staged copy goes, so a failed import leaves nothing
                async with self._vm_lock:
                    await trio.to_thread.run_sync(self._drop_staged, name)
                raise NodeError(f"the ledger refused to register {name!r}: {result.error}")
            async with self._vm_lock:
                self.imports.copies.pop(name, None)
                info = await trio.to_thread.run_sync(self.backend.start, name, result.epoch)
        finally:
            self._busy.discard(name)
        self.log.event("vm_imported", vm=name, layout=info.layout)
        return info

    async def power_vm(self, vm: str, on: bool, authorization: Authorization) -> VmInfo:
        """Boot or power off this DC's qemu VM ``vm`` on the operator's ``PowerVm`` (a boot
        carries the ledger's epoch; a VM the ledger gives to another DC is refused)."""
        self.intent(authorization, PowerVm, vm=vm, dc=self.name, on=on)
        ledger = self.need_core().ledger
        owner = ledger.owner(vm)
        if owner != self.name:
            raise NodeError(f"VM {vm!r} is owned by {owner!r} in the ledger, not {self.name}")
        stop = getattr(self.backend, "stop", None)
        try:
            if not on:
                if not callable(stop):
                    raise NodeError(f"VM {vm!r}: this node's VMs cannot be powered off")
                info: VmInfo = await trio.to_thread.run_sync(stop, vm)
            else:
                epoch = ledger.epoch(vm)
                assert epoch is not None, "an owned VM has an epoch"
                info = await trio.to_thread.run_sync(self.backend.start, vm, epoch)
        except VmError as exc:
            raise NodeError(str(exc)) from None
        self.log.event("vm_power", vm=vm, on=on, state=info.state.value)
        return info

    def console(self, vm: str, limit: int = 64 * 1024) -> str:
        """The last ``limit`` bytes of the qemu VM's serial console."""
        path_of = getattr(self.backend, "console_path", None)
        try:
            self.backend.info(vm)
            if not callable(path_of):
                raise NodeError(f"VM {vm!r}: this node's VMs have no console")
            path = path_of(vm)
        except VmError as exc:
            raise NodeError(str(exc)) from None
        try:
            with open(path, "rb") as f:
                f.seek(max(0, f.seek(0, 2) - limit))
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    async def migrate(self, vm: str, target: str, authorization: Authorization) -> str:
        """Start migrating ``vm`` to DC ``target`` on the operator's ``MigrateVm``, which
        names this DC as the source and the VM's epoch here; returns the migration id."""
        core = self.need_core()
        if target == self.name or target not in self.runtime.peers:
            raise NodeError(f"{target!r} is not another DC of the federation "
                            f"({', '.join(self.runtime.peers)})")
        asked = self.intent(authorization, MigrateVm, vm=vm, target=target)
        epoch = core.ledger.epoch(vm)
        if (asked.source, asked.epoch) != (self.name, epoch):
            raise NodeError(f"the operator signed the migration of {vm!r} from "
                            f"{asked.source} at epoch {asked.epoch}; the ledger has it at "
                            f"{core.ledger.owner(vm)} epoch {epoch}")
        auth = authorization
        try:
            info = self.backend.info(vm)
        except VmError as exc:
            raise NodeError(str(exc)) from None
        if info.state is not VmState.RUNNING:
            raise NodeError(f"VM {vm!r} is {info.state.value} here, not running")
        try:
            machine = await trio.to_thread.run_sync(self.backend.machine_spec, vm)
        except VmError as exc:
            raise NodeError(str(exc)) from None
        if len(machine) > MAX_MACHINE_SPEC:
            raise NodeError(f"VM {vm!r}: its machine spec is {len(machine)} bytes; a "
                            f"migration offer carries at most {MAX_MACHINE_SPEC}")
        mid = f"{vm[:80]}-{self.name}-{target}-{secrets.token_hex(4)}"
        failure: list[str] = []
        peer = self.peer_versions(target)

        def plan(core: NodeCore, now: float) -> list[Any]:
            try:
                return core.plan_migration(now, mid, vm, target, info.layout,
                                           self.transfer_versions, peer, auth, machine,
                                           self.downtime_limit if machine else None)
            except (MigrationError, RolloutError) as exc:
                failure.append(str(exc))
                return []

        op, rid, created = request_key(authorization)
        self.requests.begin(op, rid, _tag(MigrateVm), mid, created)
        await self.runtime.invoke("node", plan, "plan-migration")
        if failure:
            self.requests.end(op, rid)
            raise NodeError(failure[0])
        return mid

    async def cancel_migration(self, mid: str, authorization: Authorization) -> None:
        """An operator's cancel of migration ``mid`` (a ``CancelMigration``): the source
        session takes :class:`CancelRequested` and aborts through the ledger; any other DC
        submits the operator's abort to the ledger itself (so a cancel works while the
        source is unreachable). Raises :class:`UnknownMigration`, or :class:`NodeError`
        saying why it cannot be cancelled (e.g. already committed)."""
        self.need_core()
        self.intent(authorization, CancelMigration, migration_id=mid)
        try:
            await self._cancel_at_source(mid)
        except NotTheSource:
            async with self._carrying(authorization, _tag(CancelMigration), mid):
                result = await self.ledger.submit(
                    self._fits(AbortMigration(mid, authorization)))
            if not result.ok:
                raise NodeError(f"the ledger refused to cancel {mid!r}: {result.error}") from None

    async def delete_vm(self, vm: str, authorization: Authorization) -> LedgerResult | None:
        """An operator's ``DeleteVm``: unregister ``vm`` in the ledger (refused while it
        migrates); this node's copy is removed at once, the other DCs' as their ledger
        executes it (:meth:`reconcile`). A VM the ledger does not know but that is staged
        here (an import never registered, or whose copy failed) is removed here, without
        the ledger: returns None then."""
        core = self.need_core()
        self.intent(authorization, DeleteVm, vm=vm)
        if core.ledger.owner(vm) is None and vm not in self._busy:
            staged = self.imports.status(vm)
            if staged is not None and staged.state != "copying":
                async with self._vm_lock:
                    await trio.to_thread.run_sync(self.backend.remove, vm)
                    self.imports.copies.pop(vm, None)
                self.log.event("vm_import_removed", vm=vm, state=staged.state)
                return None
        async with self._carrying(authorization, _tag(DeleteVm), vm):
            result = await self.ledger.submit(self._fits(UnregisterVm(vm, authorization)))
        if not result.ok:
            raise NodeError(f"the ledger refused to delete {vm!r}: {result.error}")
        self.log.event("vm_deleted", vm=vm, epoch=result.epoch)
        self._ledger_changed.set()  # this node's copy goes now
        return result

    @asynccontextmanager
    async def _carrying(self, authorization: Authorization, command: str,
                        subject: str) -> AsyncIterator[None]:
        """The operator's request is on its way to the ledger: pending until it answers;
        still pending (timed out) if the ledger client gives up."""
        op, rid, created = request_key(authorization)
        pending = self.requests.begin(op, rid, command, subject, created)
        try:
            yield
        except LedgerTimeout:
            pending.timed_out = True
            raise
        except BaseException:
            self.requests.end(op, rid)
            raise
        self.requests.end(op, rid)

    def request_outcome(self, operator: str, request_id: str) -> dict[str, Any]:
        """What is known of ``operator``'s request ``request_id`` (federation.node.requests)."""
        ledger = self.core.ledger if self.core is not None else None
        return self.requests.outcome(ledger, operator, request_id, time.time())

    def _drop_staged(self, name: str) -> None:
        purge = getattr(self.backend, "purge", None)
        if purge is None:
            return
        try:
            freed = purge(name, staged=True)
        except VmError as exc:
            self.log.event("vm_staged_kept", vm=name, error=str(exc))
            return
        self.imports.copies.pop(name, None)
        self.log.event("vm_staged_removed", vm=name, bytes=freed)

    async def purge_vm(self, vm: str, authorization: Authorization) -> int:
        """An operator's ``PurgeVm``: remove this DC's retained copy of ``vm`` (with
        ``staged``, a staged import the ledger never registered); the bytes freed. Refused
        for a VM the ledger gives to this DC, and by the backend for any VM that runs,
        is fenced or is arriving here."""
        intent = self.intent(authorization, PurgeVm, vm=vm)
        purge = getattr(self.backend, "purge", None)
        if purge is None:
            raise NodeError("this node's VM backend keeps no retained copies to purge")
        owner = self.core.ledger.owner(vm) if self.core is not None else None
        if owner == self.name:
            raise NodeError(f"VM {vm!r} belongs to this DC in the ledger; it is not a "
                            "retained copy (delete it with 'dwcp vm delete')")
        try:
            async with self._vm_lock:
                freed: int = await trio.to_thread.run_sync(
                    lambda: purge(vm, staged=intent.staged))
        except VmError as exc:
            raise NodeError(str(exc)) from None
        if intent.staged:
            self.imports.copies.pop(vm, None)
        self.log.event("vm_purged", vm=vm, bytes=freed)  # (api_request names the operator)
        return freed

    async def _cancel_at_source(self, mid: str) -> None:
        failure: list[NodeError] = []

        def cancel(core: NodeCore, now: float) -> list[Any]:
            session = core.sessions.get(mid)
            rec = core.ledger.migrations.get(mid)
            if isinstance(session, SourceSession):
                why = session.cancel_refusal()
                if not why:
                    return core.to_session(now, mid, CancelRequested())
                failure.append(NodeError(why))
                return []
            source = session.source if session is not None else rec.source if rec else None
            if source is None:
                failure.append(UnknownMigration(f"no migration {mid!r}"))
            elif source != self.name:
                failure.append(NotTheSource(f"{source} is the source of migration {mid!r}, "
                                            f"not {self.name}", source))
            elif rec is not None and rec.state != "begun":
                failure.append(NodeError(f"migration {mid!r} has already {rec.state}; "
                                         "nothing to cancel"))
            else:  # our record, not restored yet (the replica is catching up)
                failure.append(NodeError(f"migration {mid!r} is being restored here; "
                                         "try again once the ledger has caught up"))
            return []

        await self.runtime.invoke("node", cancel, "cancel-migration")
        if failure:
            raise failure[0]

    async def set_policy(self, policy: SetPolicy, *, authorization: Authorization) -> SetPolicy:
        """Record a rollout policy in the ledger (DESIGN.md, "Protocol versions and
        rollout") on an admin's signed ``SetPolicy`` of exactly this policy; every DC's
        sessions apply it from their next round on. Returns the policy as the ledger
        recorded it."""
        if not 0 <= policy.v3_percent <= 100:
            raise NodeError(f"v3_percent: expected 0..100, got {policy.v3_percent}")
        for what, dcs in (("target_dcs", policy.target_dcs),
                          ("excluded_dcs", policy.excluded_dcs)):
            unknown = sorted(set(dcs) - set(self.fed.names))
            if unknown:
                raise NodeError(f"{what}: {', '.join(unknown)} not in the federation")
        regions = sorted({dc.region for dc in self.fed.dcs if dc.region})
        unknown = sorted(set(policy.target_regions) - set(regions))
        if unknown:
            raise NodeError(f"target_regions: {', '.join(unknown)} is the region of no DC "
                            f"(the federation file's regions: {', '.join(regions) or 'none'})")
        try:
            wire.encode(policy)
        except wire.WireError as exc:
            raise NodeError(f"policy: {exc}") from None
        signed = self.intent(authorization, SetPolicy)
        if signed != policy:
            raise NodeError("the operator signed another policy than the one asked for")
        change = self._fits(ChangePolicy(authorization))
        async with self._carrying(authorization, _tag(SetPolicy), "policy"):
            result = await self.ledger.submit(change)
        if not result.ok:
            raise NodeError(f"the ledger refused the policy: {result.error}")
        recorded = recorded_policy(policy)
        self.log.event("policy_set", v3_percent=recorded.v3_percent,
                       target_dcs=list(recorded.target_dcs),
                       target_vms=list(recorded.target_vms),
                       target_regions=list(recorded.target_regions),
                       excluded_dcs=list(recorded.excluded_dcs),
                       kill_switch=recorded.kill_switch,
                       max_abort_percent=recorded.max_abort_percent,
                       min_ended=recorded.min_ended,
                       max_verify_failures=recorded.max_verify_failures)
        return recorded

    def peer_versions(self, target: str) -> tuple[int, ...]:
        """The transfer versions ``target`` offered in its handshake (the channel keeps
        the peer's whole offer); with no link yet, only the baseline is assumed."""
        link = self.runtime.links.get(target)
        if link is None:
            return (V1,)  # the baseline (mesh.versions.BASELINE)
        return link.peer_versions
