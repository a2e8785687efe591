"""bench/mesh_bytes.py: the byte counter sees every transmitted byte and changes no run."""

from __future__ import annotations

import json

import pytest

from bench import mesh_bytes
from mesh.gossip.control_msgs import Gossip, Sync
from sim.hosts.mesh_world import WARMUP
from sim.scenarios.mesh_scenarios import run_mesh


def test_counts_every_byte_after_the_warmup_and_keeps_the_trace(capsys) -> None:
    assert mesh_bytes.main(["--seed", "3", "--nodes", "4", "--crash-at", "31"]) == 0
    out = json.loads(capsys.readouterr().out)
    plain = run_mesh("crash-one", 3, 4, crash_at=31.0, faults_until=61.0)
    assert out["trace_hash"] == plain.trace_hash  # the probe changes nothing
    sent = sum(out["after_warmup_bytes"].values())
    bps = round(sent * 8 / (plain.sim_seconds - WARMUP) / 4, 1)
    assert bps == plain.metrics["control_bps_per_node"] > 0
    assert out["after_warmup_bytes"]["LinkPing"] > 0
    assert [b["t"] for b in out["buckets"]][:3] == [0.0, 5.0, 10.0]


def test_kinds_split_syncs_and_piggybacks() -> None:
    assert mesh_bytes.kind_of(Sync(True, (), (), ())) == "Sync.ask.empty"
    assert mesh_bytes.kind_of(Gossip((), ())) == "Gossip.members"


def test_bad_arguments_are_refused_by_name(capsys) -> None:
    with pytest.raises(SystemExit):
        mesh_bytes.main(["--seed", "1", "--nodes", "2"])
    assert "--nodes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mesh_bytes.main(["--seed", "1", "--bucket", "0"])
    assert "--bucket" in capsys.readouterr().err
