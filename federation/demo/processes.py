"""``dwcp demo`` (what ``make demo`` runs) and the harness that drives real node processes.

Four ``dwcp node`` processes on loopback, from a federation file generated in a
temporary directory; a VM made of real data (:mod:`federation.demo.vm_data`) is imported
at dc1 through the API and runs there with the demo's page writer dirtying its pages
(dc1's node is started with a writer for that VM, :mod:`federation.demo.writer_node`: a
demo tool, not an API field), and is live-migrated to dc3 through the API, with
progress; the summary's claims are checked (:mod:`federation.demo.scenario`): image
hashes, every ledger's owner and epoch. Then dc2 is killed with SIGKILL and the others
detect it and route around it; SIGTERM stops the rest with exit status 0. Exit status 0
only if every check held. The harness (:class:`NodeProcess`, :class:`LocalFederation`)
is also what ``tests/test_runtime_processes.py`` uses.
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
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import trio

from consensus.ledger import SetPolicy
from federation import config
from federation.cli.keys import init_federation
from federation.cli.ops import _human
from federation.demo.corpus import corpus_dir
from federation.demo.guest_backend import WriterSetting
from federation.demo.scenario import Demo, ms
from federation.demo.vm_data import build_vm_data
from federation.demo.writer_node import writer_args
from federation.node.node_config import render_node_config

__all__ = ["register", "NodeProcess", "LocalFederation", "free_base_port", "DemoFailed",
           "NODE_MAIN"]

#: Ports below Linux's default ephemeral range (32768-60999, ip_local_port_range),
#: so a listener never collides with the source port of an outgoing connection.
_PORT_LOW, _PORT_HIGH = 20000, 32000
#: The ``dwcp`` command line run in a child Python (``dwcp node ...``).
NODE_MAIN = "import sys; from federation.cli.main import main; sys.exit(main())"
#: A node whose VMs may run the demo's page writer (federation.demo.writer_node).
_WRITER_NODE_MAIN = "import sys; from federation.demo.writer_node import main; sys.exit(main())"


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
        writers: dict[str, WriterSetting] | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        self.name = name
        #: argv run before the node's own (e.g. ``ip netns exec NS``: a DC behind a link)
        self.prefix = list(prefix)
        self.config_path = config_path
        self.log_path = log_path  # every stderr line is also appended here
        #: VM name -> the page writer it runs here (none: a plain ``dwcp node``)
        self.writers = dict(writers or {})
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
        node = ["--config", str(self.config_path), "--name", self.name]
        if self.writers:
            args = [sys.executable, "-c", _WRITER_NODE_MAIN, *node, *writer_args(self.writers)]
        else:
            args = [sys.executable, "-c", NODE_MAIN, "node", *node]
        self.started_at = trio.current_time()
        self.process = await trio.lowlevel.open_process(
            [*self.prefix, *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
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
        elif record["event"] == "link_replaced":  # the tie-break kept the other connection
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
    """``count`` DCs on loopback in a fresh directory, as ``dwcp federation init`` makes them.

    ``host``: the address every DC listens on, but those in ``hosts``; ``prefixes``: the
    argv prefix a DC's node runs under (``dwcp bench live`` puts one DC in another network
    namespace, behind a veth pair: ``bench.netns.FarLink``)."""

    def __init__(self, directory: Path, count: int, host: str = "127.0.0.1",
                 hosts: Mapping[str, str] | None = None,
                 prefixes: Mapping[str, Sequence[str]] | None = None) -> None:
        base = free_base_port(count, host)
        self.config_path = init_federation(directory, count, fed_id="demo", base_port=base,
                                           host=host, hosts=hosts)
        self.federation = config.load(self.config_path)
        self.changes = Changes()
        logs = directory / "logs"
        logs.mkdir(exist_ok=True)
        self.nodes = {
            name: NodeProcess(name, self.config_path, self.changes, logs / f"{name}.log",
                              prefix=(prefixes or {}).get(name, ()))
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

#: The writer's default rate: 2,000 pages/s (8 MiB/s) keeps pre-copy honest (every round
#: has dirty pages to resend) and still converges over a loopback link.
WRITER_RATE = 2000.0
#: The demo's VM, and the seed of its writer's content.
DEMO_VM, WRITER_SEED = "demo-vm", 1
#: Start-up of four interpreters on a loaded 2-core machine took up to ~12 s (measured).
START_BUDGET = 30.0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="run 4 DC nodes locally, live-migrate a VM, kill a node")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--small", dest="size", action="store_const", const="small",
                      default="default", help="a small VM (64 MiB of corpus RAM, or process "
                      "memory, and a small ext4 disk) for a quick run")
    size.add_argument("--full", dest="size", action="store_const", const="full",
                      help="the 1 GiB corpus guest (default: the 256 MiB one)")
    p.add_argument("--writer-rate", type=float, default=WRITER_RATE,
                   help=f"pages per second the VM's writer dirties (default {WRITER_RATE:.0f})")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    if args.writer_rate <= 0:
        print("dwcp demo: --writer-rate must be positive", file=sys.stderr)
        return 2
    directory = Path(tempfile.mkdtemp(prefix="dwcp-demo-"))
    try:
        trio.run(_demo, directory, args.size, args.writer_rate)
    except DemoFailed as exc:
        print(f"\nFAILED: {exc}\n(keys, data and node logs kept in {directory}; "
              f"logs in {directory / 'logs'})", flush=True)
        return 1
    except Exception:  # a bug, or a node answering what the demo does not expect
        traceback.print_exc()
        print(f"\nFAILED: the demo itself failed (traceback above)\n(keys, data and node "
              f"logs kept in {directory}; logs in {directory / 'logs'})", flush=True)
        return 1
    if not args.keep:
        shutil.rmtree(directory)
    else:
        print(f"(kept {directory})")
    return 0


async def _demo(directory: Path, size: str, rate: float) -> None:
    began = trio.current_time()
    fed = LocalFederation(directory, 4)
    print("DWCP demo: live migration across a 4-DC federation on loopback", flush=True)
    print(f"  federation {fed.federation.id!r} written to {fed.config_path} "
          f"(keys in {directory / 'keys'})")
    for dc in fed.federation.dcs:
        print(f"    {dc.name}  control {dc.control.host}:{dc.control.port}  "
              f"api http://{dc.api.host}:{dc.api.port}  key {str(dc.public_key)[:16]}...")
    await run_scenario(fed, began, partial(_scenario, fed, directory, size, rate))


async def run_scenario(fed: LocalFederation, began: float,
                       scenario: Callable[[trio.Nursery], Awaitable[None]]) -> None:
    """Run a demo's ``scenario(nursery)`` beside the federation's processes, kill them all
    whatever happens, raise its :class:`DemoFailed` as itself, and say how long it took."""
    failure: DemoFailed | None = None
    async with trio.open_nursery() as nursery:
        try:
            await scenario(nursery)
        except DemoFailed as exc:
            failure = exc  # raised below, not wrapped in the nursery's exception group
        finally:
            fed.kill_all()
    if failure is not None:
        raise failure
    print(f"\nOK: every check passed; the demo took {ms(trio.current_time() - began)}.")


async def _scenario(fed: LocalFederation, directory: Path, size: str, rate: float,
                    nursery: trio.Nursery) -> None:
    demo = Demo(fed, directory, DemoFailed)
    names = list(fed.nodes)
    src, dst, victim = names[0], names[2], names[1]
    vm = DEMO_VM
    # the source runs the VM with the demo's page writer as its guest
    fed.nodes[src].writers[vm] = WriterSetting(WRITER_SEED, rate)
    # the source may read the VM's images from the demo's images/ and, where the corpus
    # is installed, from the corpus in place (its node config's import directories)
    imports = [str(directory / "images")] + ([str(corpus_dir())] if corpus_dir().is_dir()
                                             else [])
    (directory / "nodes" / f"{src}.toml").write_text(render_node_config(imports))
    print(f"\n1. starting {len(names)} `dwcp node` processes; building the VM meanwhile ...",
          flush=True)
    t0 = trio.current_time()
    await fed.start_all(nursery)
    # under the import directory `federation init` gave every node (nodes/<dc>.toml)
    data = await trio.to_thread.run_sync(build_vm_data, directory / "images" / vm, size)
    for line in data.sources:
        print(f"   {line}")
    await fed.wait_full_mesh(t0 + START_BUDGET)
    await demo.wait_ready(t0 + START_BUDGET)
    status = await demo.get(src, "/api/status")
    led = status["ledger"]
    print(f"   full mesh and PBFT quorum ready {ms(trio.current_time() - t0)} after start "
          f"(ledger view {led['view']}, primary {led['primary']})")
    print(f"   data plane (as {src} reports it): {status['data_plane']}")
    # The ledger's default rollout gives v3 to no VM (DESIGN.md "Protocol versions and
    # rollout": v3 is rolled out by policy). The demo rolls it out to every VM, through
    # PBFT like any operator's policy change.
    policy = await demo.post(src, "/api/policy", SetPolicy(100, (), (), False))
    print(f"   rollout policy in the ledger: v3 for {policy['v3_percent']}% of VMs")

    print(f"\n2. importing {vm} at {src} with its writer running ...", flush=True)
    await demo.import_vm(src, vm, data, rate)

    print(f"\n3. live-migrating {vm} {src} -> {dst} through {src}'s API ...", flush=True)
    doc = await demo.migrate(vm, src, dst)
    mid, out = doc["id"], doc["outcome"]
    downtime = await demo.downtime(mid, src, dst)
    epoch, height = await demo.ledgers_agree(vm, dst, mid)
    hashes, writes = await trio.to_thread.run_sync(demo.check_images, vm, src, dst)
    rounds = out["rounds"]
    print("\n   summary")
    print(f"   rounds:        {rounds} ({max(rounds - 1, 0)} pre-copy while the writer ran, "
          "then the final round after the fence)")
    ratio = out["wire_bytes"] / out["bytes_sent"] if out["bytes_sent"] else 0.0
    print(f"   bytes:         {_human(out['bytes_sent'])} logical, {_human(out['wire_bytes'])} "
          f"on the wire ({ratio:.2f} of logical)")
    print(f"   downtime:      {ms(downtime)} (fence at {src} to start at {dst}, from their logs)")
    print(f"   total time:    {ms(doc['elapsed'])} (request to commit)")
    link, used = fed.nodes[src].up.get(dst), doc.get("version")
    print(f"   protocol:      transfer version v{used} (link {src}-{dst} "
          f"negotiated v{link}); data plane: {status['data_plane']}")
    if isinstance(used, int) and isinstance(link, int) and used < link:
        print(f"                  (the node chose v{used}: a migration uses v3 only where the "
              "ledger's rollout policy allows it, see federation/migration/rollout.py)")
    for img, h in hashes.items():
        print(f"   image hash:    {img} sha256 {h[:16]}... at {dst} == {src}'s at the fence")
    print(f"   writer check:  {writes} pages the writer last wrote before the fence are "
          f"intact at {dst}")
    print(f"   ledgers:       all {len(names)} agree: owner {dst}, epoch {epoch}, migration "
          f"committed (height >= {height})")

    others = [n for n in names if n != victim]
    print(f"\n4. kill -9 {victim} (no goodbye); watching the others' /api/status ...",
          flush=True)
    fed.nodes[victim].kill()
    t_kill = time.time()
    seen = await demo.watch_failure(victim, others, t_kill)
    for dc in others:
        m = seen[dc]
        steps = ", ".join(f"{k} {ms(m[k])}" for k in ("link down", "suspect", "dead",
                                                      "rerouted") if k in m)
        print(f"   {dc}: {steps}")
    routes = (await demo.get(src, "/api/status"))["routes"]
    shown = ", ".join(f"{p}: none (dead)" if not h else f"{p}: direct" if len(h) == 2
                      else f"{p}: via {'>'.join(h[1:-1])}" for p, h in routes["bulk"].items())
    print(f"   {src}'s bulk routes now: {shown}")
    worst = max(m["rerouted"] for m in seen.values())
    print(f"   detected: every survivor holds {victim} dead and routes around it within "
          f"{ms(worst)}")
    await fed.nodes[victim].wait_for("exit after SIGKILL", fed.nodes[victim].exited,
                                     trio.current_time() + 5.0)

    print(f"\n5. SIGTERM to the {len(others)} running nodes ...", flush=True)
    t_term = trio.current_time()
    for dc in others:
        fed.nodes[dc].terminate()
    for dc in others:
        await fed.nodes[dc].wait_for("exit after SIGTERM", fed.nodes[dc].exited,
                                     t_term + 15.0)
    codes = {dc: fed.nodes[dc].returncode for dc in others}
    print("   exit status: " + ", ".join(f"{dc} {c}" for dc, c in codes.items())
          + f" ({ms(trio.current_time() - t_term)} after SIGTERM)")
    bad = {dc: c for dc, c in codes.items() if c != 0}
    if bad:
        raise DemoFailed(f"nodes exited with non-zero status after SIGTERM: {bad}")
