"""State transfer of a fleet-sized ledger between real replica processes on loopback
(bench.consensus's node: websocket links, secure channels, SQLite with
``synchronous=FULL``): three replicas start from a stable checkpoint of a ledger of
100,000 VMs (a snapshot of 16 MB, twice what one frame may carry), logged in their
stores; the fourth starts empty and must reach the same ledger by fetching the
snapshot's manifest and chunks (bench.fleet_ledger.chunked_transfer_figures, which
checks the ledger's digest and the checkpoint the fourth logged). The fourth rebuilds
the ledger in a worker thread (``PbftConfig.offload_restore``): its event loop, watched
every 10 ms from its links up to its catching up, never stalls for a link's keepalive
(on the code before, the restore ran on the loop: 16 s at 100,000 VMs under load, and
its links were declared dead)."""

from __future__ import annotations

import pytest

from bench.fleet_ledger import chunked_transfer_figures
from consensus.snapshot_chunks import CHUNK
from mesh import wire


def _check(out: dict[str, object], vms: int) -> None:
    assert out["chunked_vms"] == vms and out["chunked_state_transfers"] == 1
    assert out["chunked_manifests"] == 1 and out["chunked_bad_replies"] == 0
    size = out["chunked_snapshot_bytes"]
    assert isinstance(size, int) and size > CHUNK
    assert out["chunked_chunks_served"] == out["chunked_chunks"] == -(-size // CHUNK)
    assert isinstance(out["chunked_transfer_bytes"], int)
    assert out["chunked_transfer_bytes"] >= size
    assert out["chunked_restores_offloaded"] == 1
    assert out["chunked_peer_downs"] == 0  # no link declared dead meanwhile
    ticks, stall = out["chunked_loop_ticks"], out["chunked_loop_stall_max_ms"]
    assert isinstance(ticks, int) and ticks > 0 and isinstance(stall, float)
    # the keepalive is 5 s; one second leaves room for a loaded machine's scheduling
    # (85-300 ms measured under load at 100,000 VMs; the restore alone took 6-17 s)
    assert stall < 1000.0, out


@pytest.mark.slow
def test_a_100000_vm_ledger_moves_by_state_transfer_between_processes() -> None:
    out = chunked_transfer_figures(100_000, timeout=300.0)
    _check(out, 100_000)
    assert out["chunked_snapshot_bytes"] > wire.ABSOLUTE_MAX_SIZE  # past one frame


@pytest.mark.slow
def test_a_chunked_ledger_moves_by_state_transfer_between_processes() -> None:
    # 8,000 VMs: 1.3 MB, two chunks (18 s under load: slow too; make test's smoke of the
    # protocol is the simulator's, tests/test_snapshot_chunks.py)
    out = chunked_transfer_figures(8_000, timeout=90.0)
    _check(out, 8_000)
