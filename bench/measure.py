"""Readings the benchmarks share: a process's RSS, CPU time and open descriptors from
Linux ``/proc`` (proc(5)), and the percentile of a sample."""

from __future__ import annotations

import os

__all__ = ["rss_mib", "cpu_seconds", "open_fds", "percentile"]


def rss_mib(pid: int) -> float | None:
    """``pid``'s resident set (VmRSS) in MiB; None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, IndexError, ValueError):
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds ``pid`` used so far; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # after the command name in parentheses: state is field 3, utime 14, stime 15
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def open_fds(pid: int) -> int | None:
    """How many descriptors ``pid`` holds open; None if it is gone."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` (not empty): the value at rank ``q * n``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
