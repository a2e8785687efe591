"""Give the C heap's free memory back to the kernel once a migration has ended here.

A migration moves its VM's pages through large short-lived buffers (image reads, zstd
and sealing output), allocated by the VM worker's and the data plane's threads. glibc's
malloc keeps what they free in its arenas (one per thread that allocated, up to eight
per core) and raises its mmap threshold after the first large free, so later large
buffers come from those arenas too: the process's RSS ratchets up by the free memory
malloc holds, not by live objects. ``dwcp bench soak`` measured it (docs/BENCHMARKS.md,
"Soak"): malloc's own count of bytes in use stayed at 12-30 MiB while its free bytes
grew to ~100 MiB and the RSS with them. ``malloc_trim(0)`` returns the free pages of
every arena to the kernel; the node calls it when a migration's last VM step is done
(a few milliseconds, in the VM worker's thread). Without glibc (musl, another libc)
there is nothing to call and nothing is done.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

__all__ = ["trim_heap", "TRIM_AVAILABLE"]


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


_TRIM = _malloc_trim()
TRIM_AVAILABLE = _TRIM is not None


def trim_heap() -> bool:
    """Return the heap's free pages to the kernel; True if any were (glibc's answer)."""
    return _TRIM is not None and bool(_TRIM(0))
