"""``dwcp bench wire``: what the strict wire codec costs on the frames consensus sends.

The frames are the ones ``dwcp bench consensus`` makes: a ``RegisterVm`` ledger command
carrying an operator's signed request, that request and its head (which the ledger
decodes at every replica, in execution), a REQUEST of 8 such commands, a batch of 6
REQUESTs, the PRE-PREPARE envelope carrying it, a PREPARE envelope relaying that
PRE-PREPARE. For each: its size, and the CPU microseconds of the measuring thread per
``wire.decode`` (``decode_us``, the whole strict decode: the fast path, or the checked
path for a frame it declines) and per ``wire.encode`` of the decoded message
(``encode_us``). Each figure is the minimum over ``--passes`` passes of the mean over
a pass: on a shared machine the minimum is the figure load moves least.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from mesh import wire

__all__ = ["register", "frames", "run"]

#: The clock: this thread's CPU time (see bench/authz.py).
CLOCK = time.thread_time
#: Microseconds of work per pass, about: long enough to read the clock's steps,
#: short enough that a pass often runs without being preempted.
PASS_US = 20_000


def frames() -> dict[str, bytes]:
    """The named frames (see the module docstring), made with the benchmark's keys."""
    from bench.consensus import BENCH_OPERATOR, bench_identity
    from consensus.authz import authorize
    from consensus.ledger import ImportVm, RegisterVm
    from consensus.pbft import messages as m

    operator = bench_identity("operator/" + BENCH_OPERATOR)
    primary, backup = bench_identity("n00"), bench_identity("n01")
    created = 1_790_000_000.0
    auths = [authorize(operator, "bench", BENCH_OPERATOR, ImportVm(f"vm-{i}", "n00", "/bench"),
                       created, f"n00-1-{i:08d}") for i in range(8)]
    commands = [wire.encode(RegisterVm(f"vm-{i}", "n00", a)) for i, a in enumerate(auths)]
    request = m.sign(primary, "n00", m.Request("n00", 1, tuple(commands)))
    batch = m.batch_bytes((request,) * 6, 1_790_000_000_000_000)
    preprepare = m.seal(primary, "n00", m.PrePrepare(0, 1, m.digest(batch)), batch)
    prepare = m.seal(backup, "n01", m.Prepare(0, 1, m.digest(batch)), m.relay(preprepare))
    signed = wire.decode(auths[0].request)
    return {
        "command": commands[0],
        "operator_request": auths[0].request,
        "request_head": signed.head,
        "request_body": request.body,
        "batch": batch,
        "preprepare_envelope": wire.encode(preprepare),
        "prepare_envelope": wire.encode(prepare),
    }


def _best_us(fn: Any, size: int, passes: int) -> float:
    calls = max(10, PASS_US // (2 + size // 500))
    best = float("inf")
    for _ in range(passes):
        start = CLOCK()
        for _ in range(calls):
            fn()
        best = min(best, (CLOCK() - start) / calls * 1e6)
    return round(best, 2)


def run(passes: int = 40) -> dict[str, Any]:
    out: dict[str, Any] = {"passes": passes, "cores": os.cpu_count(),
                           "load_average": [round(x, 2) for x in os.getloadavg()]}
    for name, data in frames().items():
        msg = wire.decode(data)
        assert wire.encode(msg) == data, f"{name} is canonical"
        out[name] = {"bytes": len(data),
                     "decode_us": _best_us(lambda d=data: wire.decode(d), len(data), passes),
                     "encode_us": _best_us(lambda m=msg: wire.encode(m), len(data), passes)}
    return out


def _main(args: argparse.Namespace) -> int:
    result = run(args.passes)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("wire", help="the strict wire codec on the frames consensus sends")
    p.add_argument("--json", action="store_true", help="one JSON object on one line")
    p.add_argument("--passes", type=int, default=40, help="passes (the minimum is reported)")
    p.set_defaults(func=_main)
