"""Shared test settings.

Hypothesis profiles: ``default`` for ``make test`` (fast, CI), ``long`` for
``make chaos`` (>= 10,000 examples per property, as the issues require).
Select with HYPOTHESIS_PROFILE.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from federation.api.client import CONFIG_ENV, KEY_ENV
from tests.harness.groups import EXCLUSIVE, exclusive_reason
from tests.harness.trio_deadline import give_trio_tests_deadlines

settings.register_profile("default", max_examples=200, deadline=None)
settings.register_profile(
    "long", max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.hookimpl(tryfirst=True)  # before xdist reads the group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``make test`` runs ``-n 2 --dist loadgroup``) the tests that
    boot QEMU, build network namespaces or kill -9 real replicas share one group and so
    never run at the same time (tests/harness/groups.py). Harmless without xdist.

    Every trio test gets a wall-clock deadline a little before its pytest-timeout, so a
    slow test ends its trio run cleanly instead of being torn out of it by the alarm
    (tests/harness/trio_deadline.py)."""
    for item in items:
        marks = {m.name for m in item.iter_markers()}
        if exclusive_reason(getattr(item, "module", None), marks) is not None:
            item.add_marker(pytest.mark.xdist_group(EXCLUSIVE))
    give_trio_tests_deadlines(items)


@pytest.fixture(autouse=True)
def _operator_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """``make_federation`` (tests/harness/node.py) exports the federation file and the
    admin's key for the ``dwcp`` processes a test runs (``$DWCP_CONFIG``,
    ``$DWCP_OPERATOR_KEY``); whatever a test sets is undone after it."""
    monkeypatch.setenv(CONFIG_ENV, "")
    monkeypatch.setenv(KEY_ENV, "")
