"""The PBFT latency floor: its message pattern is PBFT's normal case at n = 4, and
the bench measures it among real processes."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import pytest

from bench.pbft_floor import CLIENT, PRIMARY, Done, FloorReplica, Log, Out, floor_run


def _run(commands: int, rng: random.Random | None) -> tuple[Counter[str], Counter[int], list[int]]:
    """Deliver every message among four in-process replicas, in FIFO order or, with
    ``rng``, in a random order; count messages by kind, logs by replica, and Done."""
    reps = [FloorReplica(i) for i in range(4)]
    kinds: Counter[str] = Counter()
    logs: Counter[int] = Counter()
    done: list[int] = []
    queue: list[tuple[int, int, str, int]] = []

    def execute(me: int, actions: Sequence[object]) -> None:
        for a in actions:
            if isinstance(a, Out):
                for to in a.to:
                    queue.append((me, to, a.kind, a.seq))
                    kinds[a.kind] += 1
            elif isinstance(a, Log):
                logs[me] += 1
            else:
                assert isinstance(a, Done)
                done.append(a.seq)

    for seq in range(commands):
        execute(CLIENT, reps[CLIENT].submit(seq))
        while queue:
            i = rng.randrange(len(queue)) if rng else 0
            sender, to, kind, s = queue.pop(i)
            execute(to, reps[to].receive(sender, kind, s))
    return kinds, logs, done


def test_each_command_is_the_28_messages_and_8_durable_writes_of_pbfts_normal_case() -> None:
    kinds, logs, done = _run(5, None)
    assert done == [0, 1, 2, 3, 4]
    per = {k: v // 5 for k, v in kinds.items()}
    # REQUEST to the primary, PRE-PREPARE to 3 backups, PREPARE from 3 backups to 3
    # others, COMMIT from all 4 to 3 others, REPLY from the 3 others to the client.
    assert per == {"request": 1, "pre-prepare": 3, "prepare": 9, "commit": 12, "reply": 3}
    assert sum(per.values()) == 28
    # The primary's PRE-PREPARE, each backup's, and every replica's prepared certificate.
    assert logs == {PRIMARY: 10, 1: 10, 2: 10, 3: 10}


@pytest.mark.parametrize("seed", range(20))
def test_any_delivery_order_completes_every_command_once(seed: int) -> None:
    kinds, _, done = _run(3, random.Random(seed))
    assert done == [0, 1, 2]
    assert sum(kinds.values()) == 3 * 28


def test_a_message_the_pattern_does_not_have_is_refused() -> None:
    with pytest.raises(ValueError, match="unexpected 'prepare' from 0"):
        FloorReplica(2).receive(PRIMARY, "prepare", 0)
    with pytest.raises(ValueError, match="only replica 1 submits"):
        FloorReplica(2).submit(0)
    with pytest.raises(ValueError, match="not in 0..3"):
        FloorReplica(4)


@pytest.mark.processes
def test_floor_smoke_four_processes_signed_and_synced_report_real_figures() -> None:
    r = floor_run(20, signed=True, synced=True)
    assert len(r.latencies) == 20 and all(0 < x < 5.0 for x in r.latencies)
    # The slowest replica's REPLY may still be on its way when the run stops.
    assert 27.5 <= r.messages_per_command <= 28.0
    if r.cpu_us_per_command is not None:  # None only without /proc
        assert r.cpu_us_per_command > 0
