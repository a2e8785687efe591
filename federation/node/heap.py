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

The trim alone left the RSS of ``dwcp bench soak``'s nodes at 2-8 times what they use:
between two trims glibc's free bytes grew to 70-120 MiB a node while its bytes in use
stayed at 13-17 MiB (``heap_report``'s ``mallinfo2``, one minute into the soak). glibc
raises its mmap threshold each time a buffer it had mapped is freed (up to 32 MiB), so
after the first migration every buffer of a round (image reads, zstd and sealing
output, 1-4 MiB each) comes from an arena — one per thread that allocates, up to eight
per core — and stays there once freed. :func:`tune_heap` (``dwcp node`` calls it at
start) fixes the threshold at glibc's initial 128 KiB: a buffer that large is its own
mapping and goes back to the kernel when freed, whichever thread freed it. A mapping
costs a system call and its page faults, a few microseconds per MiB buffer.
``DWCP_MALLOC_TUNE=0`` leaves glibc's defaults (to compare, or for another allocator).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

__all__ = ["trim_heap", "tune_heap", "TRIM_AVAILABLE", "MMAP_THRESHOLD", "TUNE_ENV"]

#: glibc's initial mmap threshold (malloc/malloc.c DEFAULT_MMAP_THRESHOLD_MIN), kept fixed
MMAP_THRESHOLD = 128 * 1024
#: mallopt's parameter number for it (malloc.h M_MMAP_THRESHOLD)
_M_MMAP_THRESHOLD = -3
TUNE_ENV = "DWCP_MALLOC_TUNE"


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


def _mallopt() -> Callable[[int, int], int] | None:
    try:
        fn = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_TRIM = _malloc_trim()
_MALLOPT = _mallopt()
TRIM_AVAILABLE = _TRIM is not None


def trim_heap() -> bool:
    """Return the heap's free pages to the kernel; True if any were (glibc's answer)."""
    return _TRIM is not None and bool(_TRIM(0))


def tune_heap(environ: dict[str, str] | None = None) -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` (see the module's text);
    True if it was set. Not done without glibc, or when ``$DWCP_MALLOC_TUNE`` is 0."""
    env = os.environ if environ is None else environ
    if env.get(TUNE_ENV, "1").strip() == "0" or _MALLOPT is None:
        return False
    return bool(_MALLOPT(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
