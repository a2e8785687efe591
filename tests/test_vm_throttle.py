"""Auto-converge's mechanism (federation.vms.throttle): the duty cycle stops a real process
part of the time and always leaves it running (the decisions: tests/test_precopy_policy.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from federation.vms.throttle import DutyCycle
from tests.harness.waiting import poll_until


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
