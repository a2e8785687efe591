"""The node gives the heap's free memory back after a migration (federation.node.heap):
freed buffers that glibc keeps between live ones stop counting in the RSS once trimmed
(the growth ``dwcp bench soak`` measured was such memory)."""

from __future__ import annotations

import pytest

from federation.node.heap import TRIM_AVAILABLE, trim_heap

MIB = 1 << 20


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(not TRIM_AVAILABLE, reason="no glibc malloc_trim in this libc")
def test_trim_returns_the_holes_freed_buffers_leave() -> None:
    # after one large buffer is freed glibc raises its mmap threshold, so the next ones
    # of that size come from the heap; freeing them between live ones leaves holes that
    # only malloc_trim gives back (the heap's top never shrinks past a live buffer)
    first = bytearray(4 * MIB)
    del first
    big: list[bytearray] = []
    pins: list[bytearray] = []
    for _ in range(40):
        big.append(bytearray(2 * MIB))  # zero-filled: its pages are touched
        pins.append(bytearray(512 * 1024))
    held = _rss_mib()
    big.clear()
    before = _rss_mib()
    trim_heap()
    after = _rss_mib()
    assert before - after >= 40, (held, before, after)  # 80 MiB of holes went back
    del pins
