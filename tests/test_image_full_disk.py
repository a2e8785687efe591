"""A writable image on a full file system: a write fails with ENOSPC, the process lives.

A store into a hole of a shared file mapping on a full file system raises SIGBUS, which
ends the process (netns-chaos seed 75: a migration's source filled its tmpfs while
writing its shadow through the mapping, and the node died with signal 7). Writers over a
file write through a descriptor instead (mesh.hde.image.ImageWriter). Each case runs in
a child process on a small tmpfs, so the old behaviour fails the test instead of ending
pytest."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.tmpfs import mounted_tmpfs

CHILD = r"""
import errno, sys
from pathlib import Path
from mesh.hde.image import PAGE_SIZE, create_image
from federation.vms.image_backend import map_writable
kind, path = sys.argv[1], Path(sys.argv[2])
pages = 1024  # 4 MiB of sparse file on a 256 KiB file system
w = create_image(path, pages) if kind == "create" else map_writable(path, pages, "t")
written = 0
try:
    for p in range(pages):
        if p % 3 == 0:
            w.fill(p, 1, 7)
        elif p % 3 == 1:
            w.write(p, bytes([p % 251]) * PAGE_SIZE)
        else:
            w.copy(w, p - 1, p, 1)
        written += 1
except OSError as exc:
    assert exc.errno == errno.ENOSPC, exc
    assert 0 < written < pages
    # what was written before the disk filled reads back through the mapping
    assert bytes(w.view(1)) == bytes([1]) * PAGE_SIZE
    print("ENOSPC after", written)
    sys.exit(0)
sys.exit("the file system never filled")
"""


@pytest.fixture
def small_tmpfs() -> Iterator[Path]:
    with mounted_tmpfs("256k") as d:
        yield d


@pytest.mark.parametrize("kind", ["create", "map_writable"])
def test_a_full_disk_is_enospc_not_sigbus(small_tmpfs: Path, kind: str) -> None:
    r = subprocess.run([sys.executable, "-c", CHILD, kind, str(small_tmpfs / "img")],
                       capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr[-2000:])
    assert "ENOSPC after" in r.stdout


def test_an_image_closed_under_a_reader_raises_image_error() -> None:
    """A migration ended (its incoming images closed) while a worker thread indexed them:
    the read fails as an ImageError, which a round takes as its failure, not a bare
    ValueError that ended the node (the QEMU acceptance, seed 1717, migration 6: a
    cancel while the target indexed its incoming images)."""
    from mesh.hde.image import ImageError, ImageWriter

    w = ImageWriter(bytearray(4 * 4096), "incoming")
    w.close()
    with pytest.raises(ImageError, match="closed"):
        w.view(0)


def test_closing_an_image_a_reader_still_views_does_not_raise(tmp_path: Path) -> None:
    """The incoming images closed (a cancel) while a worker thread holds a view of one:
    the close does not raise (it ended the node), the reader's view stays valid, and the
    image itself reads as closed."""
    from mesh.hde.image import ImageError, create_image

    w = create_image(tmp_path / "incoming.img", 4)
    w.write(1, b"\x05" * 4096)
    held = w.view(1)  # the reader's slice
    w.close()
    assert bytes(held[:4]) == b"\x05\x05\x05\x05"
    with pytest.raises(ImageError):
        w.view(0)
    held.release()
