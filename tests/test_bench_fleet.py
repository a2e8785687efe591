"""``dwcp bench fleet``'s smoke (the full run is ``make bench``): four real nodes with 50
image VMs and 5 concurrent migrations checked to their outcome; a ledger's snapshot; a
4 GiB sparse image indexed without a Python object per page; and the agreement check
itself, which must catch a VM at two places or ledgers that differ."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.fleet_image import index_figures
from bench.fleet_ledger import snapshot_figures
from bench.fleet_nodes import check_agreement, run_nodes


def _status(height: int, vms: list[tuple[str, str, int, str | None]]) -> dict[str, Any]:
    return {"ledger": {"height": height},
            "vms": [{"name": n, "owner": o, "epoch": e, "here": h} for n, o, e, h in vms]}


def test_agreement_check_finds_a_vm_at_two_places_and_differing_ledgers() -> None:
    ok = {"dc1": _status(9, [("a", "dc1", 0, "stopped"), ("b", "dc2", 1, "retired")]),
          "dc2": _status(9, [("a", "dc1", 0, None), ("b", "dc2", 1, "running")])}
    assert check_agreement(ok) == []
    twice = {"dc1": _status(9, [("a", "dc1", 0, "stopped")]),
             "dc2": _status(9, [("a", "dc1", 0, "running")])}
    assert check_agreement(twice) == ["a is held at ['dc1', 'dc2'], its owner is dc1"]
    differ = {"dc1": _status(9, [("a", "dc1", 0, "stopped")]),
              "dc2": _status(8, [("a", "dc2", 1, None)])}
    found = check_agreement(differ)
    assert any("heights differ" in p for p in found)
    assert any("dc2's ledger differs on ['a']" in p for p in found)


@pytest.mark.processes
def test_fleet_smoke_on_four_nodes(tmp_path: Path) -> None:
    out = run_nodes(tmp_path, vms=50, concurrent=5)
    assert out["migrations_committed"] + out["migrations_aborted"] == 5
    assert out["migrations_committed"] >= 1, out
    assert out["api_errors"] == []
    assert out["exit_codes"] == {"dc1": 0, "dc2": 0, "dc3": 0, "dc4": 0}
    assert all(r > 0 for r in out["node_rss_mib_max"].values())


def test_ledger_snapshot_restores_to_the_same_bytes() -> None:
    out = snapshot_figures(300)
    assert out["ledger_vms"] == 300 and out["snapshot_bytes"] > 300 * 50


def test_sparse_image_index_holds_no_object_per_page(tmp_path: Path) -> None:
    out = index_figures(tmp_path, 4)
    # 4 GiB is 1,048,576 pages: an object per page would add a million
    assert out["python_objects_added"] < 10_000
    # 16 bytes of fingerprint per page and the tree: about 4.03 MiB per GiB
    assert 4 << 20 <= out["index_bytes_per_gib"] < 4.2 * 2**20
    assert out["image_allocated_bytes"] < 64 << 20  # the image stayed sparse
