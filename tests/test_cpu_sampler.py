"""bench.cpu_sampler: samples land on the functions that burn CPU, the summary gives each
sample to its first matching group, and restart forgets the start-up's samples."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from bench import cpu_sampler
from bench.cpu_sampler import CpuSampler, summary


def _burn_hashes(seconds: float) -> None:
    end = time.process_time() + seconds
    data = b"x" * 4096
    while time.process_time() < end:
        data = hashlib.sha256(data).digest() * 128


def _idle_loop(seconds: float) -> None:
    end = time.process_time() + seconds
    n = 0
    while time.process_time() < end:
        n += 1


def test_samples_follow_cpu_and_restart_forgets(tmp_path: Path) -> None:
    sampler = CpuSampler()
    sampler.start()
    try:
        _idle_loop(0.1)
        cpu_sampler.restart()  # what ran before does not count
        _burn_hashes(0.3)
    finally:
        sampler.stop(tmp_path / "s")
    text = (tmp_path / "s").read_text()
    assert "_burn_hashes" in text and "_idle_loop" not in text
    shares = summary(tmp_path / "s", {"hashing": ("_burn_hashes",), "never": ("nothing",)})
    assert shares["hashing"] > 0.9 and shares["never"] == 0.0
    assert abs(sum(shares.values()) - 1.0) < 0.01


def test_a_sample_counts_for_its_first_group_only(tmp_path: Path) -> None:
    path = tmp_path / "s"
    path.write_text("a (x.py);b (y.py) 3\na (x.py) 1\nc (z.py) 1\n")
    assert summary(path, {"b": ("b (y.py)",), "a": ("a (x.py)",)}) == {
        "b": 0.6, "a": 0.2, "other": 0.2}
