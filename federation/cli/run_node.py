"""``dwcp node --config FILE --name DC``: run one DC's node in the foreground.

The node (:class:`federation.node.assembly.Node`) joins the control mesh, runs gossip and
routes, its PBFT replica and ledger, the migration sessions over the ``image`` VM
backend (and the ``qemu`` backend, per VM, when its node config has a ``[qemu]`` table)
and the data plane, and serves the HTTP API on the DC's ``api`` endpoint, where
every request is an operator's signed request (federation.api.door). Its own settings
(import directories, the metrics token) are in its node config
(:mod:`federation.node.node_config`).
It logs one JSON object per line on stderr. SIGINT or SIGTERM closes every link
with its final frame and exits 0; a restart recovers the ledger and every
in-flight migration from ``--data-dir``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import trio

from consensus.pbft.durable import LogFormatError
from consensus.pbft.messages import set_memo_capacity
from federation import config
from federation.api.http import open_api, serve_node
from federation.cli.main import CommandError
from federation.node.assembly import DOWNTIME_LIMIT, Node
from federation.node.data_lock import DataDirLock
from federation.node.errors import NodeError
from federation.node.heap import tune_heap
from federation.node.heap_report import HeapReporter, node_caches, tracemalloc_frames
from federation.node.node_config import (
    NodeConfig,
    NodeConfigError,
    default_node_config,
    load_node_config,
)
from federation.node.private_dir import private_dir
from federation.vms.at_rest_key import AtRestKeyError, load_or_create
from federation.vms.at_rest_key import default_key_path as default_key_path_at_rest
from federation.vms.backend import VmBackend, VmError
from federation.vms.image_backend import ImageBackend
from federation.vms.per_vm import PerVmBackend
from federation.vms.qemu_backend import QemuBackend
from federation.vms.sealed_image import is_sealed
from federation.vms.sealing import SealKey
from mesh import identity
from mesh.runtime.log import JsonLog
from mesh.runtime.node_runtime import ListenError
from mesh.runtime.sqlite_store import SQLiteStore, StoreError, StoreFull

#: Verified PBFT signatures a node process remembers (consensus.pbft.messages): its one
#: replica's Verifier keeps a watermark window's for the re-checks in certificates; the
#: process memo's simulator size (65,536) would hold ~20 MiB at a steady 3 commands/s.
SIGNATURE_MEMO = 8192

__all__ = ["register", "add_node_arguments", "run_node", "default_key_path", "node_backend"]


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("node", help="run a DC node (logs JSON lines on stderr)")
    add_node_arguments(p)
    p.set_defaults(func=run_node)


def add_node_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, type=Path, help="the federation file")
    p.add_argument("--name", required=True, help="this node's DC name in the federation file")
    p.add_argument(
        "--key", type=Path, help="identity key file (default: <config dir>/keys/<DC>.key)"
    )
    p.add_argument("--data-dir", type=Path, help="durable state (default: <config dir>/data/<DC>)")
    p.add_argument("--node-config", type=Path,
                   help="this node's own settings: import directories, the metrics token "
                        "(default: <config dir>/nodes/<DC>.toml if it exists)")


def default_key_path(config_path: Path, name: str) -> Path:
    """Where ``dwcp federation init`` writes the key of ``name``."""
    return config_path.parent / "keys" / f"{name}.key"


def run_node(args: argparse.Namespace,
             backend: Callable[[Path], VmBackend] | None = None) -> int:
    """Run the node of ``args`` until a signal; ``backend(data_dir)`` makes its VM backend
    (default: the image backend under ``<data dir>/vms``)."""
    try:
        fed = config.load(args.config)
        fed.dc(args.name)
    except config.ConfigError as exc:
        raise CommandError(str(exc)) from None
    key_path = args.key or default_key_path(args.config, args.name)
    try:
        ident = identity.load_key_file(key_path)
    except identity.IdentityError as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(f"{key_path}: {exc.strerror}") from None
    settings = _node_config(args)
    if threading.current_thread() is threading.main_thread():
        # SIGUSR2 asks for a heap_report while the node serves; before the reporter
        # listens (start-up) and after it stops (shutdown), its default action would end
        # the process (the soak's periodic request killed a node stopping on SIGTERM)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    tune_heap()  # before the node's threads allocate (federation.node.heap)
    set_memo_capacity(SIGNATURE_MEMO)
    try:  # before the node is made, so that tracemalloc sees all it allocates
        heap = HeapReporter(tracemalloc_frames())
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    # everything the node creates (ledger, images, logs of its VMs) is its own alone
    os.umask(0o077)
    data_dir: Path = args.data_dir or args.config.parent / "data" / args.name
    try:
        private_dir(data_dir)
        lock = DataDirLock(data_dir)  # before anything in it is read
    except OSError as exc:
        raise CommandError(
            f"{data_dir}: cannot create the data directory: {exc.strerror}"
        ) from None
    except NodeError as exc:
        raise CommandError(str(exc)) from None
    log = JsonLog(args.name)
    try:
        store = open_store_waiting(data_dir / "node.sqlite3", log)
    except StoreError as exc:
        lock.release()
        raise CommandError(str(exc)) from None
    if store is None:  # a signal while it waited for room: nothing was started
        lock.release()
        return 0
    try:
        seal_key, made, budget = _at_rest(settings, key_path, data_dir)
        vms = (backend(data_dir) if backend is not None
               else node_backend(data_dir, settings, seal_key, budget)
               if settings.qemu is not None else None)
        limit = (DOWNTIME_LIMIT if settings.qemu is None
                 else settings.qemu.downtime_limit_ms / 1000)
        node = Node(fed, args.name, ident, data_dir, backend=vms,
                    import_dirs=settings.import_dirs, lock=lock,
                    request_timeout=settings.request_timeout, at_rest_key=seal_key,
                    retained_max=budget, downtime_limit=limit,
                    control_frames=settings.control_frames, log=log, store=store)
        if made is not None:
            node.log.event("at_rest_key_made", path=str(made),
                           note="back it up with the identity key: the VM images here "
                                "cannot be read without it")
    except CommandError:
        lock.release()
        raise
    except OSError as exc:
        lock.release()
        raise CommandError(f"{data_dir}: {exc.strerror or exc}") from None
    except (StoreError, NodeError, VmError) as exc:
        lock.release()
        raise CommandError(str(exc)) from None
    except LogFormatError as exc:
        lock.release()
        raise CommandError(f"{data_dir}: {exc}") from None
    try:
        trio.run(_serve_until_signal, node, settings.metrics_token, heap)
    except (ListenError, NodeError) as exc:
        raise CommandError(str(exc)) from None
    finally:
        node.close()
    return 0


#: The waits between attempts to open the store on a full disk: doubling up to the last.
STORE_WAITS = (0.5, 1.0, 2.0, 5.0)


class _Stopped(Exception):
    pass


def _stop(signum: int, frame: FrameType | None) -> None:
    raise _Stopped(signal.Signals(signum).name)


def open_store_waiting(path: Path, log: JsonLog,
                       sleep: Callable[[float], None] = time.sleep) -> SQLiteStore | None:
    """The node's store at ``path``; while its disk is full (:class:`StoreFull`: a node
    restarted on a full disk cannot even create the store's shared-memory index), log
    ``store_full`` and try again after :data:`STORE_WAITS`, so that the node comes up
    once room is made instead of exiting; None if SIGTERM or SIGINT came meanwhile.
    Any other store error is raised at once."""
    old = {}
    if threading.current_thread() is threading.main_thread():  # signals reach it alone
        old = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    attempt = 0
    try:
        while True:
            try:
                return SQLiteStore(path)
            except StoreFull as exc:
                wait = STORE_WAITS[min(attempt, len(STORE_WAITS) - 1)]
                log.event("store_full", path=str(path), attempt=attempt, retry_s=wait,
                          error=str(exc))
                attempt += 1
                sleep(wait)
    except _Stopped as stop:
        log.event("stopped", signal=str(stop), note="while waiting for room to open the store")
        return None
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def node_backend(data_dir: Path, settings: NodeConfig, seal_key: SealKey | None = None,
                 retain_bytes: int | None = None) -> VmBackend:
    """The VMs of a node whose config has a ``[qemu]`` table: image files under
    ``<data dir>/vms``, qemu guests under ``<data dir>/qemu`` with their RAM on tmpfs
    (``ram_dir``, default ``/dev/shm/dwcp-qemu-UID/<hash of the data dir>``), chosen per
    VM (:mod:`federation.vms.per_vm`); both seal what they retain with ``seal_key``."""
    q = settings.qemu
    assert q is not None, "a node config with a [qemu] table"
    ram = q.ram_dir
    if ram is None:
        tag = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:16]
        ram = Path("/dev/shm") / f"dwcp-qemu-{os.getuid()}" / tag
    qemu = QemuBackend(data_dir / "qemu", ram, accel=q.accel, seal_key=seal_key,
                       guest_files=q.guest_files, allowed_args=q.allowed_args)
    return PerVmBackend(ImageBackend(data_dir / "vms", seal_key=seal_key,
                                     retain_bytes=retain_bytes), qemu)


def _at_rest(settings: NodeConfig, identity_key: Path,
             data_dir: Path) -> tuple[SealKey, Path | None, int]:
    """The node's at-rest key (made at the first start, federation.vms.at_rest_key; the
    path if it was made now) and the retained copies' budget: the node config's, else a
    quarter of the file system the data directory is on."""
    path = settings.at_rest_key or default_key_path_at_rest(identity_key)
    vms = data_dir / "vms"
    held = vms.is_dir() and any(is_sealed(p) for p in vms.glob("*/*.img") if p.is_file())
    try:
        key, made = load_or_create(path, held)
    except AtRestKeyError as exc:
        raise CommandError(str(exc)) from None
    budget = settings.retained_max
    if budget is None:
        fs = os.statvfs(data_dir)
        budget = fs.f_blocks * fs.f_frsize // 4
    return key, path if made else None, budget


def _node_config(args: argparse.Namespace) -> NodeConfig:
    path = args.node_config
    if path is None:
        path = default_node_config(args.config, args.name)
        if not path.exists():
            return NodeConfig()
    try:
        return load_node_config(path)
    except NodeConfigError as exc:
        raise CommandError(str(exc)) from None


async def _serve_until_signal(node: Node, metrics_token: str = "",
                              heap: HeapReporter | None = None) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        # outside the nursery: a busy port stays a plain exception
        await node.bind()
        api = await open_api(node.api_host, node.api_port)
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for signum in signals:
                    node.log.event("signal", signal=signal.Signals(signum).name)
                    node.shutdown()
                    return

            nursery.start_soon(stop_on_signal)
            if heap is not None:
                nursery.start_soon(_report_heap_on_signal, node, heap)
            await serve_node(node, api, metrics_token=metrics_token)
            nursery.cancel_scope.cancel()


async def _report_heap_on_signal(node: Node, heap: HeapReporter) -> None:
    """SIGUSR2 logs a ``heap_report`` (federation.node.heap_report): what grew."""
    with trio.open_signal_receiver(signal.SIGUSR2) as signals:
        async for _ in signals:
            node.log.event("heap_report", **heap.report(node_caches(node)))
