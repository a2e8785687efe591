"""Where a process spends its CPU: a sampler driven by ``ITIMER_PROF`` (the process's
user + system CPU time, so a thread waiting on the disk or descheduled by other load is
never sampled, unlike a wall-clock profiler on a shared machine), recording the Python
stack of the thread the signal lands in (CPython runs handlers in the main thread; the
main thread's event loop is what is measured). ``dwcp bench consensus``'s node processes
start it when ``DWCP_BENCH_SAMPLE`` names a directory and write there, per node process,
``n{N}-{name}-{pid}.cpu-samples`` (one ``frame;frame;... count`` line per stack, the
collapsed format of flame graphs; from GO on); :func:`summary` groups them. They also
count, from GO on, the event loop's task steps (task switches) and passes (I/O polls)
in ``n{N}-{name}-{pid}.loop-counts``
(:class:`LoopCounter`): counts, unlike times, do not move with the machine's load, so
runtime changes compare on a shared machine."""

from __future__ import annotations

import collections
import json
import signal
from pathlib import Path
from types import FrameType

import trio

__all__ = ["CpuSampler", "LoopCounter", "summary", "restart"]

#: Seconds of process CPU between samples: 1 ms gives ~1,000 samples per CPU second,
#: and the handler (a stack walk) costs a few microseconds of each.
INTERVAL = 0.001


class CpuSampler:
    def __init__(self) -> None:
        self.stacks: collections.Counter[str] = collections.Counter()

    def _sample(self, signum: int, frame: FrameType | None) -> None:
        names = []
        while frame is not None:
            code = frame.f_code
            names.append(f"{code.co_name} ({code.co_filename.rsplit('/', 2)[-1]})")
            frame = frame.f_back
        self.stacks[";".join(reversed(names))] += 1

    def start(self) -> None:
        global _running
        _running = self
        signal.signal(signal.SIGPROF, self._sample)
        signal.setitimer(signal.ITIMER_PROF, INTERVAL, INTERVAL)

    def stop(self, path: Path) -> None:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        path.write_text("".join(f"{s} {n}\n" for s, n in self.stacks.most_common()))


def summary(path: Path, groups: dict[str, tuple[str, ...]]) -> dict[str, float]:
    """Share of the samples of ``path`` whose stack holds a frame naming one of a group's
    functions, for each group in order (a sample counts for its first group only); the
    rest is ``other``."""
    counts = dict.fromkeys([*groups, "other"], 0)
    total = 0
    for line in path.read_text().splitlines():
        stack, n = line.rsplit(" ", 1)
        total += int(n)
        for name, needles in groups.items():
            if any(needle in stack for needle in needles):
                counts[name] += int(n)
                break
        else:
            counts["other"] += int(n)
    return {k: round(v / max(total, 1), 3) for k, v in counts.items()}


class LoopCounter(trio.abc.Instrument):
    """Task steps and event-loop passes since :func:`restart` (give it to ``trio.run``
    as an instrument)."""

    def __init__(self) -> None:
        global _counter
        _counter = self
        self.steps = 0
        self.passes = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1

    def before_io_wait(self, timeout: float) -> None:
        self.passes += 1

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"task_steps": self.steps, "loop_passes": self.passes}))


_running: CpuSampler | None = None
_counter: LoopCounter | None = None


def restart() -> None:
    """Forget the samples and counts so far (a node's start-up), if they are taken here."""
    if _running is not None:
        _running.stacks.clear()
    if _counter is not None:
        _counter.steps = _counter.passes = 0
