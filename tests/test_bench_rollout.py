"""``dwcp bench rollout`` measures what it says: the percentage's share over real VM ids
(checked here against a count of its own), and a rollback on four in-process nodes that
reaches every DC's ledger within the issue's 5 s (a short smoke: two samples)."""

from __future__ import annotations

import pytest

from bench.rollout import percent_accuracy, run_rollback
from federation.migration.rollout import rollout_bucket


def test_percent_accuracy_counts_the_buckets() -> None:
    got = percent_accuracy(2000)
    below_50 = sum(rollout_bucket(f"vm-{i:06d}") < 50 for i in range(2000))
    assert got["percent_share_at_50"] == round(100 * below_50 / 2000, 2)
    assert 0 <= got["percent_mean_abs_error_points"] <= got["percent_max_abs_error_points"]
    assert got["percent_max_abs_error_points"] < 5, got  # a hash, not a skewed split


@pytest.mark.processes
@pytest.mark.exclusive  # a 5 s bound on real processes (tests/harness/groups.py)
def test_rollback_reaches_every_ledger_within_5_s() -> None:
    got = run_rollback(samples=2, load_interval=0.05)
    assert got["rollback_samples"] == 2
    assert 0 < got["rollback_ms_p50"] <= got["rollback_ms_max"] < 5000, got
    assert got["rollback_load_commands"] > 0, "the other DCs loaded the ledger meanwhile"
