"""The corpus-free version of ``dwcp bench hde``: a real filesystem image and this
process's own memory, no QEMU. Figures that need the corpus must be null, with a reason."""

from __future__ import annotations

import json

from bench.hde import memory_regions, run, snapshot_memory


def test_corpus_free_bench_reports_measured_figures_and_says_what_is_missing() -> None:
    out = run(use_corpus=False, use_qemu=False, quick=True)
    json.dumps(out)  # one JSON object
    assert out["corpus"].startswith("no corpus: this process's own memory")
    assert out["ram_bytes"] > 0 and out["ram_bytes"] % 4096 == 0
    # Dedup, uniform-page elision and a level matched to 100 Mbit/s beat zstd -1 of the image.
    assert 0 < out["cold_wire_bytes"] < out["zstd1_bytes"]
    assert out["zstd3_bytes"] <= out["zstd1_bytes"]
    assert out["encode_MBps_1core"] > 0 and out["encode_MBps_2cores"] > 0
    # the cheap levels timed on both core counts, and the work every level pays
    for key in ("encode_MBps_1core_at_zstd_minus5", "encode_MBps_2cores_at_zstd_minus5",
                "encode_MBps_1core_at_zstd1", "encode_MBps_2cores_at_zstd1",
                "encode_fixed_ns_per_byte", "encode_busy_cores_2cores"):
        assert out[key] > 0, key
    assert "10 Gbit/s" in out["encode_link"]
    phases = out["encode_cpu_s_by_phase_1core_at_zstd_minus5"]
    assert set(phases) == {"index", "plan", "chunks"} and phases["chunks"] > 0
    # the picker's table gives each level's modelled rate; the chosen one is the fastest
    table = {row["level"]: row["MBps_model"] for row in out["encode_levels_measured"]}
    assert table[out["encode_level"]] == max(table.values())
    # the work figures: MB/s over non-zero pages, never above the logical figure
    assert 0 < out["encode_MBps_2cores_nonzero"] <= out["encode_MBps_2cores"]
    assert 0 < out["encode_nonzero_MB_per_cpu_s"] <= out["encode_MB_per_cpu_s"]
    # the level chosen for 100 Mbit/s sends no more than level 1 would
    assert 0 < out["cold_wire_bytes"] <= out["cold_wire_bytes_at_zstd1"]
    assert 0 <= out["zero_page_share"] <= 1 and 0 <= out["duplicate_page_share"] <= 1
    for key in ("qemu_multifd_zstd_bytes", "cold_ratio_vs_qemu", "sibling_ratio_vs_qemu",
                "warm_wire_fraction"):
        assert out[key] is None
    missing = " ".join(out["missing"])
    assert "qemu_multifd_zstd_bytes" in missing and "warm_wire_fraction" in missing
    assert "fuller_guest: not asked" in missing
    warm = out["process_memory_warm"]
    assert "NOT the t0 -> t0+60 s guest figure" in warm["what"]
    assert 0 < warm["warm_wire_fraction"] < 0.5
    fs = out["fs_image"]
    assert fs["bytes"] > 0 and 0 < fs["cold_wire_bytes"] < fs["bytes"]


def test_memory_snapshot_reads_real_pages() -> None:
    regions = memory_regions(8 << 20)
    snap = snapshot_memory(regions)
    assert len(snap) == sum(hi - lo for lo, hi in regions) > 0
    assert any(snap)  # this process's memory is not all zeros
