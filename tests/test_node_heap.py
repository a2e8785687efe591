"""The node gives the heap's free memory back after a migration (federation.node.heap):
freed buffers that glibc keeps between live ones stop counting in the RSS once trimmed
(the growth ``dwcp bench soak`` measured was such memory)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from federation.node.heap import TRIM_AVAILABLE, TUNE_ENV, trim_heap, tune_heap

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


_BUFFERS = """
import sys
from federation.node.heap import tune_heap
if sys.argv[1] == "tuned":
    assert tune_heap({})
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024
first = bytearray(4 << 20)
del first  # untuned, glibc now raises its mmap threshold past 4 MiB
big, pins = [], []
for _ in range(40):  # a migration's round buffers, between longer-lived objects
    big.append(bytearray(2 << 20))
    pins.append(bytearray(512 << 10))
before = rss()
big.clear()
print(before - rss())
"""


@pytest.mark.skipif(not TRIM_AVAILABLE, reason="no glibc malloc in this libc")
@pytest.mark.parametrize("mode", ["tuned", "default"])
def test_with_the_threshold_fixed_freed_buffers_go_back_without_a_trim(mode: str) -> None:
    """tune_heap (what dwcp node does at start) keeps glibc from moving large buffers
    into its arenas: 80 MiB of freed 2 MiB buffers leave the RSS at once. With glibc's
    defaults they stay (the growth the soak measured between two trims)."""
    out = subprocess.run([sys.executable, "-c", _BUFFERS, mode], check=True,
                         capture_output=True, text=True, timeout=60)
    released = float(out.stdout)
    if mode == "tuned":
        assert released >= 70, released
    else:
        assert released < 20, released


def test_tuning_can_be_turned_off() -> None:
    assert tune_heap({TUNE_ENV: "0"}) is False
