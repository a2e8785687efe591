"""The Prometheus alert rules shipped in docs/deploy/prometheus/alerts.yml (the top level
of the repository is fixed, so deploy/ lives under docs/).

- ``promtool check rules`` accepts the file and ``promtool test rules`` runs its unit
  tests (alerts_test.yml: each alert fires when it should, and not before); skipped, saying
  why, where promtool is missing (``make alerts-check`` installs Debian's prometheus);
- every ``dwcp_*`` metric an alert reads is one a node exports (federation/node/), so a
  renamed metric cannot silently disable an alert. This part needs no promtool.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "docs" / "deploy" / "prometheus"


def _promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool is not installed (Debian package prometheus; "
                    "`make alerts-check` installs it)")
    return tool


def test_promtool_checks_the_rules() -> None:
    done = subprocess.run([_promtool(), "check", "rules", "alerts.yml"], cwd=RULES,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    done = subprocess.run([_promtool(), "test", "rules", "alerts_test.yml"], cwd=RULES,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_metric_an_alert_reads_is_exported() -> None:
    source = "\n".join(p.read_text(encoding="utf-8")
                        for p in sorted((ROOT / "federation" / "node").glob("*.py")))
    families = re.findall(r'(Counter|Gauge)MetricFamily\(\s*"(dwcp_[a-z0-9_]+)"', source)
    exported = {f"{name}_total" if kind == "Counter" else name for kind, name in families}
    rules = (RULES / "alerts.yml").read_text(encoding="utf-8")
    exprs = "\n".join(re.findall(r"expr: (?:>-\n)?((?:.+\n)+?)\s+(?:for|labels):", rules))
    read = set(re.findall(r"\bdwcp_[a-z0-9_]+", exprs))
    assert read, "found no dwcp_ metric in the alerts' expressions"
    unknown = sorted(read - exported)
    assert not unknown, f"alerts.yml reads metrics no node exports: {', '.join(unknown)}"
