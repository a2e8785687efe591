"""bench.status_traffic counts what a seeded simulator run sent, per executed batch."""

from __future__ import annotations

from bench.status_traffic import count


def test_counts_the_normal_case_and_the_status_traffic() -> None:
    got = count(nodes=4, latency=0.2, per_node=6, seed=3)
    assert got["requests"] > 0 and got["batches"] > 0
    per = got["by_type_per_batch"]
    # every executed batch had its PRE-PREPARE to 3 peers, and COMMITs from every replica
    assert per["PrePrepare"] >= 3.0 and per["Commit"] >= 9.0, per
    assert per["Status"] > 0, per
    assert abs(sum(per.values()) - got["messages_per_batch"]) < 0.1 * len(per) + 0.1
