"""The node's heap report (federation.node.heap_report): what ``kill -USR2`` logs to say
what a node's memory is made of and what grew since the last report."""

from __future__ import annotations

import tracemalloc

import pytest

from federation.node.heap_report import (
    ENV,
    HeapReporter,
    deep_size,
    malloc_arenas,
    sampled_size,
    smaps_rollup,
    tracemalloc_frames,
)


class Grown:
    pass


def test_frames_come_from_the_environment_and_bad_ones_name_the_variable() -> None:
    assert tracemalloc_frames({}) == 0
    assert tracemalloc_frames({ENV: " 12 "}) == 12
    for bad in ("x", "-1", "101", "1.5"):
        with pytest.raises(ValueError, match=ENV):
            tracemalloc_frames({ENV: bad})


def test_a_report_shows_the_types_and_tracebacks_that_grew() -> None:
    was_tracing = tracemalloc.is_tracing()
    reporter = HeapReporter(frames=4)
    try:
        first = reporter.report()
        assert first["n"] == 0 and first["objects"]["total"] > 1000
        kept = [Grown() for _ in range(3000)]
        blob = [bytearray(1 << 16) for _ in range(32)]  # 2 MiB from this line
        second = reporter.report()
        assert second["n"] == 1
        grown = {name: d for name, _, d in second["objects"]["grown"]}
        assert grown.get("Grown", 0) >= 3000, second["objects"]
        top = second["traced"]["grown"][0]
        assert top["grew"] >= 2 << 20 and "test_node_heap_report.py" in top["at"][-1], top
        del kept, blob
    finally:
        if not was_tracing:
            tracemalloc.stop()


def test_without_frames_there_is_no_traced_part() -> None:
    if tracemalloc.is_tracing():
        pytest.skip("tracemalloc is already on in this process")
    doc = HeapReporter().report()
    assert "traced" not in doc and not tracemalloc.is_tracing()


def test_smaps_rollup_reads_the_kernels_figures(tmp_path: object) -> None:
    figures = smaps_rollup()
    if not figures:
        pytest.skip("no /proc/self/smaps_rollup (Linux 4.14+) here")
    assert figures["Rss"] > 1000 and "Anonymous" in figures
    assert smaps_rollup("/nonexistent/smaps_rollup") == {}


def test_the_arenas_of_glibc_are_listed() -> None:
    arenas = malloc_arenas()
    if not arenas:
        pytest.skip("no glibc malloc_info in this libc")
    assert arenas[0][0] > 0 and all(0 <= free <= size for size, free in arenas)
    doc = HeapReporter().report()
    assert doc["malloc"]["arenas"] and doc["malloc"]["in_use"] > 0


def test_deep_size_counts_what_the_entries_hold_once_and_not_their_classes() -> None:
    blobs = [bytes([i]) * 10_000 for i in range(100)]
    cache = {i: (blob, Grown()) for i, blob in enumerate(blobs)}
    size = deep_size([cache])
    assert 1_000_000 < size < 1_100_000, size  # 100 x 10 kB, the tuples and the dict
    # the same blobs twice: counted once; the class Grown and its module not at all
    assert deep_size([cache, blobs]) < size + 2000
    assert deep_size([Grown]) == 0
    # a limit on the objects visited makes it a lower bound
    assert deep_size([cache], limit=10) < 200_000
    assert "caches" not in HeapReporter().report()
    assert HeapReporter().report({"x": [1, 2, 3]})["caches"] == {"x": [1, 2, 3]}


def test_sampled_size_scales_the_newest_entries_to_all() -> None:
    cache = {i: bytes(1000) + bytes([i % 256]) for i in range(5000)}
    full = deep_size([cache])
    assert abs(sampled_size([cache]) - full) < full * 0.02  # entries alike: within 2 %
    ring = [(i, bytes(100) + bytes([i % 256])) for i in range(3000)]
    assert abs(sampled_size([ring], sample=100) - deep_size([ring])) < deep_size([ring]) * 0.05
    assert sampled_size([{}, []]) == deep_size([{}]) + deep_size([[]])
    # a mapping and its index in the same order, holding the same records: once each
    index = list(cache.values())
    both = sampled_size([cache, index])
    assert abs(both - deep_size([cache, index])) < deep_size([cache, index]) * 0.02
    assert both < sampled_size([cache]) + sampled_size([index]) - 4_000_000
