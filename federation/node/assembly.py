"""One DC's node, assembled: what ``dwcp node`` runs.

:class:`Node` builds, over one SQLite store in the data directory:

- the control mesh (:class:`mesh.runtime.node_runtime.Runtime`) and, hosted on it, the mesh
  control core (:mod:`mesh.links.control_plane`: membership, link estimates and modes, routes);
- the node core (:mod:`federation.migration.dc_core`): the PBFT replica and ledger, and the
  migration sessions keyed by migration id;
- the ``image`` VM backend under ``<data dir>/vms`` and the
  :class:`~federation.vms.actions.VmActions` that carry out the sessions' VM
  actions in worker threads (``trio.to_thread``);
- the data plane that carries pre-copy rounds: v3, HDE over AMST on the DC's ``data``
  endpoint (:mod:`federation.dataplane.v3`), and v1, one stream over the control link
  (:mod:`federation.dataplane.v1`); each migration uses the highest version both DCs offered
  in their channel handshake and the ledger's rollout policy allows
  (:mod:`federation.migration.rollout`), round by round;
- the HTTP API (:mod:`federation.api.http`) on the DC's ``api`` endpoint.

State-changing operations (import, migrate, policy) carry an operator's signed request
into the ledger, which every replica checks (consensus.ledger). Each operation takes
that request as ``authorization`` (what the API will pass once it verifies operators'
signatures, federation.api.auth); until then a node started with an operator key
(``dwcp node --operator-key``) signs what its API asks for with that key, and a node
without one refuses the operations.

``await node.ledger.submit(command)`` returns once f+1 replicas sent the same result
(:class:`consensus.ledger.LedgerResult`) and raises :class:`LedgerTimeout` when the
client gives up. After a restart the replica recovers from its durable log, every VM
that ran here and that the ledger gives to this DC runs again (its writer redoes its
logged writes), and every persisted migration record is restored
(:mod:`federation.migration.restore`): resumed or aborted, never lost.

A federation whose size is not 3f+1 >= 4 has no ledger: such a node runs the mesh
and its API, reports why in ``/api/status`` and ``/ready``, and refuses VM operations.
"""

from __future__ import annotations

import math
import random
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from consensus.authz import Authorization
from consensus.durable import ReplicaLog
from consensus.ledger import (
    ChangePolicy,
    ImportVm,
    LedgerResult,
    MigrateVm,
    RegisterVm,
    SetPolicy,
)
from consensus.pbft.client import ClientBusy
from consensus.pbft.messages import MAX_COMMAND
from consensus.pbft.replica import Replica
from federation import config
from federation.api.auth import OperatorKey, sign_request
from federation.dataplane.v1 import (
    DATA_TAGS,
    WINDOW,
    PagesAck,
    PagesChunk,
    RoundFailed,
    RoundSender,
)
from federation.dataplane.v1 import write_chunk as _write_chunk
from federation.dataplane.v3 import NodeV3
from federation.dataplane.v3_protocol import V3_TAGS, V3Hde, V3Round, V3Status
from federation.dataplane.v3_source import V3RoundSender
from federation.migration.dc_core import TAGS, NodeCore
from federation.migration.rollout import KNOWN_VERSIONS, V1, V3, RolloutError
from federation.migration.source import SourceSession
from federation.migration.vocabulary import (
    ActionFailed,
    CancelRequested,
    CancelRound,
    DiscardIncoming,
    MigrationError,
    PrepareIncoming,
    Retire,
    SendRound,
    StartAtTarget,
    TransferProgress,
    Unfence,
    record_key,
)
from federation.vms.actions import VM_ACTIONS, VmActions
from federation.vms.backend import VmError, VmInfo, VmState
from federation.vms.image_backend import ImageBackend
from mesh import identity, wire
from mesh.amst.receiver import AmstError
from mesh.hde.codec import ChunkError
from mesh.hde.image import ImageError
from mesh.links import control_plane as control
from mesh.runtime.log import JsonLog
from mesh.runtime.node_runtime import Peer, Runtime
from mesh.runtime.sqlite_store import SQLiteStore

__all__ = ["Node", "Ledger", "LedgerTimeout", "NodeError", "UnknownMigration", "NotTheSource",
           "DATA_PLANE", "TRANSFER_VERSIONS"]

#: What this node's data plane is (reported in /api/status; each migration's rounds by
#: version are in its own status, ``data_plane``).
DATA_PLANE = ("v1 single stream over the control link; v3 HDE over AMST on the data "
              "endpoint; per migration the highest version both DCs offer and the rollout "
              "policy allows")
#: Transfer versions the node's data plane can carry: v1 (federation.dataplane.v1) and v3
#: (federation.dataplane.v3).
TRANSFER_VERSIONS = (V1, V3)
#: Rounds smaller than this are not bandwidth samples: 1 MiB takes 8 ms at 1 Gbit/s,
#: the order of a round trip and of the acknowledgement window's ramp, so a smaller
#: round measures latency rather than bandwidth.
BANDWIDTH_SAMPLE_MIN = 1 << 20


class NodeError(Exception):
    """A request to the node that cannot be done; the message says why (for the API)."""


class LedgerTimeout(NodeError):
    """No f+1 matching replies within the ledger client's timeout."""


class UnknownMigration(NodeError):
    """Neither a session here nor the ledger knows the migration id."""


class NotTheSource(NodeError):
    """Only the migration's source can act on it; ``source`` names that DC."""

    def __init__(self, message: str, source: str) -> None:
        super().__init__(message)
        self.source = source


class Ledger:
    """``await submit(command)``: the node's ledger client, over its replica."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self._results: dict[int, LedgerResult | None] = {}
        self._waiting: dict[int, trio.Event] = {}

    def done(self, rid: int, result: LedgerResult | None) -> None:
        self._results[rid] = result
        event = self._waiting.pop(rid, None)
        if event is not None:
            event.set()

    async def submit(self, command: Any) -> LedgerResult:
        self._node.need_core()
        box: list[int] = []
        busy: list[str] = []

        def go(core: NodeCore, now: float) -> list[Any]:
            try:
                rid, actions = core.submit(now, command)
            except ClientBusy as exc:
                busy.append(str(exc))
                return []
            box.append(rid)
            return actions

        await self._node.runtime.invoke("node", go, "ledger-submit")
        if busy:
            raise NodeError(f"the ledger client is busy: {busy[0]}")
        rid = box[0]
        try:
            if rid not in self._results:
                event = trio.Event()
                self._waiting[rid] = event
                await event.wait()
            result = self._results.pop(rid)
        finally:  # a cancelled caller leaves nothing behind
            self._waiting.pop(rid, None)
            self._results.pop(rid, None)
        if result is None:
            raise LedgerTimeout(f"the ledger did not answer request {rid} in time")
        return result

    @property
    def replica(self) -> Replica:
        return self._node.need_core().replica


class Node:
    def __init__(
        self,
        fed: config.Federation,
        name: str,
        ident: identity.Identity,
        data_dir: Path,
        *,
        log: JsonLog | None = None,
        rng: random.Random | None = None,
        transfer_versions: Sequence[int] = TRANSFER_VERSIONS,
        operator: OperatorKey | None = None,
    ) -> None:
        me = fed.dc(name)
        if ident.public != me.public_key:
            raise NodeError(f"the key's public key {ident.public} is not {name!r}'s key "
                            f"in {fed.source} ({me.public_key})")
        self.fed = fed
        self.name = name
        #: the operator key this node signs its API's operations with, until the API
        #: checks operators' own signatures (see the module docstring); None: refuse them
        self.operator = operator
        #: what this node offers in its channel handshakes: the federation's versions that
        #: its data plane carries (a DC may be configured down to v1 for a rollback)
        self.transfer_versions = tuple(sorted(set(fed.versions) & set(transfer_versions)))
        if not self.transfer_versions:
            raise NodeError(f"none of the transfer versions {sorted(set(transfer_versions))} "
                            f"is allowed by {fed.source} ({list(fed.versions)})")
        self.data_dir = data_dir
        self.rng = rng if rng is not None else random.Random()
        self.log = log if log is not None else JsonLog(name)
        data_dir.mkdir(parents=True, exist_ok=True)
        self.store = SQLiteStore(data_dir / "node.sqlite3")
        peers = [Peer(dc.name, dc.public_key, dc.control.host, dc.control.port)
                 for dc in fed.dcs if dc.name != name]
        self.runtime = Runtime(
            name=name, federation=fed.id, identity=ident, public_key=me.public_key,
            peers=peers, listen_host=me.control.host, listen_port=me.control.port,
            versions=self.transfer_versions, store=self.store, log=self.log,
            rng=random.Random(self.rng.getrandbits(64)),
        )
        self.control = control.attach(
            self.runtime, name, [p.name for p in peers], random.Random(self.rng.getrandbits(64)),
            store=self.store, modes=fed.modes)
        self.backend = ImageBackend(data_dir / "vms")
        self.vm_actions = VmActions(self.backend)
        self.ledger = Ledger(self)
        #: None when the federation cannot run PBFT (n != 3f+1 >= 4); ``no_ledger`` says why
        self.core: NodeCore | None = None
        self.no_ledger = ""
        try:
            replica = Replica(name, ident, self.runtime.keys, ReplicaLog(self.store),
                              random.Random(self.rng.getrandbits(64)),
                              operators=fed.operator_table())
        except ValueError as exc:
            self.no_ledger = f"no ledger in this federation: {exc}"
        else:
            self.core = NodeCore(name, replica, on_ledger_done=self.ledger.done,
                                 mode_of=lambda dst: self.control.modes.mode(name, dst))
            self.core.unrestored.update(self._stored_records())
            self.runtime.add_core("node", self.core, TAGS, effects=self._effect)
            self.runtime.add_handler(DATA_TAGS + V3_TAGS, self._on_data)
        self.api_host, self.api_port = me.api.host, me.api.port
        self.data_plane = (f"{DATA_PLANE}; offered here: "
                           f"{', '.join(f'v{v}' for v in self.transfer_versions)}")
        #: data plane figures for /metrics
        self.transfer_stats: dict[str, int] = {
            "rounds_sent": 0, "rounds_failed": 0, "bytes_sent": 0, "wire_bytes_sent": 0,
            "chunks_received": 0, "bytes_received": 0, "chunks_refused": 0,
            "wire_bytes_received": 0,
            **{f"{k}_v{v}": 0 for v in KNOWN_VERSIONS
               for k in ("rounds_sent", "bytes_sent", "wire_bytes_sent")},
        }
        #: migration id -> rounds delivered per version ("v1"/"v3") from this source
        self.transfer_paths: dict[str, dict[str, int]] = {}
        #: migration id -> bulk streams opened from this source, by the DC that relayed
        #: them ("direct" for none): the path its v3 data took (federation.dataplane.v3)
        self.stream_paths: dict[str, dict[str, int]] = {}
        self.v3 = NodeV3(self)
        #: migrations whose data-plane state is dropped once their running round ends
        self._finish_after_round: set[str] = set()
        self._marks: dict[str, int] = {}
        #: migration id -> (last progress report, bytes received since) at a target
        self._received: dict[str, tuple[float, int]] = {}
        #: migration id -> page bytes written here as its target (since this start)
        self.received_bytes: dict[str, int] = {}
        #: migration id -> chunks that arrived before the incoming images were prepared
        self._early: dict[str, list[tuple[str, PagesChunk]]] = {}
        self._rounds: dict[str, tuple[RoundSender | V3RoundSender, trio.CancelScope]] = {}
        self._vm_send, self._vm_recv = trio.open_memory_channel[Any](math.inf)
        self._nursery: trio.Nursery | None = None
        self._api_listeners: list[trio.SocketListener] = []
        self.started = trio.Event()

    def _stored_records(self) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for key in self.store.keys(record_key("")):
            raw = self.store.get(key)
            if raw is not None:
                out[key[len(record_key("")):]] = raw
        return out

    def need_core(self) -> NodeCore:
        """The ledger-and-migration core; raises :class:`NodeError` if there is none."""
        if self.core is None:
            raise NodeError(self.no_ledger)
        return self.core

    # ------------------------------------------------------------------ running

    async def run(self, *, task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`shutdown` (or a fatal error); binds the control endpoint
        first so a :class:`mesh.runtime.node_runtime.ListenError` is a plain exception."""
        from federation.api.http import serve_api  # the API module imports this one

        await self.bind()
        api, self._api_listeners = self._api_listeners, []
        async with trio.open_nursery() as nursery:
            self._nursery = nursery

            async def mesh(
                task_status: trio.TaskStatus[Runtime] = trio.TASK_STATUS_IGNORED,
            ) -> None:
                await self.runtime.run(task_status=task_status)
                nursery.cancel_scope.cancel()  # shut down: the API and workers end too

            await trio.to_thread.run_sync(self._resume_vms)
            await self.v3.serve(nursery)
            nursery.start_soon(self._vm_worker)
            self.api_port = await nursery.start(serve_api, self, api)
            await nursery.start(mesh)
            restoring = sorted(self.core.unrestored) if self.core else []
            self.log.event("node_ready", api=f"{self.api_host}:{self.api_port}",
                           data_plane=self.data_plane, data=f"{self.v3.host}:{self.v3.port}",
                           restoring=restoring,
                           ledger=self.no_ledger or "pbft")
            self.started.set()
            task_status.started(self)

    async def bind(self) -> None:
        """Bind the control and API endpoints (raises ListenError / NodeError). :meth:`run`
        calls it if the caller has not; the CLI binds first so the error is plain."""
        from federation.api.http import open_api

        await self.runtime.listen()
        try:
            await self.v3.bind()
        except OSError as exc:
            raise NodeError(f"cannot listen on the data endpoint {self.v3.host}:"
                            f"{self.v3.port}: {exc.strerror or exc}") from None
        if not self._api_listeners:
            self._api_listeners = await open_api(self.api_host, self.api_port)

    def _resume_vms(self) -> None:
        """After a restart, run again every VM that ran here and that the recovered ledger
        says this DC owns (a start at its own epoch also redoes its writer's logged writes).
        A VM the ledger gives to another DC, or does not know yet, stays stopped."""
        ledger = self.core.replica.ledger if self.core is not None else None
        for info in self.backend.list_vms():
            if info.state is not VmState.RUNNING:
                continue
            owner = ledger.owner(info.name) if ledger is not None else None
            if owner != self.name:
                self.log.event("vm_not_resumed", vm=info.name, ledger_owner=owner)
                continue
            try:
                self.backend.start(info.name, info.epoch)
            except VmError as exc:
                self.log.event("vm_resume_failed", vm=info.name, error=str(exc))

    def shutdown(self) -> None:
        """Close every link with its final frame, stop the API and return from run()."""
        self.runtime.shutdown()

    def close(self) -> None:
        self.v3.close()
        self.backend.close()
        self.store.close()

    # ------------------------------------------------------------------ session effects

    def _effect(self, action: object) -> bool:
        """The node core's non-core actions, taken in order after the persists before them."""
        if isinstance(action, VM_ACTIONS):
            self._vm_send.send_nowait(action)
            return True
        if isinstance(action, SendRound):
            self._start_round(action)
            return True
        if isinstance(action, CancelRound):
            # The round stays registered until its task has ended (its worker thread may
            # still be reading the shadow images): _data_done defers the data plane's
            # cleanup until then, so a cancel or an abort never pulls state from under it.
            running = self._rounds.get(action.migration_id)
            if running is not None:
                running[1].cancel()
            return True
        return False

    async def to_session(self, migration_id: str, event: object) -> None:
        await self.runtime.invoke(
            "node", lambda core, now: core.to_session(now, migration_id, event), "session-event")

    async def _vm_worker(self) -> None:
        # One at a time: a fence, a verification and a start of one VM stay in order.
        async for action in self._vm_recv:
            replies = await trio.to_thread.run_sync(self.vm_actions.carry_out, action)
            self.log.event("vm_action", action=type(action).__name__, vm=action.vm,
                           migration_id=action.migration_id,
                           replies=[type(r).__name__ for r in replies])
            if isinstance(action, PrepareIncoming):
                self._prepared(action.migration_id)
                self.v3.receiver.prepared(action.migration_id)
            else:  # the migration moved on: chunks still held for it are stale
                self._early.pop(action.migration_id, None)
            if isinstance(action, (Retire, Unfence, StartAtTarget, DiscardIncoming)):
                self._data_done(action.migration_id)
            for reply in replies:
                await self.to_session(action.migration_id, reply)

    def _data_done(self, mid: str) -> None:
        """The migration ended here: drop its data-plane state (after its running round)."""
        if mid in self._rounds:
            self._finish_after_round.add(mid)
        else:
            self.v3.finish(mid)
            self._marks.pop(mid, None)

    def _start_round(self, action: SendRound) -> None:
        assert self._nursery is not None, "rounds start only while the node runs"
        session = self.need_core().sessions[action.migration_id]
        sender: RoundSender | V3RoundSender
        if action.version == V3:
            sender = self.v3.sender(action, session.target, self._marks)
        else:
            sender = RoundSender(action, session.target, self.backend, self.runtime.send,
                                 self._marks)
        scope = trio.CancelScope()
        self._rounds[action.migration_id] = (sender, scope)

        async def go() -> None:
            mid = action.migration_id
            with scope:
                try:
                    sent = await sender.run(lambda ev: self.to_session(mid, ev))
                except Exception as raised:
                    exc = _round_error(raised)
                    if exc is None:
                        raise
                    self.transfer_stats["rounds_failed"] += 1
                    self.log.event("round_failed", migration_id=mid, round=action.round,
                                   version=action.version, error=str(exc))
                    await self.to_session(mid, ActionFailed("SendRound", str(exc)))
                    return
                finally:
                    if self._rounds.get(mid, (None,))[0] is sender:
                        del self._rounds[mid]
                    if mid in self._finish_after_round and mid not in self._rounds:
                        self._finish_after_round.discard(mid)
                        self._data_done(mid)
                v = f"v{action.version}"
                stats = self.transfer_stats
                for key, value in (("rounds_sent", 1), ("bytes_sent", sent.bytes),
                                   ("wire_bytes_sent", sent.wire_bytes)):
                    stats[key] += value
                    stats[f"{key}_{v}"] += value
                paths = self.transfer_paths.setdefault(mid, {})
                paths[v] = paths.get(v, 0) + 1
                self.log.event("round_sent", migration_id=mid, round=action.round, version=v,
                               pages=sent.pages, logical_bytes=sent.bytes,
                               wire_bytes=sent.wire_bytes, seconds=round(sent.seconds, 4),
                               dirty_pages=sent.dirty_pages,
                               **getattr(sender, "figures", {}))
                await self.to_session(mid, sent)
                if sent.wire_bytes >= BANDWIDTH_SAMPLE_MIN and sent.seconds > 0:
                    # the round is a bandwidth sample of the link (mesh.links.estimates)
                    await self.runtime.invoke("mesh", lambda c, now: c.record_transfer(
                        now, sender.target, sent.wire_bytes, sent.seconds), "bw-sample")

        self._nursery.start_soon(go)

    def _on_data(self, peer: str, msg: Any) -> None:
        if isinstance(msg, (V3Round, V3Hde, V3Status)):
            if self.core is not None:
                running = self._rounds.get(msg.migration_id)
                self.v3.on_message(peer, msg, running[0] if running else None)
            return
        if isinstance(msg, PagesAck):
            running = self._rounds.get(msg.migration_id)
            if (running is not None and isinstance(running[0], RoundSender)
                    and running[0].target == peer):
                running[0].ack(msg)
            return
        if not isinstance(msg, PagesChunk):
            return
        session = self.need_core().sessions.get(msg.migration_id)
        writers = self.vm_actions.incoming.get(msg.migration_id)
        if session is None or session.source != peer or session.done:
            error = f"no migration {msg.migration_id!r} from {peer} is running here"
        elif writers is None:
            # The session answered the offer and asked for the images in the same turn;
            # the VM worker may not have prepared them yet. The sender's window bounds this.
            early = self._early.setdefault(msg.migration_id, [])
            if len(early) < 2 * WINDOW:
                early.append((peer, msg))
                return
            error = f"migration {msg.migration_id!r}: the incoming images are not prepared"
        else:
            error = _write_chunk(writers, msg)
        self._chunk_done(peer, msg, error)

    def _chunk_done(self, peer: str, msg: PagesChunk, error: str) -> None:
        if error:
            self.transfer_stats["chunks_refused"] += 1
        else:
            self.transfer_stats["chunks_received"] += 1
            self.transfer_stats["bytes_received"] += len(msg.data)
            self._note_received(msg.migration_id, msg.round, len(msg.data))
        self.runtime.send(peer, PagesAck(msg.migration_id, msg.round, msg.seq, error))

    def _prepared(self, migration_id: str) -> None:
        """The incoming images exist now: write the chunks that arrived before them."""
        writers = self.vm_actions.incoming.get(migration_id)
        for peer, msg in self._early.pop(migration_id, []):
            error = _write_chunk(writers, msg) if writers is not None else (
                f"migration {migration_id!r}: the incoming images could not be prepared")
            self._chunk_done(peer, msg, error)

    def _note_received(self, mid: str, round_: int, nbytes: int) -> None:
        """Tell the target session about received bytes, at most once a second (its
        stall timer and its progress), outside the link reader's turn."""
        self.received_bytes[mid] = self.received_bytes.get(mid, 0) + nbytes
        last, pending = self._received.get(mid, (0.0, 0))
        pending += nbytes
        now = trio.current_time()
        if now - last < 1.0 or self._nursery is None:
            self._received[mid] = (last, pending)
            return
        self._received[mid] = (now, 0)
        self._nursery.start_soon(self.to_session, mid, TransferProgress(round_, pending))

    # ------------------------------------------------------------------ operations

    def authorize(self, method: str, target: str, intent: Any,
                  authorization: Authorization | None) -> Authorization:
        """The operator's signed request for ``intent``: ``authorization`` as given, or
        signed now with this node's operator key; NodeError if there is neither."""
        if authorization is not None:
            return authorization
        if self.operator is None:
            raise NodeError("no operator request: this node holds no operator key to sign "
                            "its API's operations with (dwcp node --operator-key FILE)")
        body = wire.encode(intent)
        raw = sign_request(self.operator, self.fed, method, target, body, time.time())
        return Authorization(raw, body)

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

    async def import_vm(self, name: str, memory: Path, disks: list[Path],
                        writer_rate: float = 0.0, writer_seed: int = 0,
                        authorization: Authorization | None = None) -> VmInfo:
        """Copy the images in, register the VM in the ledger as ours, run it."""
        intent = ImportVm(name, self.name, str(memory), tuple(str(d) for d in disks),
                          float(writer_rate), writer_seed)
        register = self._fits(RegisterVm(name, self.name, self.authorize(
            "POST", "/api/vms", intent, authorization)))
        owner = self.need_core().replica.ledger.owner(name)
        if owner is not None:
            raise NodeError(f"VM {name!r} is already registered in the ledger (owner {owner})")
        try:
            info = await trio.to_thread.run_sync(self.backend.import_vm, name, memory, disks)
        except VmError as exc:
            raise NodeError(str(exc)) from None
        except OSError as exc:
            raise NodeError(f"{exc.filename or name}: {exc.strerror or exc}") from None
        if authorization is None:  # signed here: sign again now that the copy is done
            register = RegisterVm(name, self.name, self.authorize("POST", "/api/vms", intent,
                                                                  None))
        result = await self.ledger.submit(register)
        if not result.ok:
            raise NodeError(f"the ledger refused to register {name!r}: {result.error}")
        info = await trio.to_thread.run_sync(self.backend.start, name, result.epoch)
        if writer_rate > 0:
            await trio.to_thread.run_sync(self.backend.attach_writer, name, writer_seed,
                                          writer_rate)
        self.log.event("vm_imported", vm=name, layout=info.layout, writer_rate=writer_rate)
        return info

    async def migrate(self, vm: str, target: str,
                      authorization: Authorization | None = None) -> str:
        """Start migrating ``vm`` to DC ``target``; returns the migration id."""
        self.need_core()
        if target == self.name or target not in self.runtime.peers:
            raise NodeError(f"{target!r} is not another DC of the federation "
                            f"({', '.join(self.runtime.peers)})")
        auth = self.authorize("POST", "/api/migrations", MigrateVm(vm, target), authorization)
        try:
            info = self.backend.info(vm)
        except VmError as exc:
            raise NodeError(str(exc)) from None
        if info.state is not VmState.RUNNING:
            raise NodeError(f"VM {vm!r} is {info.state.value} here, not running")
        mid = f"{vm[:80]}-{self.name}-{target}-{secrets.token_hex(4)}"
        failure: list[str] = []
        peer = self.peer_versions(target)

        def plan(core: NodeCore, now: float) -> list[Any]:
            try:
                return core.plan_migration(now, mid, vm, target, info.layout,
                                           self.transfer_versions, peer, auth)
            except (MigrationError, RolloutError) as exc:
                failure.append(str(exc))
                return []

        await self.runtime.invoke("node", plan, "plan-migration")
        if failure:
            raise NodeError(failure[0])
        return mid

    async def cancel_migration(self, mid: str) -> None:
        """An operator's cancel of migration ``mid``: the source session takes
        :class:`CancelRequested` and aborts through the ledger. Raises
        :class:`NotTheSource` at any other DC (the API forwards), :class:`UnknownMigration`,
        or :class:`NodeError` saying why it cannot be cancelled (e.g. already committed)."""
        self.need_core()
        failure: list[NodeError] = []

        def cancel(core: NodeCore, now: float) -> list[Any]:
            session = core.sessions.get(mid)
            rec = core.replica.ledger.migrations.get(mid)
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

    async def set_policy(self, v3_percent: int, target_dcs: Sequence[str] = (),
                         target_vms: Sequence[str] = (), kill_switch: bool = False,
                         authorization: Authorization | None = None) -> SetPolicy:
        """Record a rollout policy in the ledger (DESIGN.md, "Protocol versions and
        rollout"); every DC's sessions apply it from their next round on."""
        if not 0 <= v3_percent <= 100:
            raise NodeError(f"v3_percent: expected 0..100, got {v3_percent}")
        unknown = sorted(set(target_dcs) - set(self.fed.names))
        if unknown:
            raise NodeError(f"target_dcs: {', '.join(unknown)} not in the federation")
        policy = SetPolicy(v3_percent, tuple(target_dcs), tuple(target_vms), kill_switch)
        try:
            wire.encode(policy)
        except wire.WireError as exc:
            raise NodeError(f"policy: {exc}") from None
        change = self._fits(ChangePolicy(self.authorize("POST", "/api/policy", policy,
                                                        authorization)))
        result = await self.ledger.submit(change)
        if not result.ok:
            raise NodeError(f"the ledger refused the policy: {result.error}")
        self.log.event("policy_set", v3_percent=v3_percent, target_dcs=list(target_dcs),
                       target_vms=list(target_vms), kill_switch=kill_switch)
        return policy

    def peer_versions(self, target: str) -> tuple[int, ...]:
        """The versions ``target`` offers, as far as the handshake tells: the channel
        negotiates the highest common one, and every DC carries each lower known version
        (v1 is everyone's baseline). With no link yet, only the baseline is assumed."""
        link = self.runtime.links.get(target)
        if link is None:
            return (V1,)
        return tuple(v for v in KNOWN_VERSIONS if v <= link.version)


_ROUND_ERRORS = (RoundFailed, VmError, ImageError, ChunkError, AmstError, OSError)


def _round_error(exc: BaseException) -> BaseException | None:
    """The failure of a round inside ``exc``, or None if ``exc`` is something else.

    A data plane that runs its streams in a nursery raises its error wrapped in an
    ExceptionGroup; a round that failed that way is still just a failed round (the
    session aborts the migration), never a reason to take the node down.
    """
    if isinstance(exc, _ROUND_ERRORS):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        failed, other = exc.split(_ROUND_ERRORS)
        if failed is not None and other is None:
            leaf: BaseException = failed
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            return leaf
    return None
