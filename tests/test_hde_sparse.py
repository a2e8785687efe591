"""A sparse image file: its holes are found with SEEK_DATA/SEEK_HOLE and indexed as zero
blocks without being read, and the index equals the one of the same bytes in memory."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.hde.image import PAGE_SIZE, Image, file_data_runs, open_image
from mesh.hde.index import BLOCK_PAGES, build_index

#: Text of this repository: real bytes for the written regions.
SOURCE = Path(__file__).read_bytes()


def _content(n: int, seed: int) -> bytes:
    rotated = SOURCE[seed % len(SOURCE):] + SOURCE[: seed % len(SOURCE)]
    return (rotated * (n // len(SOURCE) + 1))[:n]


def _sparse(path: Path, pages: int, writes: list[tuple[int, int]]) -> None:
    with open(path, "wb") as f:
        f.truncate(pages * PAGE_SIZE)
        for i, (page, count) in enumerate(writes):
            f.seek(page * PAGE_SIZE)
            f.write(_content(count * PAGE_SIZE, i * 7919))


def test_data_runs_name_the_written_regions_only(tmp_path: Path) -> None:
    path = tmp_path / "sparse.img"
    pages = 64 * BLOCK_PAGES
    _sparse(path, pages, [(3 * BLOCK_PAGES, 4), (40 * BLOCK_PAGES + 17, 300)])
    img = open_image(path)
    try:
        runs = img.data_runs(0, pages)
        covered = {p for s, c in runs for p in range(s, s + c)}
        written = set(range(3 * BLOCK_PAGES, 3 * BLOCK_PAGES + 4)) | set(
            range(40 * BLOCK_PAGES + 17, 40 * BLOCK_PAGES + 317))
        assert written <= covered
        # the file system allocates in blocks of at most a few pages: most of the image
        # is holes (a file system without SEEK_HOLE support would report all of it)
        assert len(covered) < pages // 8
        # a range inside a hole has no runs
        assert img.data_runs(10 * BLOCK_PAGES, BLOCK_PAGES) == []
    finally:
        img.close()


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20 * BLOCK_PAGES - 1), st.integers(1, 600)),
                max_size=6))
def test_sparse_index_equals_the_index_of_the_same_bytes(
        tmp_path_factory: object, writes: list[tuple[int, int]]) -> None:
    pages = 20 * BLOCK_PAGES + 37  # a partial last block
    directory = tmp_path_factory.mktemp("sparse")  # type: ignore[attr-defined]
    path = directory / "img"
    _sparse(path, pages, [(p, min(c, pages - p)) for p, c in writes])
    img = open_image(path)
    try:
        sparse = build_index(img)
        plain = build_index(Image(path.read_bytes()))
    finally:
        img.close()
    assert sparse.root == plain.root
    assert sparse.fps == plain.fps


def test_file_data_runs_past_the_last_data(tmp_path: Path) -> None:
    path = tmp_path / "tail.img"
    _sparse(path, 4 * BLOCK_PAGES, [(0, 1)])
    fd = os.open(path, os.O_RDONLY)
    try:
        assert file_data_runs(fd, BLOCK_PAGES, 3 * BLOCK_PAGES) == []
        assert file_data_runs(fd, 0, 4 * BLOCK_PAGES)[0][0] == 0
    finally:
        os.close(fd)
