"""``dwcp bench consensus``: PBFT among real node processes on loopback.

Each replica is its own OS process (``python -m bench.consensus node ...``): a
:class:`mesh.runtime.node_runtime.Runtime` (websocket control links, secure channels, its
SQLite store in WAL mode with ``synchronous=FULL``) hosting the node's own
ledger path: :class:`federation.migration.dc_core.NodeCore` over the sans-I/O
:class:`consensus.pbft.replica.Replica`, and
:class:`federation.node.ledger_client.NodeLedger`'s ``await submit(command)``, as
the node's API and migration sessions use them. Load comes from every DC: each
runs ``window`` callers, each keeping one ledger command in flight (``RegisterVm``
carrying an operator's signed request, a real ledger write checked at every
replica) and timing it from ``submit`` to its result (f+1 matching signed replies).
NodeLedger batches the callers waiting together, up to 8 commands per signed
REQUEST (``batched_commands_per_request`` says how many it averaged), so the
batched figures measure a path the product uses (issue 14 item 5). A refused
command fails the phase.

Figures (issue 5):

- ``batched_commits_per_s``, ``batched_p99_ms``: n = 4, every node with a
  window of ``--window`` commands (24). Both figures come from the same run, so
  the window is the offered load at which they are read: by Little's law the
  commands in flight are throughput x latency, so 3,000/s with p99 <= 50 ms
  leaves room for at most ~150 in flight over the four nodes. On the 2-core
  test machine (docs/BENCHMARKS.md) 4 x 16 in flight gave 2,911-2,956/s at
  p99 31-35 ms, 4 x 24 3,483-3,982/s at 39-45 ms and 4 x 32 4,734-4,817/s at
  45-49 ms:
  the batch holds what arrived while the previous one ran, so more in flight
  means larger batches and fewer messages per command, until the wait
  dominates; 24 sits in the middle of the range where both hold;
- ``unbatched_p50_ms``: n = 4, one node, one command at a time;
- ``unbatched_floor_p50_ms``: in the same run, PBFT's bare message pattern of that
  phase with Ed25519 signatures and the three synced log writes
  (:mod:`bench.pbft_floor`, its ``signed_synced`` configuration), and
  ``unbatched_vs_floor``, the ratio of the two: what our replica and runtime add
  to what the protocol's own requirements cost (issue 14: at most 1.3). The two
  alternate in ``UNBATCHED_ROUNDS`` rounds and each median is over all rounds, so both
  see the same minutes of the machine; ``unbatched_vs_floor_rounds`` gives each round's
  ratio;
- ``n16_batched_commits_per_s``: n = 16, every node loading with a window of
  ``--n16-window`` commands (16: no latency target, so enough in flight that
  the primary fills its batches);
- ``view_change_recovery_ms``: n = 4, one node submitting one command at a
  time; the primary is killed with SIGKILL; the time from the kill until the
  first command submitted after it commits.

Where the time goes (diagnostics, not targets):

- ``batched_cpu_us_per_commit``, ``unbatched_cpu_us_per_commit``: user + system
  CPU of all node processes during the loaded run (``/proc``), per commit; on
  two cores 3,000 commits/s leave at most 667 us each;
- ``batched_mean_batch``: commits per executed sequence number;
- ``batched_commands_per_request``: commands per signed REQUEST on the node's path;
- ``batched_messages_per_batch``, ``batched_retransmitted_per_batch``,
  ``batched_status_per_batch`` (and the ``n16_`` ones, with ``n16_cpu_us_per_commit`` and
  ``n16_mean_batch``): per executed sequence number, over all nodes, the messages sent,
  those sent again in answer to a STATUS, and the STATUS signed (each goes to n - 1
  peers). The normal case's own per batch: PRE-PREPARE n - 1, PREPARE (n - 1)^2,
  COMMIT n(n - 1), REPLY up to n(n - 1) (one per client in the batch), and the REQUESTs
  (36 + the REQUESTs at n = 4);
- ``batched_signed_in_run``: operator requests signed inside the measured span. The
  operator's signatures are made before it (an operator signs on its own machine;
  ``dwcp bench authz`` gives ``sign_us``), so the CPU figures are the federation's
  own; this says whether the presigned ones ran out (then some signing is in them);
- ``link_one_way_ms``, ``link_cpu_us_per_message``: two node processes (the same
  runtime: websocket link, secure channel, hosted core) bouncing one message
  back and forth; one hop's latency and the CPU both processes spend per
  message. Every PBFT phase is at least one such hop.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

from bench import cpu_sampler
from bench.measure import cpu_seconds, percentile
from bench.pbft_floor import floor_run

__all__ = ["register", "Cluster", "bench_identity", "spawn", "tell", "process_group", "PeersUp"]

#: Seconds a node gets to link up with every peer before the run is abandoned.
READY_TIMEOUT = 60.0
#: Commands of the floor phase: about what the unbatched phase commits in its
#: 2.5 s at 4-9 ms each (docs/BENCHMARKS.md), so both medians rest on as many.
FLOOR_COMMANDS = 500
#: The unbatched phase and its floor alternate in this many rounds (each round a part of
#: the phase's time and of FLOOR_COMMANDS), and their medians are taken over all rounds:
#: both sides of ``unbatched_vs_floor`` then see the same minutes of the machine. On
#: the quiet 2-core machine the same code's figures moved by up to 1.5-2x between runs
#: (docs/BENCHMARKS.md, issue 14), and the two sides used to run 10-20 s apart.
UNBATCHED_ROUNDS = 2
#: Operator requests signed before a loaded run, per second of it over all loading
#: nodes: above the 4,000-4,800 commits/s the batched phase has reached
#: (docs/BENCHMARKS.md), so a run signs nothing inside the measured span; at about
#: 60 us a signature that is under 0.5 s of CPU per node before a 5 s run at n = 4.
PRESIGN_RATE = 6000
#: ... and at most this many per second per caller: one caller has one command in
#: flight, and a commit takes at least the floor's 7-9 ms (docs/BENCHMARKS.md).
CALLER_RATE = 500


def bench_identity(name: str) -> Any:
    from mesh.identity import Identity

    return Identity.from_seed(hashlib.sha256(b"dwcp-bench-key/" + name.encode()).digest())


#: The operator whose signed request every benchmark register carries (the ledger checks
#: it at every replica: the cost of authorization is part of what is measured).
BENCH_OPERATOR = "bench-ops"


def bench_operators() -> Any:
    from consensus.authz import Operator, OperatorTable, Role

    key = bench_identity("operator/" + BENCH_OPERATOR).public
    return OperatorTable.of("bench", [Operator(BENCH_OPERATOR, key, Role.OPERATOR)])


def names_for(n: int) -> list[str]:
    return [f"n{i:02d}" for i in range(n)]


# --------------------------------------------------------------------------- node process


class PeersUp:
    """A core that only watches the ``PeerUp``/``PeerDown`` events the runtime gives every
    core; ``all_up`` is set once all ``expected`` peers are up."""

    def __init__(self, expected: int, all_up: Any) -> None:
        self.expected = expected
        self.all_up = all_up  # a trio.Event
        self.up: set[str] = set()
        #: peer links that went down (a keepalive that timed out)
        self.downs = 0

    def handle(self, now: float, event: Any) -> list[Any]:
        from mesh.core import PeerDown, PeerUp

        if isinstance(event, PeerUp):
            self.up.add(event.peer)
            if len(self.up) >= self.expected:
                self.all_up.set()
        elif isinstance(event, PeerDown):
            self.up.discard(event.peer)
            self.downs += 1
        return []


class LoopStall:
    """How late the event loop ran a task that asked to wake every ``TICK`` seconds: the
    longest stretch in which it ran nothing else (a step of a core, a restore done on the
    loop), which is what a link's keepalive and every other task waited."""

    TICK = 0.01

    def __init__(self) -> None:
        self.max_s = 0.0
        self.ticks = 0
        #: the longest single task step seen (seconds) and the task that took it
        self.step_s = 0.0
        self.step_task = ""
        self._began = 0.0

    def before_task_step(self, task: Any) -> None:
        self._began = time.perf_counter()

    def after_task_step(self, task: Any) -> None:
        took = time.perf_counter() - self._began
        if took > self.step_s:
            self.step_s, self.step_task = took, task.name

    async def run(self) -> None:
        import trio

        self._began = time.perf_counter()
        trio.lowlevel.add_instrument(self)  # type: ignore[arg-type]
        while True:
            start = trio.current_time()
            await trio.sleep(self.TICK)
            self.ticks += 1
            self.max_s = max(self.max_s, trio.current_time() - start - self.TICK)


class LoadRecord:
    """What the load tasks measured: per command, its latency and (submitted, committed)
    wall-clock times; refused commands are counted (a benchmark of refusals measures
    nothing)."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.commit_walls: list[float] = []
        self.pairs: list[tuple[float, float]] = []
        self.refused: list[str] = []
        self.timeouts = 0
        #: commands whose operator request was signed during the run (the presigned
        #: ones ran out)
        self.signed_in_run = 0


async def _node_main(args: argparse.Namespace) -> None:
    import trio

    from consensus.authz import authorize
    from consensus.ledger import ImportVm, RegisterVm
    from consensus.pbft.durable import ReplicaLog
    from consensus.pbft.replica import PbftConfig, Replica
    from federation.migration.dc_core import TAGS, NodeCore
    from federation.node.errors import LedgerTimeout
    from federation.node.ledger_client import NodeLedger
    from mesh.runtime.log import JsonLog
    from mesh.runtime.node_runtime import Peer, Runtime, wall_clock
    from mesh.runtime.sqlite_store import SQLiteStore

    names = names_for(args.n)
    ports = [int(p) for p in args.ports.split(",")]
    me = names.index(args.name)
    ident = bench_identity(args.name)
    keys = {m: bench_identity(m).public for m in names}
    peers = [Peer(m, keys[m], "127.0.0.1", ports[i]) for i, m in enumerate(names) if i != me]
    data = Path(args.dir)
    store = SQLiteStore(data / f"{args.name}.sqlite3")
    logfile = open(data / f"{args.name}.log", "a")  # noqa: SIM115 (open for the process life)
    rt = Runtime(
        name=args.name, federation="bench", identity=ident, public_key=ident.public,
        peers=peers, listen_host="127.0.0.1", listen_port=ports[me], versions=(1,),
        store=store, log=JsonLog(args.name, logfile),
    )
    replica = Replica(args.name, ident, keys, ReplicaLog(store), random.Random(),
                      PbftConfig(view_timeout=args.view_timeout, offload_restore=True),
                      bench_operators(),
                      wall=wall_clock)
    operator = bench_identity("operator/" + BENCH_OPERATOR)
    # The node's own ledger path (federation.node.assembly): the node core hosting the
    # replica, and NodeLedger's ``await submit(command)``, which batches the commands
    # of concurrent callers as the node's API and migration sessions do.
    ledger = NodeLedger(rt)
    core = NodeCore(args.name, replica, on_ledger_done=ledger.done, mode_of=lambda dst: None)
    rt.add_core("node", core, TAGS)
    linked = trio.Event()
    watch = PeersUp(len(peers), linked)
    rt.add_core("peers", watch, ())  # type: ignore[arg-type]
    stall = LoopStall()
    record = LoadRecord()

    quiet: dict[str, Any] = {"last_exec": -1}

    def status_text() -> str:
        """The ledger digest only once execution has stood still for a status period:
        a snapshot of the whole ledger costs milliseconds per thousand VMs, and taking
        it every period while commands flow would stall this node's event loop (the
        process test compares digests after the load, when the ledgers are quiet)."""
        still = replica.last_exec == quiet["last_exec"]
        quiet["last_exec"] = replica.last_exec
        digest = None
        if still:
            # once per state (the ledger changes only by executing or by a state
            # transfer, which both move last_exec): at 100,000 VMs the digest joins and
            # hashes 16 MB, 70 ms of the event loop every status period otherwise
            key = (replica.last_exec, id(replica.ledger))
            if quiet.get("key") != key:
                quiet["key"], quiet["digest"] = key, replica.ledger.state_digest().hex()
            digest = quiet["digest"]
        return json.dumps({"last_exec": replica.last_exec, "view": replica.view,
                           "digest": digest, "committed": len(record.latencies),
                           "metrics": replica.metrics, "runtime": rt.counters,
                           "node": core.counters, "invocations": ledger.invocations,
                           "loop_stall_max_ms": round(stall.max_s * 1000, 1),
                           "loop_ticks": stall.ticks, "peer_downs": watch.downs,
                           "longest_step_ms": round(stall.step_s * 1000, 1),
                           "longest_step_task": stall.step_task,
                           "offloads": rt.offloads()})

    def write_file(text: str) -> None:
        tmp = data / f"{args.name}.status.tmp"
        tmp.write_text(text)
        tmp.replace(data / f"{args.name}.status")

    def write_status() -> None:
        write_file(status_text())

    counter = {"i": 0, "taken": 0}

    def make_command() -> Any:
        counter["i"] += 1
        i = counter["i"]
        vm = f"vm-{args.name}-{args.run}-{i}"
        auth = authorize(operator, "bench", BENCH_OPERATOR, ImportVm(vm, args.name, "/bench"),
                         time.time(), f"{args.name}-{args.run}-{i:08d}")
        return RegisterVm(vm, args.name, auth)

    # The operator's signatures are made before the measured span, as an operator
    # makes them on its own machine (dwcp bench authz measures what one costs):
    # the node's CPU is what its own path spends. They are made once the links are
    # up, in a worker thread (the event loop goes on answering keepalives), before
    # READY. A run that outlasts them signs the rest in the loop, counted in
    # ``signed_in_run``.
    presigned: collections.deque[Any] = collections.deque()

    def presign() -> None:
        presigned.extend(make_command() for _ in range(args.presign))

    def next_command() -> Any:
        counter["taken"] += 1
        if presigned:
            return presigned.popleft()
        record.signed_in_run += 1
        return make_command()

    async def one_at_a_time(end: float) -> None:
        """One of ``window`` callers: submit, wait for the result, submit the next."""
        while trio.current_time() < end and (
                not args.limit or counter["taken"] < args.limit):
            command = next_command()
            t0, w0 = trio.current_time(), time.time()
            try:
                result = await ledger.submit(command)
            except LedgerTimeout:
                record.timeouts += 1
                continue
            t1, w1 = trio.current_time(), time.time()
            if not result.ok:
                record.refused.append(result.error)
                continue
            record.latencies.append(t1 - t0)
            record.commit_walls.append(w1)
            record.pairs.append((w0, w1))

    async def load(window: int, duration: float) -> None:
        # A closed loop: ``window`` callers each keep one command in flight.
        end = trio.current_time() + duration
        with trio.move_on_at(end + 10.0):  # the commands in flight at the end complete
            async with trio.open_nursery() as callers:
                for _ in range(window):
                    callers.start_soon(one_at_a_time, end)
        tmp = data / f"{args.name}.result.tmp"
        tmp.write_text(json.dumps({"latencies": record.latencies,
                                   "commit_walls": record.commit_walls, "pairs": record.pairs,
                                   "refused": record.refused[:5], "refused_count":
                                   len(record.refused), "timeouts": record.timeouts,
                                   "signed_in_run": record.signed_in_run}))
        tmp.replace(data / f"{args.name}.result")

    async def status_loop() -> None:
        while True:  # the file write (a rename on disk) runs off the event loop
            await trio.to_thread.run_sync(write_file, status_text())
            await trio.sleep(0.2)

    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        if args.watch_loop:
            nursery.start_soon(stall.run)  # from the runtime's start: what a peer would see
        await linked.wait()
        await trio.to_thread.run_sync(presign)
        print("READY", flush=True)
        async with trio.open_nursery() as work:
            work.start_soon(status_loop)
            go = await trio.wrap_file(sys.stdin).readline()
            cpu_sampler.restart()  # DWCP_BENCH_SAMPLE: the run's samples, not the start's
            if go.strip() == "GO" and args.window > 0:
                work.start_soon(load, args.window, args.duration)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                async for _ in sigs:
                    break
            work.cancel_scope.cancel()
        write_status()
        rt.shutdown()
        nursery.cancel_scope.cancel()  # (the stall watch)
    store.close()


# --------------------------------------------------------------------------- link hop


#: The two processes of the link phase.
PING_NAMES = ("pa", "pb")


def _ping_type() -> type:
    """The one message of the link phase, registered only in the processes that use it."""
    from mesh import wire
    from mesh.wire import U64, field

    @wire.message("bench.ping", max_size=64)
    class Ping:
        n: int = field(U64())

    return Ping


async def _ping_main(args: argparse.Namespace) -> None:
    """One end of the link phase: answer every ping at once; ``pa`` serves the first."""
    import trio

    from mesh.core import Received, Send
    from mesh.runtime.log import JsonLog
    from mesh.runtime.node_runtime import Peer, Runtime

    ping = _ping_type()
    me = PING_NAMES.index(args.name)
    other = PING_NAMES[1 - me]
    ports = [int(p) for p in args.ports.split(",")]
    ident = bench_identity(args.name)
    data = Path(args.dir)

    linked = trio.Event()
    peers = PeersUp(1, linked)

    class Echo:
        count = 0

        def handle(self, now: float, event: Any) -> list[Any]:
            peers.handle(now, event)
            if isinstance(event, Received) and isinstance(event.message, ping):
                self.count += 1
                return [Send(event.peer, ping(event.message.n + 1))]
            return []

    core = Echo()
    with open(data / f"{args.name}.log", "a") as logfile:
        rt = Runtime(name=args.name, federation="bench", identity=ident, public_key=ident.public,
                     peers=[Peer(other, bench_identity(other).public, "127.0.0.1", ports[1 - me])],
                     listen_host="127.0.0.1", listen_port=ports[me], versions=(1,),
                     log=JsonLog(args.name, logfile))
        rt.add_core("echo", core, tags=("bench.",))  # type: ignore[arg-type]
        async with trio.open_nursery() as nursery:
            await nursery.start(rt.run)
            await linked.wait()
            print("READY", flush=True)
            await trio.wrap_file(sys.stdin).readline()
            cpu0 = time.process_time()
            if me == 0:
                rt.send(other, ping(0))
            await trio.sleep(args.duration)  # the measured span: the link works meanwhile
            cpu, count = time.process_time() - cpu0, core.count
            rt.shutdown()
    tmp = data / f"{args.name}.result.tmp"
    tmp.write_text(json.dumps({"count": count, "cpu": cpu}))
    tmp.replace(data / f"{args.name}.result")


def spawn(args: list[str], stderr: Path) -> subprocess.Popen[str]:
    """``python args...`` with pipes for stdin and stdout (text) and its stderr appended
    to ``stderr``."""
    err = open(stderr, "a")  # noqa: SIM115 (the child holds it; closed with the process)
    return subprocess.Popen([sys.executable, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=err, text=True, cwd=os.getcwd())


def tell(procs: list[subprocess.Popen[str]], line: str) -> None:
    """Write ``line`` to the stdin of every process in ``procs``."""
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(line + "\n")
        proc.stdin.flush()


@contextlib.contextmanager
def process_group(what: str) -> Iterator[list[subprocess.Popen[str]]]:
    """A list to put started processes in: whatever is still running at the end is
    killed, and a timeout, OS or JSON error on the way becomes a RuntimeError that
    says ``what`` failed."""
    procs: list[subprocess.Popen[str]] = []
    try:
        yield procs
    except (subprocess.TimeoutExpired, OSError, ValueError) as exc:
        raise RuntimeError(f"{what} failed: {exc}") from exc
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _link_hop(duration: float) -> tuple[float, float]:
    """(one-way seconds, CPU microseconds per message) of one message bouncing between
    two node processes for ``duration`` seconds."""
    with tempfile.TemporaryDirectory(prefix="dwcp-bench-link-") as tmp, \
            process_group("link phase") as procs:
        ports = _free_ports(2)
        for name in PING_NAMES:
            procs.append(spawn(["-m", "bench.consensus", "ping", "--name", name,
                                "--ports", ",".join(map(str, ports)), "--dir", tmp,
                                "--duration", str(duration)], Path(tmp) / f"{name}.stderr"))
        for name, proc in zip(PING_NAMES, procs, strict=True):
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "READY":
                raise RuntimeError(f"link process {name} did not come up")
        tell(procs, "GO")
        for proc in procs:
            proc.wait(timeout=duration + 30.0)
        results = [json.loads((Path(tmp) / f"{m}.result").read_text()) for m in PING_NAMES]
    messages = sum(r["count"] for r in results)
    if messages == 0:
        raise RuntimeError("no message crossed the link")
    return duration / messages, sum(r["cpu"] for r in results) / messages * 1e6


# --------------------------------------------------------------------------- driver


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Cluster:
    """n node processes on loopback with their data in ``directory``."""

    def __init__(self, n: int, directory: Path, view_timeout: float = 2.0) -> None:
        self.n = n
        self.dir = directory
        self.names = names_for(n)
        self.ports = _free_ports(n)
        self.view_timeout = view_timeout
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.runs = 0
        #: nodes started from now on watch their event loop's stalls (LoopStall; off for
        #: the consensus figures: a trio instrument on every task step costs CPU)
        self.watch_loop = False

    def start(self, name: str, window: int = 0, duration: float = 0.0,
              presign: int = 0, limit: int = 0) -> None:
        """``limit``: the node's callers stop once they made this many commands (0: the
        whole ``duration``)."""
        self.runs += 1
        self.procs[name] = spawn(
            ["-m", "bench.consensus", "node", "--name", name,
             "--n", str(self.n), "--ports", ",".join(map(str, self.ports)),
             "--dir", str(self.dir), "--window", str(window), "--duration", str(duration),
             "--view-timeout", str(self.view_timeout), "--run", str(self.runs),
             "--presign", str(presign), "--limit", str(limit)]
            + (["--watch-loop"] if self.watch_loop else []),
            self.dir / f"{name}.stderr")

    def start_all(self, loads: dict[str, tuple[int, float]], presign: int = 0,
                  limit: int = 0) -> None:
        for name in self.names:
            window, duration = loads.get(name, (0, 0.0))
            self.start(name, window, duration, presign if window else 0,
                       limit if window else 0)
        self.wait_ready(self.names)

    def wait_ready(self, names: list[str]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        for name in names:
            proc = self.procs[name]
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if line.strip() != "READY" or time.monotonic() > deadline:
                raise RuntimeError(f"node {name} did not come up: see {self.dir}/{name}.stderr")

    def go(self, names: list[str]) -> None:
        tell([self.procs[name] for name in names], "GO")

    def kill(self, name: str) -> float:
        """SIGKILL: no shutdown path runs, only what was fsynced survives."""
        self.procs[name].send_signal(signal.SIGKILL)
        when = time.time()
        self.procs[name].wait()
        return when

    def result(self, name: str, timeout: float) -> dict[str, Any]:
        path = self.dir / f"{name}.result"
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {name} wrote no result within {timeout} s")
            time.sleep(0.05)
        data: dict[str, Any] = json.loads(path.read_text())
        path.unlink()
        return data

    def status(self, name: str) -> dict[str, Any] | None:
        try:
            out: dict[str, Any] = json.loads((self.dir / f"{name}.status").read_text())
        except (OSError, ValueError):
            return None
        return out

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _cpu_seconds(pids: list[int]) -> float | None:
    """User + system CPU of ``pids`` so far; None where there is none."""
    each = [cpu_seconds(pid) for pid in pids]
    return None if None in each else sum(c for c in each if c is not None)


@attrs.frozen
class LoadResult:
    rate: float
    latencies: list[float]
    cpu_us_per_commit: float | None
    mean_batch: float | None
    #: commands per signed REQUEST on the node's submission path (NodeCore.submit_many)
    commands_per_request: float | None
    #: commands whose operator request was signed inside the measured span
    signed_in_run: int = 0
    #: per executed batch, over all nodes: messages sent, messages sent again in answer
    #: to a STATUS (consensus.pbft.status), STATUS signed (each broadcast to n - 1)
    messages_per_batch: float | None = None
    retransmitted_per_batch: float | None = None
    status_per_batch: float | None = None


def _loaded_run(n: int, window: int, duration: float, loaders: list[str] | None = None
                ) -> LoadResult:
    with tempfile.TemporaryDirectory(prefix="dwcp-bench-pbft-") as tmp:
        c = Cluster(n, Path(tmp))
        try:
            loaders = loaders if loaders is not None else c.names
            presign = math.ceil(duration * min(PRESIGN_RATE / len(loaders),
                                               window * CALLER_RATE))
            c.start_all({m: (window, duration) for m in loaders}, presign)
            pids = [p.pid for p in c.procs.values()]
            cpu0 = _cpu_seconds(pids)
            c.go(c.names)
            results = [c.result(m, duration + 60.0) for m in loaders]
            cpu1 = _cpu_seconds(pids)
        finally:
            c.stop()
        statuses = [s for m in c.names if (s := c.status(m)) is not None]
    refused = sum(r["refused_count"] for r in results)
    if refused:
        raise RuntimeError(f"the ledger refused {refused} of the benchmark's commands: "
                           f"{[e for r in results for e in r['refused']][:3]}")
    executed = [s["metrics"].get("executed_batches", 0) for s in statuses]
    requests = sum(s["node"].get("requests_submitted", 0) for s in statuses)
    commands = sum(s["node"].get("commands_submitted", 0) for s in statuses)
    lat = [x for r in results for x in r["latencies"]]
    walls = sorted(w for r in results for w in r["commit_walls"])
    span = (walls[-1] - walls[0]) if len(walls) > 1 else duration
    cpu = None if cpu0 is None or cpu1 is None or not walls else (cpu1 - cpu0) / len(walls) * 1e6
    batches = max(executed, default=0)

    def per_batch(total: float) -> float | None:
        return total / batches if batches else None

    return LoadResult(len(walls) / max(span, 1e-9), lat, cpu,
                      len(walls) / batches if batches else None,
                      commands / requests if requests else None,
                      sum(r.get("signed_in_run", 0) for r in results),
                      per_batch(sum(s["runtime"].get("messages_out", 0) for s in statuses)),
                      per_batch(sum(s["metrics"].get("retransmitted", 0) for s in statuses)),
                      per_batch(sum(s["metrics"].get("status_signed", 0) for s in statuses)))


def _view_change_recovery(duration: float) -> float:
    with tempfile.TemporaryDirectory(prefix="dwcp-bench-pbft-") as tmp:
        c = Cluster(4, Path(tmp))
        try:
            c.start_all({"n01": (1, duration)})
            c.go(c.names)
            time.sleep(duration / 3)  # steady commits before the fault (waiting, not work)
            killed = c.kill("n00")  # the primary of view 0
            res = c.result("n01", duration + 30.0)
        finally:
            c.stop()
    # A command whose reply was already on its way completes right after the kill;
    # recovery is when the first command submitted after the kill commits.
    after = sorted(done for sent, done in res["pairs"] if sent > killed)
    if not after:
        raise RuntimeError("no command submitted after the kill completed")
    return (after[0] - killed) * 1000.0


def run(args: argparse.Namespace) -> int:
    """Run every phase; a phase that fails reports ``null`` and its error (and the
    exit status is 1), so one failure does not hide the other figures."""
    out: dict[str, Any] = {"view_timeout_s": 2.0, "window": args.window,
                           "n16_window": args.n16_window, "duration_s": args.duration}
    errors: dict[str, str] = {}

    def phase(name: str, fn: Any) -> None:
        try:
            fn()
        except (RuntimeError, OSError, ValueError) as exc:
            errors[name] = str(exc)

    def rounded(x: float | None, digits: int) -> float | None:
        return None if x is None else round(x, digits)

    def batched() -> None:
        out["batched_commits_per_s"] = out["batched_p99_ms"] = None
        r = _loaded_run(4, args.window, args.duration)
        out["batched_commits_per_s"] = round(r.rate, 1)
        out["batched_p99_ms"] = round(percentile(r.latencies, 0.99) * 1000, 2)
        out["batched_cpu_us_per_commit"] = rounded(r.cpu_us_per_commit, 0)
        out["batched_mean_batch"] = rounded(r.mean_batch, 1)
        out["batched_commands_per_request"] = rounded(r.commands_per_request, 2)
        out["batched_signed_in_run"] = r.signed_in_run
        out["batched_messages_per_batch"] = rounded(r.messages_per_batch, 1)
        out["batched_retransmitted_per_batch"] = rounded(r.retransmitted_per_batch, 2)
        out["batched_status_per_batch"] = rounded(r.status_per_batch, 2)

    unbatched_runs: list[LoadResult] = []
    floor_latencies: list[list[float]] = []

    def unbatched() -> None:
        unbatched_runs.append(_loaded_run(4, 1, args.duration / 2 / UNBATCHED_ROUNDS,
                                          loaders=["n01"]))

    def floor() -> None:
        floor_latencies.append(floor_run(FLOOR_COMMANDS // UNBATCHED_ROUNDS, signed=True,
                                         synced=True).latencies)

    def unbatched_figures() -> None:
        """Medians over the rounds; ``unbatched_vs_floor_rounds``: each round's own ratio
        (how far the machine moved within the run)."""
        lat = [x for r in unbatched_runs for x in r.latencies]
        flat = [x for f in floor_latencies for x in f]
        out["unbatched_p50_ms"] = round(percentile(lat, 0.50) * 1000, 2) if lat else None
        cpu = [(r.cpu_us_per_commit, len(r.latencies)) for r in unbatched_runs
               if r.cpu_us_per_commit is not None and r.latencies]
        out["unbatched_cpu_us_per_commit"] = (
            round(sum(c * n for c, n in cpu) / sum(n for _, n in cpu), 0) if cpu else None)
        out["unbatched_floor_p50_ms"] = round(percentile(flat, 0.50) * 1000, 2) if flat else None
        out["unbatched_vs_floor"] = None
        if lat and flat:
            out["unbatched_vs_floor"] = round(percentile(lat, 0.50) / percentile(flat, 0.50), 2)
        if len(unbatched_runs) == len(floor_latencies):
            out["unbatched_vs_floor_rounds"] = [
                round(percentile(r.latencies, 0.50) / percentile(f, 0.50), 2)
                for r, f in zip(unbatched_runs, floor_latencies, strict=True)
                if r.latencies and f]

    def n16() -> None:
        out["n16_batched_commits_per_s"] = None
        r = _loaded_run(16, args.n16_window, args.duration)
        out["n16_batched_commits_per_s"] = round(r.rate, 1)
        out["n16_cpu_us_per_commit"] = rounded(r.cpu_us_per_commit, 0)
        out["n16_mean_batch"] = rounded(r.mean_batch, 1)
        out["n16_messages_per_batch"] = rounded(r.messages_per_batch, 1)
        out["n16_retransmitted_per_batch"] = rounded(r.retransmitted_per_batch, 2)
        out["n16_status_per_batch"] = rounded(r.status_per_batch, 2)

    def link() -> None:
        out["link_one_way_ms"] = out["link_cpu_us_per_message"] = None
        hop, cpu = _link_hop(min(args.duration, 4.0))
        out["link_one_way_ms"] = round(hop * 1000, 3)
        out["link_cpu_us_per_message"] = rounded(cpu, 0)

    def recovery() -> None:
        out["view_change_recovery_ms"] = None
        ms = _view_change_recovery(max(6.0, args.duration))
        out["view_change_recovery_ms"] = round(ms, 1)

    phase("batched", batched)
    for _ in range(UNBATCHED_ROUNDS):
        phase("unbatched", unbatched)
        phase("unbatched_floor", floor)
    unbatched_figures()
    if not args.skip_n16:
        phase("n16", n16)
    phase("view_change", recovery)
    phase("link", link)
    if errors:
        out["errors"] = errors
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))
    return 1 if errors else 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("consensus", help="PBFT among node processes on loopback")
    p.add_argument("--json", action="store_true")
    p.add_argument("--duration", type=float, default=5.0, help="seconds of load per phase")
    p.add_argument("--window", type=int, default=24, help="commands in flight per node (n = 4)")
    p.add_argument("--n16-window", type=int, default=16,
                   help="commands in flight per node (n = 16)")
    p.add_argument("--skip-n16", action="store_true", help="leave out the 16-process phase")
    p.set_defaults(func=run)


def _node_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.consensus node")
    p.add_argument("--name", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--ports", required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--window", type=int, default=0)
    p.add_argument("--duration", type=float, default=0.0)
    p.add_argument("--view-timeout", type=float, default=2.0)
    p.add_argument("--run", type=int, default=0)
    p.add_argument("--presign", type=int, default=0,
                   help="operator requests to sign before READY (see make_command)")
    p.add_argument("--limit", type=int, default=0,
                   help="stop loading once this many commands were submitted (0: none)")
    p.add_argument("--watch-loop", action="store_true",
                   help="report the event loop's longest stall in the status file")
    return p.parse_args(argv)


def _ping_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.consensus ping")
    p.add_argument("--name", required=True, choices=PING_NAMES)
    p.add_argument("--ports", required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--duration", type=float, required=True)
    return p.parse_args(argv)


if __name__ == "__main__":
    if sys.argv[1:2] not in (["node"], ["ping"]):
        sys.exit("usage: python -m bench.consensus node|ping --name N ... "
                 "(run by dwcp bench consensus)")
    import trio

    if sys.argv[1] == "ping":
        trio.run(_ping_main, _ping_args(sys.argv[2:]))
        sys.exit(0)
    node_args = _node_args(sys.argv[2:])
    if os.environ.get("DWCP_BENCH_PROFILE"):  # where a node spends its CPU, for tuning
        import cProfile

        out = Path(node_args.dir) / f"{node_args.name}.prof"
        cProfile.run("trio.run(_node_main, node_args)", str(out))
    elif os.environ.get("DWCP_BENCH_SAMPLE"):  # the same, by CPU-time samples (see there)
        from bench.cpu_sampler import CpuSampler, LoopCounter

        # into the directory the variable names (the run's own is deleted at its end),
        # one pair of files per node process: n{N}-{name}-{pid}
        keep = Path(os.environ["DWCP_BENCH_SAMPLE"])
        keep.mkdir(parents=True, exist_ok=True)
        stem = f"n{node_args.n}-{node_args.name}-{os.getpid()}"
        sampler = CpuSampler()
        sampler.start()
        counter = LoopCounter()
        try:
            trio.run(_node_main, node_args, instruments=[counter])
        finally:
            sampler.stop(keep / f"{stem}.cpu-samples")
            counter.save(keep / f"{stem}.loop-counts")
    else:
        trio.run(_node_main, node_args)
