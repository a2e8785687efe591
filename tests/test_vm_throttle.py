"""Auto-converge (federation.vms.throttle): the throttle rises like QEMU's when a round
dirties about as much as the one before, and the duty cycle stops a real process part of
the time and always leaves it running."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from federation.vms.throttle import INCREMENT, INITIAL, MAXIMUM, DutyCycle, next_throttle
from tests.harness.waiting import poll_until


def test_the_throttle_rises_only_while_the_dirty_rate_does_not_fall() -> None:
    assert next_throttle(0, [1000]) == 0  # one round: nothing to compare
    assert next_throttle(0, [1000, 500]) == 0  # falling
    assert next_throttle(0, [1000, 950]) == INITIAL
    assert next_throttle(INITIAL, [1000, 950, 960]) == INITIAL + INCREMENT
    assert next_throttle(MAXIMUM, [5, 5, 5]) == MAXIMUM
    assert next_throttle(30, [1000, 0, 0]) == 30  # nothing dirtied: converged


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_a_duty_cycle_stops_the_process_part_of_the_time_and_ends_running() -> None:
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        cycle = DutyCycle(busy.pid, 80)
        seen: set[str] = set()

        def stopped_and_running() -> bool:
            seen.add(_state(busy.pid))
            return "T" in seen and bool(seen & {"R", "S"})

        poll_until(stopped_and_running, "the process seen both stopped and running", 10,
                   every=0.003)
        cycle.stop()
        assert _state(busy.pid) != "T"
    finally:
        busy.kill()
        busy.wait()
