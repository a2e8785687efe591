"""Shared test settings.

Hypothesis profiles: ``default`` for ``make test`` (fast, CI), ``long`` for
``make chaos`` (>= 10,000 examples per property, as the issues require).
Select with HYPOTHESIS_PROFILE.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile("default", max_examples=200, deadline=None)
settings.register_profile(
    "long", max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
