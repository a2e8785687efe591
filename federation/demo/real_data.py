"""Real VM state where the corpus (``make corpus``) is absent: this process's own memory.

Demos, tests and benchmarks move real data, never random bytes. Process memory is
the nearest thing to a guest's RAM that any machine has: code pages, heaps full of
objects, zero pages, duplicates. Regions are read through ``/proc/self/mem``; a
mapping the kernel will not let us read (a guard page, ``[vvar]``) reads as zeros.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["PAGE", "memory_regions", "snapshot_memory", "write_process_memory"]

PAGE = 4096


def memory_regions(cap: int) -> list[tuple[int, int]]:
    """Readable mappings of this process, in address order, up to ``cap`` bytes in all."""
    out, total = [], 0
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if not parts[1].startswith("r") or (len(parts) > 5 and parts[5] == "[vsyscall]"):
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            n = min(hi - lo, cap - total)
            if n <= 0:
                break
            out.append((lo, lo + n))
            total += n
    return out


def snapshot_memory(regions: list[tuple[int, int]]) -> bytearray:
    """The bytes of ``regions`` now; a region that cannot be read reads as zeros."""
    buf = bytearray(sum(hi - lo for lo, hi in regions))
    mv = memoryview(buf)
    off = 0
    with open("/proc/self/mem", "rb", buffering=0) as mem:
        for lo, hi in regions:
            try:
                mem.seek(lo)
                mem.readinto(mv[off : off + hi - lo])
            except OSError:
                pass  # unreadable (PROT_NONE guard, [vvar]): the zeros stay
            off += hi - lo
    return buf


def write_process_memory(path: Path, limit: int) -> Path:
    """Write up to ``limit`` bytes of this process's memory to ``path``, whole pages only."""
    data = snapshot_memory(memory_regions(limit))
    with open(path, "wb") as f:
        f.write(memoryview(data)[: len(data) // PAGE * PAGE])
    return path
