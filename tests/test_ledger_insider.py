"""The ``ledger-insider`` scenario: a DC with a valid key submits ledger commands it may
not, and every correct replica refuses each one (issue 15 item 3)."""

from __future__ import annotations

import pytest

from consensus.ledger import Ledger, LedgerResult
from sim.scenarios import run_scenario


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_attack_is_refused_by_every_replica(seed: int) -> None:
    result = run_scenario("ledger-insider", seed)
    assert result.ok, result.violations
    insider = result.metrics["insider"]
    total = sum(insider["attacks"].values())
    assert total == 20
    assert insider["refused_by_replica"] == {m: total for m in ("n00", "n01", "n02", "n03")}


def test_the_oracle_catches_a_ledger_that_takes_what_it_should_refuse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Ledger, "_refuse",
                        lambda self, kind, error, epoch=0: LedgerResult(True, "", epoch))
    result = run_scenario("ledger-insider", 1)
    assert not result.ok
    assert any("and took it" in v.message for v in result.violations), result.violations
