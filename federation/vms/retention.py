"""What a DC keeps of VMs that left it, and how much.

A *retained copy* is a RETIRED VM: the images a DC kept after the VM migrated away, the
base of a later migration back (only the pages that changed come back) and a source of
dedup for other VMs. They are worth disk, up to a budget: each DC has one
(``[storage] retained_max`` of the node config), and when the retained copies exceed it
the least recently used go first (a copy is used when it is retired or discarded, the
last time its images were written; the oldest first, by name on a tie).

:func:`evictions` is the policy (pure); :func:`dir_bytes` measures a VM's directory.
An operator removes one copy at once with ``dwcp vm purge`` (``POST
/api/vms/NAME/purge``, role operator), signing a :class:`PurgeVm`: a DC's own disk, not
ledger state, so it goes to that DC's node only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import attrs

from federation.vms.backend import VmState
from mesh import wire
from mesh.wire import Bool, Text, field

__all__ = ["VmUsage", "PurgeVm", "evictions", "dir_bytes", "parse_size"]


@wire.message("operator.purge-vm")
class PurgeVm:
    """An operator's intent: remove this DC's retained copy of ``vm`` (with ``staged``,
    also a staged import that was never registered)."""

    vm: str = field(Text(128))
    staged: bool = field(Bool(), default=False)


@attrs.frozen
class VmUsage:
    """One VM's footprint on this DC's disk: bytes allocated under its directories."""

    name: str
    state: VmState
    disk_bytes: int
    #: when its images were last written as a retained copy (Unix time; 0: not retained)
    retired_at: float = 0.0

    @property
    def retained(self) -> bool:
        return self.state is VmState.RETIRED


def evictions(held: Sequence[VmUsage], budget: int) -> list[str]:
    """The retained copies to remove, least recently used first, so that what stays
    retained fits ``budget`` bytes (VMs in any other state are never chosen)."""
    retained = sorted((u for u in held if u.retained), key=lambda u: (u.retired_at, u.name))
    total = sum(u.disk_bytes for u in retained)
    out: list[str] = []
    for u in retained:
        if total <= budget:
            break
        out.append(u.name)
        total -= u.disk_bytes
    return out


def dir_bytes(*dirs: Path) -> int:
    """Bytes allocated to the files under ``dirs`` (``st_blocks``: a sparse image counts
    what it holds, not its length); a directory that is gone counts 0."""
    total = 0
    for d in dirs:
        for base, _subdirs, files in os.walk(d):
            for f in files:
                try:
                    total += os.lstat(os.path.join(base, f)).st_blocks * 512
                except FileNotFoundError:
                    continue
    return total


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """``"20GiB"``, ``"512 MiB"``, ``"1048576"`` -> bytes (binary units); ValueError
    naming what it could not read."""
    s = text.strip().lower().replace(" ", "")
    digits = len(s) - len(s.lstrip("0123456789"))
    number, unit = s[:digits], s[digits:]
    if not number or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size (a whole number with an optional unit: "
                         "B, KiB, MiB, GiB, TiB)")
    return int(number) * _UNITS[unit]
