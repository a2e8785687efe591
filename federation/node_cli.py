"""``dwcp node --config FILE --name DC``: run one DC's node in the foreground.

Stage 1 (issue 2): the node joins the control mesh — it listens on its control
endpoint, dials every peer, authenticates each link — and logs one JSON object
per line on stderr. SIGINT or SIGTERM closes every link with its final frame
and exits 0.
"""

from __future__ import annotations

import argparse
import random
import signal
from pathlib import Path

import trio

from federation import config
from federation.cli import CommandError
from mesh import control, identity
from mesh.runtime import ListenError, Peer, Runtime
from mesh.runtime_log import JsonLog
from mesh.runtime_store import SQLiteStore, StoreError

__all__ = ["register", "build_runtime", "default_key_path"]


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("node", help="run a DC node (logs JSON lines on stderr)")
    p.add_argument("--config", required=True, type=Path, help="the federation file")
    p.add_argument("--name", required=True, help="this node's DC name in the federation file")
    p.add_argument(
        "--key", type=Path, help="identity key file (default: <config dir>/keys/<DC>.key)"
    )
    p.add_argument("--data-dir", type=Path, help="durable state (default: <config dir>/data/<DC>)")
    p.set_defaults(func=run_node)


def default_key_path(config_path: Path, name: str) -> Path:
    """Where ``dwcp federation init`` writes the key of ``name``."""
    return config_path.parent / "keys" / f"{name}.key"


def build_runtime(
    fed: config.Federation, name: str, ident: identity.Identity, store: SQLiteStore | None
) -> Runtime:
    me = fed.dc(name)
    if ident.public != me.public_key:
        raise CommandError(
            f"the key's public key {ident.public} is not {name!r}'s key "
            f"in {fed.source} ({me.public_key})"
        )
    peers = [
        Peer(dc.name, dc.public_key, dc.control.host, dc.control.port)
        for dc in fed.dcs
        if dc.name != name
    ]
    runtime = Runtime(
        name=name,
        federation=fed.id,
        identity=ident,
        public_key=me.public_key,
        peers=peers,
        listen_host=me.control.host,
        listen_port=me.control.port,
        versions=fed.versions,
        store=store,
        log=JsonLog(name),
    )
    # Issue 4: membership, link estimates and modes, routes (logs every change).
    control.attach(runtime, name, [p.name for p in peers], random.Random(), store=store,
                   modes=fed.modes)
    return runtime


def run_node(args: argparse.Namespace) -> int:
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
    data_dir: Path = args.data_dir or args.config.parent / "data" / args.name
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        store = SQLiteStore(data_dir / "node.sqlite3")
    except OSError as exc:
        raise CommandError(
            f"{data_dir}: cannot create the data directory: {exc.strerror}"
        ) from None
    except StoreError as exc:
        raise CommandError(str(exc)) from None
    try:
        runtime = build_runtime(fed, args.name, ident, store)
        trio.run(_serve_until_signal, runtime)
    except ListenError as exc:
        raise CommandError(str(exc)) from None
    finally:
        store.close()
    return 0


async def _serve_until_signal(runtime: Runtime) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        await runtime.listen()  # outside the nursery: a ListenError stays a plain exception
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for signum in signals:
                    runtime.log.event("signal", signal=signal.Signals(signum).name)
                    runtime.shutdown()
                    return

            nursery.start_soon(stop_on_signal)
            await runtime.run()
            nursery.cancel_scope.cancel()
