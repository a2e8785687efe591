"""``dwcp demo`` (what ``make demo`` runs) and the harness that drives real node processes.

Stage 1 (issue 2) shows what exists: four ``dwcp node`` processes on loopback
find, authenticate and connect to each other; one is killed with SIGKILL and
restarted and the others reconnect to it; SIGTERM stops every node with exit
status 0. The harness (:class:`NodeProcess`, :class:`LocalFederation`) is also
what ``tests/test_runtime_processes.py`` uses.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio

from federation import config
from federation.keys_cli import init_federation

__all__ = ["register", "NodeProcess", "LocalFederation", "free_base_port", "DemoFailed"]

#: Ports below Linux's default ephemeral range (32768-60999, ip_local_port_range),
#: so a listener never collides with the source port of an outgoing connection.
_PORT_LOW, _PORT_HIGH = 20000, 32000
_NODE_MAIN = "import sys; from federation.cli import main; sys.exit(main())"


class DemoFailed(Exception):
    """A step of the demo did not happen in time; the message says which."""


def free_base_port(count: int, host: str = "127.0.0.1", rng: random.Random | None = None) -> int:
    """A base port such that the ports ``init_federation`` picks for ``count`` DCs are free."""
    rng = rng or random.Random()
    for _ in range(100):
        base = rng.randrange(_PORT_LOW, _PORT_HIGH - 300)
        ports = [base + off + i for off in (0, 100, 200) for i in range(1, count + 1)]
        if all(_port_free(host, p) for p in ports):
            return base
    raise DemoFailed(
        f"found no free block of {3 * count} ports on {host} in {_PORT_LOW}..{_PORT_HIGH}"
    )


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class Changes:
    """Wakes every waiter whenever a watched node logs a line or exits."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def wake(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self, deadline: float) -> None:
        with trio.move_on_at(deadline):
            await self._event.wait()


class NodeProcess:
    """One ``dwcp node`` child; its JSON log lines on stderr are parsed as they arrive."""

    def __init__(
        self,
        name: str,
        config_path: Path,
        changes: Changes | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.name = name
        self.config_path = config_path
        self.log_path = log_path  # every stderr line is also appended here
        self.process: trio.Process | None = None
        self.up: dict[str, int] = {}  # peer -> negotiated version
        self.initiators: dict[str, str] = {}
        self.events: list[dict[str, Any]] = []
        self.other_lines: list[str] = []
        self.returncode: int | None = None
        self.stop_requested = False
        self.started_at = 0.0
        self._changes = changes or Changes()

    async def start(self, nursery: trio.Nursery) -> None:
        self.up.clear()
        self.initiators.clear()
        self.returncode = None
        self.stop_requested = False
        args = [
            sys.executable,
            "-c",
            _NODE_MAIN,
            "node",
            "--config",
            str(self.config_path),
            "--name",
            self.name,
        ]
        self.started_at = trio.current_time()
        self.process = await trio.lowlevel.open_process(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        nursery.start_soon(self._read_log, self.process)

    async def _read_log(self, process: trio.Process) -> None:
        assert process.stderr is not None
        buf = b""
        async for chunk in process.stderr:
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                self._on_line(line.decode("utf-8", "replace"))
        self.returncode = await process.wait()
        self._wake()

    def _on_line(self, line: str) -> None:
        if self.log_path is not None:
            with self.log_path.open("a", encoding="utf-8") as f:
                f.write(line + "\n")
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or "event" not in record:
            self.other_lines.append(line)
            self._wake()
            return
        record["at"] = trio.current_time()
        self.events.append(record)
        if record["event"] == "peer_up":
            self.up[record["peer"]] = record["version"]
            self.initiators[record["peer"]] = record["initiator"]
        elif record["event"] == "peer_down":
            self.up.pop(record["peer"], None)
        self._wake()

    def _wake(self) -> None:
        self._changes.wake()

    async def wait_for(self, what: str, predicate: Callable[[], bool], deadline: float) -> float:
        """Wait until ``predicate()``; return the time it became true. Raises DemoFailed."""
        while not predicate():
            if self.returncode is not None:
                tail = " | ".join(self.other_lines[-3:])
                raise DemoFailed(
                    f"{self.name} exited with {self.returncode} waiting for {what}: {tail}"
                )
            await self._changes.wait(deadline)
            if trio.current_time() >= deadline and not predicate():
                raise DemoFailed(f"{self.name}: {what} did not happen in time")
        return trio.current_time()

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()  # SIGKILL: no final frames, no cleanup

    def terminate(self, signum: int = signal.SIGTERM) -> None:
        """Ask the node to stop (once: a second signal during exit may kill it outright)."""
        assert self.process is not None
        if not self.stop_requested:
            self.stop_requested = True
            self.process.send_signal(signum)

    def logged(self, event: str) -> bool:
        """Whether this process (since its last start) logged ``event``."""
        return any(e["event"] == event and e["at"] >= self.started_at for e in self.events)

    def exited(self) -> bool:
        return self.returncode is not None

    def has(self, peer: str) -> bool:
        return peer in self.up

    def lacks(self, peer: str) -> bool:
        return peer not in self.up


class LocalFederation:
    """``count`` DCs on loopback in a fresh directory, as ``dwcp federation init`` makes them."""

    def __init__(self, directory: Path, count: int) -> None:
        base = free_base_port(count)
        self.config_path = init_federation(directory, count, fed_id="demo", base_port=base)
        self.federation = config.load(self.config_path)
        self.changes = Changes()
        logs = directory / "logs"
        logs.mkdir(exist_ok=True)
        self.nodes = {
            name: NodeProcess(name, self.config_path, self.changes, logs / f"{name}.log")
            for name in self.federation.names
        }

    async def start_all(self, nursery: trio.Nursery) -> None:
        for node in self.nodes.values():
            await node.start(nursery)

    def full(self, name: str) -> bool:
        return len(self.nodes[name].up) == len(self.nodes) - 1

    async def wait_listening(self, deadline: float) -> float:
        """Wait until every node listens on its control endpoint; return the last one's time."""
        times = []
        for node in self.nodes.values():
            await node.wait_for("listening", partial(node.logged, "listening"), deadline)
            times.append(next(e["at"] for e in reversed(node.events) if e["event"] == "listening"))
        return max(times)

    def agreed(self) -> bool:
        """Every node has a link to every other, and both ends of each pair name the same
        dialler: they kept the same connection (a tie-break swap may be in flight briefly)."""
        return all(self.full(a) for a in self.nodes) and all(
            self.nodes[b].initiators.get(a) == node.initiators[b]
            for a, node in self.nodes.items()
            for b in node.up
        )

    async def wait_full_mesh(self, deadline: float) -> dict[str, float]:
        """Wait for :meth:`agreed`; return when each node first had every peer up."""
        while not self.agreed():
            for node in self.nodes.values():
                if node.returncode is not None:
                    tail = " | ".join(node.other_lines[-3:])
                    raise DemoFailed(f"{node.name} exited with {node.returncode}: {tail}")
            if trio.current_time() >= deadline:
                links = {n: sorted(node.up) for n, node in self.nodes.items()}
                raise DemoFailed(f"no full mesh in time; links: {links}")
            await self.changes.wait(deadline)
        return {name: self._first_full(node) for name, node in self.nodes.items()}

    def _first_full(self, node: NodeProcess) -> float:
        up = [e for e in node.events if e["event"] == "peer_up" and e["up"] == e["of"]]
        return up[-1]["at"]

    async def stop_all(self, deadline: float) -> dict[str, int | None]:
        for node in self.nodes.values():
            if node.returncode is None:
                node.terminate()  # a no-op for a node already asked to stop
        for node in self.nodes.values():
            await node.wait_for("exit after SIGTERM", node.exited, deadline)
        return {name: node.returncode for name, node in self.nodes.items()}

    def kill_all(self) -> None:
        for node in self.nodes.values():
            if node.process is not None and node.returncode is None:
                node.kill()


# --------------------------------------------------------------------------- dwcp demo


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="run a local federation of DC nodes and show what works")
    p.add_argument("--dcs", type=int, default=4, help="number of DCs (default 4)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    if not 2 <= args.dcs <= 16:
        print("dwcp demo: --dcs must be in 2..16", file=sys.stderr)
        return 2
    directory = Path(tempfile.mkdtemp(prefix="dwcp-demo-"))
    try:
        trio.run(_demo, directory, args.dcs)
    except DemoFailed as exc:
        print(f"\nFAILED: {exc}\n(logs and keys kept in {directory})")
        return 1
    if not args.keep:
        shutil.rmtree(directory)
    else:
        print(f"(kept {directory})")
    return 0


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


async def _demo(directory: Path, count: int) -> None:
    began = trio.current_time()
    fed = LocalFederation(directory, count)
    names = list(fed.nodes)
    print("DWCP demo, stage 1: the authenticated control mesh (issue 2)")
    print(
        f"  federation {fed.federation.id!r}: {count} DCs on loopback, written to {fed.config_path}"
    )
    for dc in fed.federation.dcs:
        print(f"    {dc.name}  control ws://{dc.control}  key {str(dc.public_key)[:20]}...")
    failure: DemoFailed | None = None
    async with trio.open_nursery() as nursery:
        try:
            await _scenario(fed, names, nursery)
        except DemoFailed as exc:
            failure = exc  # raised below, not wrapped in the nursery's exception group
        finally:
            fed.kill_all()
    if failure is not None:
        raise failure
    print(f"\nOK: every step passed in {_ms(trio.current_time() - began)}.")


async def _scenario(fed: LocalFederation, names: list[str], nursery: trio.Nursery) -> None:
    print(f"\n1. starting {len(names)} `dwcp node` processes ...")
    t0 = trio.current_time()
    await fed.start_all(nursery)
    # Budget: interpreter start-up and imports dominate on a loaded machine.
    done = await fed.wait_full_mesh(t0 + 20.0)
    listening = [
        next(e["at"] for e in node.events if e["event"] == "listening") - t0
        for node in fed.nodes.values()
    ]
    print(f"   full mesh {_ms(max(done.values()) - t0)} after the first process started")
    print(f"   (the nodes were listening after {', '.join(_ms(t) for t in listening)}:")
    print("   interpreter start-up and imports; the mesh itself forms in milliseconds)")
    for name, node in fed.nodes.items():
        links = ", ".join(
            f"{p} (v{node.up[p]}, dialled by {node.initiators[p]})" for p in sorted(node.up)
        )
        print(f"     {name} <-> {links}")
    versions = sorted({v for node in fed.nodes.values() for v in node.up.values()})
    print(
        f"   negotiated transfer protocol version: {', '.join(f'v{v}' for v in versions)} "
        f"(federation allows {list(fed.federation.versions)})"
    )
    pairs = sum(len(n.up) for n in fed.nodes.values()) // 2
    print(f"   {pairs} links for {len(names)} DCs: exactly one per pair")

    victim = names[-1]
    others = [n for n in names if n != victim]
    print(f"\n2. kill -9 {victim} (no goodbye) ...")
    fed.nodes[victim].kill()
    t_kill = trio.current_time()
    for name in others:
        node = fed.nodes[name]
        t = await node.wait_for(
            f"noticing {victim} is gone", partial(node.lacks, victim), t_kill + 10.0
        )
        reason = next(e["reason"] for e in reversed(node.events) if e["event"] == "peer_down")
        print(f"   {name} saw {victim} go down after {_ms(t - t_kill)} (link ended: {reason})")
    await fed.nodes[victim].wait_for("exit after SIGKILL", fed.nodes[victim].exited, t_kill + 5.0)

    print(f"\n3. restarting {victim} ...")
    t_restart = trio.current_time()
    await fed.nodes[victim].start(nursery)
    worst = 0.0
    for name in others:
        node = fed.nodes[name]
        t = await node.wait_for(
            f"reconnecting to {victim}", partial(node.has, victim), t_restart + 10.0
        )
        worst = max(worst, t - t_restart)
        print(
            f"   {name} reconnected to {victim} {_ms(t - t_restart)} after the restart "
            f"(dialled by {node.initiators[victim]})"
        )
    t = await fed.nodes[victim].wait_for(
        "a link to every peer", partial(fed.full, victim), t_restart + 10.0
    )
    print(
        f"   mesh whole again {_ms(max(worst, t - t_restart))} after the restart "
        f"(includes the interpreter start-up of the new process)"
    )

    print(f"\n4. SIGTERM to all {len(names)} nodes ...")
    t_term = trio.current_time()
    codes = await fed.stop_all(t_term + 10.0)
    for name, code in codes.items():
        node = fed.nodes[name]
        closed = [e for e in node.events if e["event"] == "link_closed" and e["at"] >= t_term]
        clean = sum(1 for e in closed if e["reason"] == "clean")
        print(
            f"   {name} exit status {code}; links closed with final frames in both "
            f"directions: {clean} of {len(closed)}"
        )
    bad = {n: c for n, c in codes.items() if c != 0}
    if bad:
        raise DemoFailed(f"nodes exited with non-zero status: {bad}")
    print(f"   all stopped {_ms(trio.current_time() - t_term)} after SIGTERM")

    print("\nWhat exists at this stage: DC identities, the federation file, the encrypted and")
    print("authenticated control mesh with reconnection, and the runtime that will host the")
    print("protocol cores. Not yet here: gossip and link modes, routes, the PBFT ledger and VM")
    print("migration (issues 4-7); this demo grows with them.")
