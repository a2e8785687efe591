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
"""

from __future__ import annotations

import os
import signal
import threading

__all__ = ["DutyCycle", "PERIOD_S"]

#: The duty cycle's period: 50 ms, short against the guest's 100 ms heartbeat and long
#: against the cost of two signals.
PERIOD_S = 0.05
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
        try:
            while not self._done.is_set():
                stopped = PERIOD_S * self.percent / 100
                if not self._signal(signal.SIGSTOP):
                    return
                self._done.wait(stopped)  # the stopped share of the period
                self._signal(signal.SIGCONT)
                self._done.wait(PERIOD_S - stopped)  # the running share
        finally:
            self._signal(signal.SIGCONT)

    def stop(self) -> None:
        """End the cycle with the process running."""
        self._done.set()
        self._thread.join()
        self._signal(signal.SIGCONT)
