"""``dwcp sim ... --federation FILE``: a scenario run with an operator's DCs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from federation.cli.keys import init_federation
from sim.federation_profile import ProfileError, load_profile
from sim.geo import REGIONS
from sim.scenarios import run_scenario


def _federation(tmp_path: Path, count: int = 7, regions: list[str] | None = None,
                modes: str = "") -> Path:
    path = init_federation(tmp_path, count, base_port=21000)
    text = path.read_text()
    for i, region in enumerate(regions or []):
        marker = f'name = "dc{i + 1}"\n'
        assert marker in text
        text = text.replace(marker, marker + f'region = "{region}"\n')
    if modes:
        text = text.replace("[[dc]]", modes + "\n[[dc]]", 1)
    path.write_text(text)
    return path


def test_profile_takes_names_regions_and_modes(tmp_path: Path) -> None:
    path = _federation(tmp_path, 4, regions=["japaneast", "West Europe"],
                       modes="[modes]\ninternet_rtt_ms = 70.0\n")
    profile = load_profile(str(path))
    assert profile.names == ("dc1", "dc2", "dc3", "dc4")
    # named regions are matched ignoring case and spaces; the rest are placed in order
    assert profile.regions == {"dc1": "Japan East", "dc2": "West Europe",
                               "dc3": REGIONS[2], "dc4": REGIONS[3]}
    assert profile.modes.internet_rtt_ms == 70.0


def test_unknown_region_names_the_dc(tmp_path: Path) -> None:
    path = _federation(tmp_path, 4, regions=["East US", "Atlantis"])
    with pytest.raises(ProfileError, match=r"dc\[1\]\.region: 'Atlantis' \(dc2\)"):
        load_profile(str(path))


def test_run_uses_the_federation_and_is_deterministic(tmp_path: Path) -> None:
    path = _federation(tmp_path)
    lines: list[str] = []
    first = run_scenario("migration-chaos", 5, federation=str(path), trace=lines.append)
    again = run_scenario("migration-chaos", 5, federation=str(path))
    assert first.ok, first.violations
    assert first.nodes == 7 and first.trace_hash == again.trace_hash
    text = "\n".join(lines)
    assert "dc7" in text and "n00" not in text
    assert first.replay() == f"dwcp sim run migration-chaos --seed 5 --federation {path}"
    # the file's placement is what the run simulates: other regions, another run
    far = _federation(tmp_path / "far", regions=["Brazil South", "Australia East"] * 3
                      + ["East Asia"])
    assert run_scenario("migration-chaos", 5, federation=str(far)).trace_hash \
        != first.trace_hash


def test_cli_refuses_a_contradicting_node_count(tmp_path: Path) -> None:
    path = _federation(tmp_path)
    done = subprocess.run([sys.executable, "-m", "federation", "sim", "run", "migration-chaos",
                           "--seed", "1", "--nodes", "10", "--federation", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--nodes 10 contradicts" in done.stderr and "7 DCs" in done.stderr
