"""``dwcp bench pbft-floor``: what one unbatched PBFT command costs before any of
our code runs.

Four processes on loopback exchange exactly the messages of PBFT's normal case at
n = 4 (OSDI'99 §4.2: REQUEST to the primary, PRE-PREPARE, PREPARE, COMMIT, REPLY;
28 messages per command), one command at a time, submitted by a backup as in
``dwcp bench consensus``'s unbatched phase, and nothing else: no CBOR checks, no
secure channel, no replica state, no ledger, no execution. Each message is a
small CBOR array padded to ``FRAME_BYTES``, sent over one TCP connection per pair
with the product's control framing (a 4-byte length, then the message, read from the
socket by the link's own task: the ``CONTROL_FRAMES`` capability, which the node's
links switch to after their websocket handshake), without its AEAD. Two of issue 5's own
requirements can be switched on:

- ``signed``: every message carries its sender's Ed25519 signature, checked by
  the receiver (PyNaCl, one signature per broadcast);
- ``synced``: the three writes PBFT makes durable before it speaks on the
  critical path (the primary's PRE-PREPARE, a backup's PRE-PREPARE before its
  PREPARE, the prepared certificate before COMMIT) go to the node store
  (:class:`mesh.runtime.sqlite_store.SQLiteStore`: WAL, ``synchronous=FULL``) on the
  event loop before the send.

The figures are floors: the full system cannot be faster than the configuration
with the same requirements, whatever it does in between. They say how much of
``unbatched_p50_ms`` a better runtime or replica could win back.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs

__all__ = ["register", "FloorReplica", "CONFIGS", "floor_run"]

N = 4
F = 1
PRIMARY = 0
#: The submitting node: a backup, as in ``dwcp bench consensus``'s unbatched phase.
CLIENT = 1
#: Size of every message before its signature (64 bytes more when signed). The
#: replica's messages of one unbatched command, as encoded for the wire (signature
#: included): REQUEST 140-142, PRE-PREPARE 285-288, PREPARE 271-273, COMMIT 132-133,
#: REPLY 124-125 bytes, 193 on average over the 28.
FRAME_BYTES = 160
#: Commands run before the measured ones (connections warm, caches filled).
WARMUP = 50
#: (name, signed, synced)
CONFIGS = (("transport", False, False), ("signed", True, False),
           ("synced", False, True), ("signed_synced", True, True))


@attrs.frozen
class Log:
    """Make ``key`` durable before the actions after it."""

    key: str


@attrs.frozen
class Out:
    """Send ``kind`` for command ``seq`` to ``to`` (one signature for all of them)."""

    to: tuple[int, ...]
    kind: str
    seq: int


@attrs.frozen
class Done:
    """The client holds f + 1 matching replies for ``seq``."""

    seq: int


Action = Log | Out | Done


@attrs.define
class _Slot:
    preprepared: bool = False
    prepares: set[int] = attrs.Factory(set)
    commits: set[int] = attrs.Factory(set)
    replies: set[int] = attrs.Factory(set)
    sent_commit: bool = False
    executed: bool = False
    done: bool = False


class FloorReplica:
    """Who sends what to whom in PBFT's normal case (sans-I/O): the quorum rules and
    nothing else. A backup is prepared with the PRE-PREPARE and 2f PREPAREs of
    backups (its own among them), commits locally with 2f + 1 COMMITs and replies;
    the client is done with f + 1 replies, its own counting."""

    def __init__(self, me: int) -> None:
        if not 0 <= me < N:
            raise ValueError(f"replica index {me} is not in 0..{N - 1}")
        self.me = me
        self.others = tuple(i for i in range(N) if i != me)
        self.slots: dict[int, _Slot] = {}

    def submit(self, seq: int) -> list[Action]:
        if self.me != CLIENT:
            raise ValueError(f"only replica {CLIENT} submits")
        return [Out((PRIMARY,), "request", seq)]

    def receive(self, sender: int, kind: str, seq: int) -> list[Action]:
        slot = self.slots.setdefault(seq, _Slot())
        out: list[Action] = []
        if kind == "request" and self.me == PRIMARY and not slot.preprepared:
            slot.preprepared = True
            out += [Log(f"pp/{seq}"), Out(self.others, "pre-prepare", seq)]
        elif kind == "pre-prepare" and sender == PRIMARY and not slot.preprepared:
            slot.preprepared = True
            slot.prepares.add(self.me)
            out += [Log(f"pp/{seq}"), Out(self.others, "prepare", seq)]
        elif kind == "prepare" and sender != PRIMARY:
            slot.prepares.add(sender)
        elif kind == "commit":
            slot.commits.add(sender)
        elif kind == "reply" and self.me == CLIENT:
            slot.replies.add(sender)
        else:
            raise ValueError(f"replica {self.me}: unexpected {kind!r} from {sender} for {seq}")
        if slot.preprepared and len(slot.prepares) >= 2 * F and not slot.sent_commit:
            slot.sent_commit = True
            slot.commits.add(self.me)
            out += [Log(f"prepared/{seq}"), Out(self.others, "commit", seq)]
        if slot.sent_commit and len(slot.commits) >= 2 * F + 1 and not slot.executed:
            slot.executed = True
            if self.me == CLIENT:
                slot.replies.add(self.me)
            else:
                out.append(Out((CLIENT,), "reply", seq))
        if slot.executed and self.me == CLIENT and len(slot.replies) >= F + 1 and not slot.done:
            slot.done = True
            out.append(Done(seq))
        return out


# --------------------------------------------------------------------------- one process


async def _replica_main(args: argparse.Namespace) -> None:
    import cbor2
    import trio

    from bench.consensus import bench_identity
    from mesh.runtime.sqlite_store import SQLiteStore

    me = args.index
    ports = [int(p) for p in args.ports.split(",")]
    idents = [bench_identity(f"floor{i}") for i in range(N)]
    store = SQLiteStore(Path(args.dir) / f"floor{me}.sqlite3") if args.synced else None
    core = FloorReplica(me)
    conns: dict[int, trio.SocketStream] = {}
    #: one sender at a time per stream (the product's link writes under its own lock)
    sending: dict[int, trio.Lock] = {}
    linked = trio.Event()
    done: dict[int, trio.Event] = {}
    sent = [0]

    def frame(kind: str, seq: int) -> bytes:
        bare = len(cbor2.dumps([kind, seq, me, b""]))
        body = cbor2.dumps([kind, seq, me, bytes(max(0, FRAME_BYTES - bare - 2))])
        raw = idents[me].sign(body) + body if args.signed else body
        return len(raw).to_bytes(4, "big") + raw

    async def execute(actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, Log):
                if store is not None:
                    store.put(a.key, b"\1" * FRAME_BYTES, sync=True)
            elif isinstance(a, Out):
                raw = frame(a.kind, a.seq)
                for to in a.to:
                    async with sending[to]:
                        await conns[to].send_all(raw)
                    sent[0] += 1
            else:
                done[a.seq].set()

    async def deliver(peer: int, raw: bytes) -> None:
        if args.signed:
            sig, raw = raw[:64], raw[64:]
            if not idents[peer].public.verify(raw, sig):
                raise RuntimeError(f"floor{me}: bad signature from floor{peer}")
        kind, seq, sender, _ = cbor2.loads(raw)
        if sender != peer:
            raise RuntimeError(f"floor{me}: floor{peer} sent a message of floor{sender}")
        await execute(core.receive(peer, kind, seq))

    async def read(peer: int, stream: trio.SocketStream) -> None:
        # The product's control framing (CONTROL_FRAMES): a 4-byte length, then the
        # message, read from the socket by the link's own task.
        buf = bytearray()
        while data := await stream.receive_some(1 << 16):
            buf += data
            while len(buf) >= 4 and len(buf) >= 4 + (size := int.from_bytes(buf[:4], "big")):
                raw = bytes(buf[4:4 + size])
                del buf[:4 + size]
                await deliver(peer, raw)

    def attach(peer: int, stream: trio.SocketStream) -> None:
        conns[peer] = stream
        sending[peer] = trio.Lock()
        if len(conns) == N - 1:
            linked.set()

    async with trio.open_nursery() as nursery:
        async def accept(stream: trio.SocketStream) -> None:
            hello = await stream.receive_some(1)
            if len(hello) != 1 or not 0 <= hello[0] < N:
                raise RuntimeError(f"floor{me}: a connection without a peer index")
            attach(hello[0], stream)
            await read(hello[0], stream)

        await nursery.start(functools.partial(trio.serve_tcp, accept, ports[me], host="127.0.0.1"))
        for peer in range(me):  # the higher index dials: one connection per pair
            for _ in range(100):
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", ports[peer])
                    break
                except OSError:
                    await trio.sleep(0.05)  # the peer is not listening yet
            else:
                raise RuntimeError(f"floor{me}: floor{peer} did not accept")
            await stream.send_all(bytes([me]))
            attach(peer, stream)
            nursery.start_soon(read, peer, stream)
        await linked.wait()
        print("READY", flush=True)
        stdin = trio.wrap_file(sys.stdin)
        await stdin.readline()  # GO
        latencies = []
        if me == CLIENT:
            for seq in range(WARMUP + args.commands):
                done[seq] = trio.Event()
                start = time.perf_counter()
                await execute(core.submit(seq))
                await done[seq].wait()
                if seq >= WARMUP:
                    latencies.append(time.perf_counter() - start)
            _write_result(Path(args.dir), me, {"latencies": latencies, "sent": sent[0]})
        await stdin.readline()  # STOP (or the end of stdin)
        if me != CLIENT:
            _write_result(Path(args.dir), me, {"latencies": latencies, "sent": sent[0]})
        nursery.cancel_scope.cancel()
    if store is not None:
        store.close()


def _write_result(directory: Path, me: int, result: dict[str, Any]) -> None:
    tmp = directory / f"floor{me}.result.tmp"
    tmp.write_text(json.dumps(result))
    tmp.replace(directory / f"floor{me}.result")


# --------------------------------------------------------------------------- driver


@attrs.frozen
class FloorResult:
    latencies: list[float]
    cpu_us_per_command: float | None
    messages_per_command: float


def floor_run(commands: int, signed: bool, synced: bool) -> FloorResult:
    """Run ``commands`` measured commands (after ``WARMUP``) among four processes."""
    from bench.consensus import _cpu_seconds, _free_ports, process_group, spawn, tell

    with tempfile.TemporaryDirectory(prefix="dwcp-bench-floor-") as tmp, \
            process_group("floor run") as procs:
        ports = _free_ports(N)
        for i in range(N):
            args = ["-m", "bench.pbft_floor", "--index", str(i),
                    "--ports", ",".join(map(str, ports)), "--dir", tmp,
                    "--commands", str(commands)]
            args += ["--signed"] if signed else []
            args += ["--synced"] if synced else []
            procs.append(spawn(args, Path(tmp) / f"floor{i}.stderr"))
        for i, proc in enumerate(procs):
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "READY":
                stderr = (Path(tmp) / f"floor{i}.stderr").read_text()[-2000:]
                raise RuntimeError(f"floor process {i} did not come up: {stderr}")
        cpu0 = _cpu_seconds([p.pid for p in procs])
        tell(procs, "GO")
        client = Path(tmp) / f"floor{CLIENT}.result"
        deadline = time.monotonic() + 60.0 + commands * 0.1
        while not client.exists():  # waiting for the processes, not standing in for work
            if time.monotonic() > deadline or procs[CLIENT].poll() is not None:
                stderr = (Path(tmp) / f"floor{CLIENT}.stderr").read_text()[-2000:]
                raise RuntimeError(f"the floor client finished no run: {stderr}")
            time.sleep(0.05)
        cpu1 = _cpu_seconds([p.pid for p in procs])
        tell(procs, "STOP")
        for proc in procs:
            proc.wait(timeout=30.0)
        results = [json.loads((Path(tmp) / f"floor{i}.result").read_text()) for i in range(N)]
    latencies = results[CLIENT]["latencies"]
    # the CPU window holds the warm-up commands too
    cpu = None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) / (WARMUP + commands) * 1e6
    sent = sum(r["sent"] for r in results)
    return FloorResult(latencies, cpu, sent / (WARMUP + commands))


def run(args: argparse.Namespace) -> int:
    from bench.measure import percentile

    if args.commands < 1:
        raise SystemExit("--commands: at least 1")
    out: dict[str, Any] = {"commands": args.commands, "frame_bytes": FRAME_BYTES}
    for name, signed, synced in CONFIGS:
        try:
            r = floor_run(args.commands, signed, synced)
        except RuntimeError as exc:
            print(f"pbft-floor {name}: {exc}", file=sys.stderr)
            return 1
        out[f"{name}_p50_ms"] = round(percentile(r.latencies, 0.50) * 1000, 2)
        out[f"{name}_p90_ms"] = round(percentile(r.latencies, 0.90) * 1000, 2)
        if r.cpu_us_per_command is not None:
            out[f"{name}_cpu_us_per_command"] = round(r.cpu_us_per_command)
        out[f"{name}_messages_per_command"] = round(r.messages_per_command, 2)
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("pbft-floor",
                       help="unbatched PBFT's message pattern alone: the latency floor")
    p.add_argument("--json", action="store_true")
    p.add_argument("--commands", type=int, default=1000,
                   help=f"measured commands per configuration (after {WARMUP} warm-up)")
    p.set_defaults(func=run)


def _replica_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.pbft_floor")
    p.add_argument("--index", type=int, required=True, choices=range(N))
    p.add_argument("--ports", required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--commands", type=int, required=True)
    p.add_argument("--signed", action="store_true")
    p.add_argument("--synced", action="store_true")
    return p.parse_args(argv)


if __name__ == "__main__":
    import trio

    trio.run(_replica_main, _replica_args(sys.argv[1:]))
