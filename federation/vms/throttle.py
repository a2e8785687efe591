"""Auto-converge for a qemu guest whose dirty rate does not fall: the node throttles its
vCPUs by duty-cycling the QEMU process with SIGSTOP/SIGCONT (docs/qemu.md, "Downtime").

Why this mechanism: QEMU's own auto-converge (``cpu-throttle-percentage``) acts only
inside QEMU's migration, which DWCP does not run for RAM. ``query-cpus-fast`` names the
vCPU threads, but a job-control stop cannot target one thread (SIGSTOP stops the whole
thread group, signal(7)), and cgroup ``cpu.max`` needs a writable cgroup (v2 with
delegation), which these machines do not give the node (``/sys/fs/cgroup/cpu`` is a
read-only cgroup v1 mount). So the whole process is stopped for ``percent`` % of every
period: the guest's vCPUs (and QEMU's I/O threads with them) run the rest. QMP answers
within one period, which the timeouts in :mod:`federation.vms.qmp` cover many times over.

A stopped QEMU must never be left stopped: :meth:`DutyCycle.stop` ends with SIGCONT, and
a backend attaching to a running QEMU sends SIGCONT first (a node killed mid-cycle).

The share is kept over the time the signals actually took, not over the waits asked for
(:func:`stop_for`, :func:`run_for`): the cycle runs on a thread of the node, which wakes
late when the node's other threads hold the GIL or the machine is loaded. Measured with
two GIL-holding threads beside it under load (2 cores, load 16-28): a "90 %" cycle of
fixed waits ran the process 68 ms of every 142 (its 5 ms running phases overran 13x),
stopped 46-58 % of the time as sampled from another process; kept by the signals' times
it stood 88 % (its own count 89.6 %). The guests of `dwcp bench live` went on dirtying
1,400-2,100 pages a round at "90 %" with fixed waits.
"""

from __future__ import annotations

import os
import signal
import threading
import time

__all__ = ["DutyCycle", "PERIOD_S", "MAX_STOP_S", "stop_for", "run_for"]

#: The duty cycle's period: 50 ms, short against the guest's 100 ms heartbeat and long
#: against the cost of two signals.
PERIOD_S = 0.05
#: The longest single stop: a running phase that overran is paid back over several
#: stops, so QMP (timeouts of seconds, federation.vms.qmp) and the guest's own timers
#: never wait long.
MAX_STOP_S = 0.5


def stop_for(share: float, ran: float, stopped: float) -> float:
    """Seconds to stop the process now so that, with one nominal running phase to come,
    the stopped share of the time so far is ``share``: ``ran`` and ``stopped`` are the
    seconds it actually ran and stood so far. Between 0 and :data:`MAX_STOP_S`."""
    want = (ran + PERIOD_S * (1 - share)) * share / (1 - share) - stopped
    return min(MAX_STOP_S, max(0.0, want))


def run_for(share: float, ran: float, stopped: float) -> float:
    """Seconds to let the process run now: what keeps its running share at ``1 - share``
    after ``stopped`` seconds stood and ``ran`` run, at most a nominal running phase (0:
    it ran too long already; stop it again at once)."""
    want = stopped * (1 - share) / share - ran
    return min(PERIOD_S * (1 - share), max(0.0, want))


#: How hard and when to throttle is the round policy's decision
#: (federation.migration.precopy); this module only carries it out.


class DutyCycle:
    """Stops process ``pid`` for ``percent`` % of every :data:`PERIOD_S` until
    :meth:`stop`."""

    def __init__(self, pid: int, percent: int) -> None:
        if not 0 < percent < 100:
            raise ValueError(f"throttle: expected 1..99 %, got {percent}")
        self.pid = pid
        self.percent = percent
        #: seconds the process ran and stood under the cycle so far, as signalled
        self.ran = self.stopped = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"throttle-{pid}", daemon=True)
        self._thread.start()

    def _signal(self, sig: signal.Signals) -> bool:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def _run(self) -> None:
        share = self.percent / 100
        running_since: float | None = None
        try:
            while not self._done.is_set():
                # each instant read on the side that counts a delay as stopped: the stop
                # after its signal, the start before its signal
                if not self._signal(signal.SIGSTOP):
                    return
                stop_at = time.monotonic()
                if running_since is not None:
                    self.ran += stop_at - running_since
                # a debt beyond one longest stop is forgiven (a node stalled for seconds
                # does not freeze its guest for as long afterwards)
                self.stopped = max(self.stopped,
                                   self.ran * share / (1 - share) - MAX_STOP_S)
                self._done.wait(stop_for(share, self.ran, self.stopped))
                running_since = time.monotonic()
                self.stopped += running_since - stop_at
                self._signal(signal.SIGCONT)
                self._done.wait(run_for(share, self.ran, self.stopped))
        finally:
            self._signal(signal.SIGCONT)

    def stop(self) -> None:
        """End the cycle with the process running."""
        self._done.set()
        self._thread.join()
        self._signal(signal.SIGCONT)
