"""Real bytes for the tests that move or store data (never random noise: real data
compresses, dedups and deltas as a VM's pages do)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from mesh.hde.image import PAGE_SIZE

MiB = 1 << 20
#: The repository's product package whose source text makes :func:`real_pages`.
SOURCE_TREE = Path(__file__).resolve().parents[2] / "federation"


def real_pages(n_pages: int, salt: bytes = b"") -> bytes:
    """``n_pages`` whole pages of this repository's own source text (``salt`` appended to
    the text before it repeats, so two salts give two different images)."""
    text = b"".join(p.read_bytes() for p in sorted(SOURCE_TREE.rglob("*.py"))) + salt
    return (text * (n_pages * PAGE_SIZE // len(text) + 1))[: n_pages * PAGE_SIZE]


@functools.cache
def real_bytes(size: int) -> bytes:
    """``size`` bytes of the machine's shared libraries (then the Python standard
    library's sources), in a fixed order."""
    out = bytearray()
    libs = sorted(Path("/usr/lib/x86_64-linux-gnu").glob("*.so*"))
    for path in libs + sorted(Path(os.__file__).parent.rglob("*.py")):
        if path.is_file() and not path.is_symlink():
            out += path.read_bytes()
        if len(out) >= size:
            return bytes(out[:size])
    raise AssertionError(f"found only {len(out)} bytes of real data")


def chunked(data: bytes, size: int = MiB) -> list[tuple[int, bytes]]:
    """``data`` as AMST chunks: (chunk id, payload) of ``size`` bytes each."""
    return [(i, data[o : o + size]) for i, o in enumerate(range(0, len(data), size))]
