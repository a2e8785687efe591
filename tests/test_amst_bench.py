"""``dwcp bench amst`` end to end on a small real image: two processes, the receiver's
copy checked by SHA-256 inside the benchmark, every figure present."""

from __future__ import annotations

import pytest

from bench.amst import _file_tree_image, level_for_link, measure_loopback


@pytest.mark.processes
@pytest.mark.timeout(120)
def test_loopback_figures_on_a_small_file_tree_image() -> None:
    image = memoryview(_file_tree_image(8 * 1024 * 1024))
    result = measure_loopback(image, level=1)
    assert 3 <= result["chunks"] <= 8  # 1 to 3 MiB of image per chunk
    assert result["logical_MBps"] > 0 and result["raw_single_stream_MBps"] > 0
    assert result["compression_ratio"] > 1.2  # real files compress; random bytes would not
    assert 1 <= result["streams"] <= 4  # datacenter bounds
    assert result["max_in_flight_bytes"] <= result["window_bytes"]
    assert result["cpu_bound_MBps_2cores"] > 0
    assert 0 < result["nonzero_MBps"] <= result["logical_MBps"]


def test_slow_links_get_higher_zstd_levels() -> None:
    image = memoryview(_file_tree_image(8 * 1024 * 1024))
    assert level_for_link(image, 1e12) == 1  # nothing compresses 4x faster than 1 TB/s
    assert level_for_link(image, 1e3) > 1  # a slow link: spend CPU to send less
