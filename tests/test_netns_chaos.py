"""``make netns-chaos`` (bench.netns_chaos): the checker's verdicts on made-up
observations, the seeded schedule, and a smoke of one seed on real namespaces and real
node processes (the 100 seeds run in ``make chaos``)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from bench.netns import netns_missing
from bench.netns_chaos import (
    FAULTS,
    NAMES,
    WAN_FAULTS,
    contradictions,
    copies_violation,
    ledger_disagreement,
    make_schedule,
    parse_seeds,
    run_seed,
    still_migrating,
    undecided,
)
from bench.netns_wan import LATENCY_MS, view
from federation.cli.keys import init_federation
from tests.harness.processes import NodeProcesses

_NETNS = netns_missing()
_SEED_1_BEFORE_WAN = [("disk-full", "dc1"), ("kill9", "dc4"), ("link-down", "dc4"),
                      ("kill9", "dc1")]


def test_commit_and_abort_of_one_migration_is_a_contradiction() -> None:
    seen = {"m1": {"dc1": "committed", "dc2": "committed", "dc3": "prepared"},
            "m2": {"dc1": "aborted", "dc2": "committed"}}
    assert contradictions(seen) == [
        "migration m2 both committed and aborted: {'dc1': 'aborted', 'dc2': 'committed'}"]
    assert undecided(seen, ("dc1", "dc2", "dc3")) == [
        "migration m1 not decided everywhere: "
        "{'dc1': 'committed', 'dc2': 'committed', 'dc3': 'prepared'}",
        "migration m2 not decided everywhere: {'dc1': 'aborted', 'dc2': 'committed'}"]
    assert undecided({"m3": {"dc1": "aborted"}}, ("dc1", "dc2")) != []
    assert undecided({"m3": {"dc1": "aborted", "dc2": "aborted"}}, ("dc1", "dc2")) == []


def _status(height: int, *vms: tuple[str, str, int]) -> dict[str, object]:
    return {"ledger": {"height": height},
            "vms": [{"name": n, "owner": o, "epoch": e, "migrating": None} for n, o, e in vms]}


def test_ledgers_agree_only_at_one_height_with_the_same_records() -> None:
    same = {dc: _status(9, ("a", "dc1", 3)) for dc in ("dc1", "dc2")}
    assert ledger_disagreement(same) is None
    behind = {**same, "dc3": _status(8, ("a", "dc1", 3))}
    assert "heights differ" in (ledger_disagreement(behind) or "")
    other = {**same, "dc3": _status(9, ("a", "dc2", 4))}
    assert "VM records differ" in (ledger_disagreement(other) or "")


def test_a_vm_still_migrating_after_the_heal_is_named() -> None:
    docs = {"dc1": _status(9, ("a", "dc1", 3)), "dc2": _status(9, ("a", "dc1", 3))}
    assert still_migrating(docs) == []
    docs["dc2"]["vms"][0]["migrating"] = "a-dc1-dc3-1"  # type: ignore[index]
    assert still_migrating(docs) == ["a (migration a-dc1-dc3-1 at dc2)"]


def test_one_running_copy_at_the_owner() -> None:
    assert copies_violation("a", "dc2", {"dc1": "retired", "dc2": "running"}) is None
    assert copies_violation("a", "dc2", {"dc1": "running", "dc2": "running"}) == \
        "a: running at ['dc1', 'dc2'], the ledger's owner is dc2"
    assert copies_violation("a", "dc2", {"dc1": "running", "dc2": None}) is not None
    assert copies_violation("a", "dc2", {"dc1": None, "dc2": "stopped"}) is not None


def test_the_schedule_is_the_seeds_and_covers_every_fault() -> None:
    assert make_schedule(random.Random(3), 30) == make_schedule(random.Random(3), 30)
    assert make_schedule(random.Random(3), 30) != make_schedule(random.Random(4), 30)
    kinds = {k for s in range(20) for _, k, _, _ in make_schedule(random.Random(s), 30)}
    assert kinds == set(FAULTS)
    kinds = {k for s in range(20)
             for _, k, _, _ in make_schedule(random.Random(s), 30, WAN_FAULTS)}
    assert kinds == set(WAN_FAULTS)
    assert {dc for _, _, dc, _ in make_schedule(random.Random(1), 300)} == set(NAMES)
    assert parse_seeds("3-5") == [3, 4, 5] and parse_seeds("7,9") == [7, 9]
    with pytest.raises(SystemExit, match="--seeds"):
        parse_seeds("5-3")


@pytest.mark.skipif(_NETNS is not None, reason=f"needs network namespaces: {_NETNS}")
@pytest.mark.timeout(240)
def test_smoke_one_seed_on_namespaced_nodes(tmp_path: Path) -> None:
    """Seed 2 for 10 s of faults and migrations (image VMs, no guest): the checker's
    verdict holds, migrations happened, and nothing is left behind."""
    result = run_seed(2, tmp_path, 10.0, "wan", "never", keep=False)
    assert result["ok"], (result.get("error"), result.get("faults"), result["replay"])
    assert result["migrations"] >= 1 and result["faults"]
    assert not (tmp_path / "seed-2").exists()


def test_the_default_schedule_is_the_one_of_before_wan() -> None:
    """``--wan`` adds a fault of its own; the default runs (seeds 1-100 of ``make
    netns-chaos``) keep the schedules they had: seed 1's first faults, as drawn at 77d346f."""
    assert [(k, dc) for _, k, dc, _ in make_schedule(random.Random(1), 30)][:4] == \
        _SEED_1_BEFORE_WAN


@pytest.mark.skipif(_NETNS is not None, reason=f"needs network namespaces: {_NETNS}")
@pytest.mark.timeout(300)
@pytest.mark.slow
def test_smoke_one_wan_seed_through_delay_relays(tmp_path: Path) -> None:
    """Seed 2 with ``--wan`` for 10 s: the checker's verdict holds, and dc1's round-trip
    estimate of dc4 (a relay of 112 ms each way, bench/netns_wan.py) is at least the
    relays' 224 ms: the nodes' links go through them."""
    result = run_seed(2, tmp_path, 10.0, "wan", "never", keep=False, wan=True)
    assert result["ok"], (result.get("error"), result.get("faults"), result["replay"])
    assert result["migrations"] >= 1 and result["replay"].endswith(" --wan")
    rtt = result["rtt_ms"]["dc1"]["dc4"]
    assert rtt is not None and rtt >= 2 * LATENCY_MS[("dc1", "dc4")], result["rtt_ms"]
    assert not (tmp_path / "seed-2").exists()


def test_a_restarted_node_runs_its_view_again(tmp_path: Path) -> None:
    """``--wan`` gives each node a view of the federation file (its peers behind its
    relay); the faults' restarts (``nodes.start(dc)``) must start it with that view, not
    the shared file, or the restarted DC would bypass its relay unnoticed."""
    cfg = init_federation(tmp_path / "fed", 4)
    seen = tmp_path / "argv"
    record = ["sh", "-c", f'echo "$@" >> {seen}', "sh"]  # a prefix that only records
    views = {"dc2": view(cfg, "dc2")}
    nodes = NodeProcesses(cfg, tmp_path, prefixes={"dc1": record, "dc2": record},
                          views=views)
    for dc in ("dc2", "dc2", "dc1"):
        nodes.start(dc)
        nodes.procs[dc].wait()
    lines = seen.read_text().splitlines()
    assert [line.split("--config ")[1].split()[0] for line in lines] == \
        [str(views["dc2"]), str(views["dc2"]), str(cfg)]
