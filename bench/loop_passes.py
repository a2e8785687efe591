"""Scheduler cost of one control message: ``python -m bench.loop_passes [SECONDS]``.

Two runtimes (:class:`mesh.runtime.node_runtime.Runtime`, the link phase's echo core of
``dwcp bench consensus``) bounce one message back and forth in ONE trio loop for
SECONDS (3), with a trio instrument counting, per message: task steps (each a task
switch), passes of the event loop (each an I/O poll) and the steps of each task. Unlike
the CPU and latency figures these counts do not depend on the machine's load, so they
compare runtime changes on a shared machine (docs/BENCHMARKS.md, issue 14). It also
prints the process's CPU time per message (both ends; the counting instrument adds to
it), which load moves less than wall time but still moves."""

from __future__ import annotations

import collections
import sys
import time
from typing import Any

import trio

from bench.consensus import PING_NAMES, PeersUp, _free_ports, _ping_type, bench_identity
from mesh.core import Received, Send
from mesh.runtime.log import JsonLog
from mesh.runtime.node_runtime import Peer, Runtime


class _Count(trio.abc.Instrument):
    def __init__(self) -> None:
        self.on = False
        self.passes = 0
        self.steps: collections.Counter[str] = collections.Counter()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.on:
            self.steps[task.name.rsplit(".", 1)[-1]] += 1

    def before_io_wait(self, timeout: float) -> None:
        if self.on:
            self.passes += 1


class _Echo:
    def __init__(self, peers: PeersUp, ping: type) -> None:
        self.peers = peers
        self.ping = ping
        self.count = 0

    def handle(self, now: float, event: Any) -> list[Any]:
        self.peers.handle(now, event)
        if isinstance(event, Received) and isinstance(event.message, self.ping):
            self.count += 1
            return [Send(event.peer, self.ping(event.message.n + 1))]
        return []


async def _main(duration: float) -> None:
    ping = _ping_type()
    ports = _free_ports(2)
    linked = [trio.Event(), trio.Event()]
    cores: list[_Echo] = []
    runtimes: list[Runtime] = []
    with open("/dev/null", "w") as devnull:
        for me, name in enumerate(PING_NAMES):
            other = PING_NAMES[1 - me]
            ident = bench_identity(name)
            rt = Runtime(name=name, federation="bench", identity=ident, public_key=ident.public,
                         peers=[Peer(other, bench_identity(other).public, "127.0.0.1",
                                     ports[1 - me])],
                         listen_host="127.0.0.1", listen_port=ports[me], versions=(1,),
                         log=JsonLog(name, devnull))
            core = _Echo(PeersUp(1, linked[me]), ping)
            rt.add_core("echo", core, tags=("bench.",))  # type: ignore[arg-type]
            cores.append(core)
            runtimes.append(rt)
        count = _Count()
        trio.lowlevel.add_instrument(count)
        async with trio.open_nursery() as nursery:
            for rt in runtimes:
                await nursery.start(rt.run)
            for up in linked:
                await up.wait()
            count.on = True
            cpu0 = time.process_time()
            runtimes[0].send(PING_NAMES[1], ping(0))
            await trio.sleep(duration)
            cpu = time.process_time() - cpu0
            count.on = False
            for rt in runtimes:
                rt.shutdown()
    n = sum(c.count for c in cores)
    if n == 0:
        raise SystemExit("no message crossed the link")
    steps = sum(count.steps.values())
    per_task = ", ".join(f"{name} {k / n:.2f}" for name, k in count.steps.most_common(4))
    print(f"messages {n}  task steps/message {steps / n:.2f}  "
          f"loop passes/message {count.passes / n:.2f}  ({per_task})  "
          f"cpu us/message {cpu / n * 1e6:.0f} (both ends, one process, instrument on)")


if __name__ == "__main__":
    trio.run(_main, float(sys.argv[1]) if len(sys.argv) > 1 else 3.0)
