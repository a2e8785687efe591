"""Auto-converge's mechanism (federation.vms.throttle): the duty cycle stops a real process
part of the time and always leaves it running (the decisions: tests/test_precopy_policy.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from federation.vms.throttle import MAX_STOP_S, PERIOD_S, DutyCycle, run_for, stop_for
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


def _share_with_late_wakeups(percent: int, late: float, cycles: int = 400) -> float:
    """The stopped share of a cycle driven by stop_for/run_for when every wait ends
    ``late`` seconds after it was asked to (a thread woken late by the GIL or the load)."""
    share = percent / 100
    ran = stopped = 0.0
    for _ in range(cycles):
        stopped = max(stopped, ran * share / (1 - share) - MAX_STOP_S)
        stopped += stop_for(share, ran, stopped) + late
        ran += run_for(share, ran, stopped) + late
    return stopped / (ran + stopped)


def test_the_stopped_share_holds_when_the_cycle_wakes_late() -> None:
    # on time: the nominal 45 ms stopped, 5 ms running of a 90 % cycle
    assert stop_for(0.9, 0.0, 0.0) == pytest.approx(PERIOD_S * 0.9)
    assert run_for(0.9, 0.0, PERIOD_S * 0.9) == pytest.approx(PERIOD_S * 0.1)
    # every wake-up 60 ms late (measured: 5 ms running phases that lasted 68 ms): fixed
    # waits would give (45 + 60) / (45 + 60 + 5 + 60) = 62 %; the cycle keeps 90 %
    assert _share_with_late_wakeups(90, 0.0) == pytest.approx(0.9, abs=0.005)
    assert _share_with_late_wakeups(90, 0.06) == pytest.approx(0.9, abs=0.01)
    assert _share_with_late_wakeups(50, 0.02) == pytest.approx(0.5, abs=0.01)
    # a running phase that overran is paid back, never with one stop over MAX_STOP_S
    assert stop_for(0.9, 10.0, 0.0) == MAX_STOP_S
    # a process that stood too long already runs a whole nominal phase, no more
    assert run_for(0.5, 0.0, 10.0) == pytest.approx(PERIOD_S * 0.5)
    assert run_for(0.9, 1.0, 0.1) == 0.0
