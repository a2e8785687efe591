"""The VMs of the ``migration-chaos`` scenario: an in-memory page model and its writer.

Every DC holds *copies* of VMs (:class:`VmCopy`): the pages of a VM's images as
integers (the value a page holds is the number of the write that last touched it, so
two copies are equal exactly when they hold the same writes), its run state, the
migration that fences it, and the pages dirtied since the last pre-copy round began.
Copies model disk images: they survive a crash of their DC (a crash stops the VM,
it does not lose what was written), the way the image backend's files do.

The :class:`Writer` is the guest: on every tick it writes a few pages of every running
copy, drawn from the world's seeded RNG, with a hot set that gets most writes (the
writable working set of Clark et al., NSDI 2005, §4).

:class:`VmWorld` also keeps the oracle's facts (:class:`Facts`): which DCs run each VM,
the pages each source held when it was fenced, and downtimes. A VM running at two
DCs is recorded as a violation at the moment it happens.
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Callable

import attrs

__all__ = ["VmCopy", "VmWorld", "Facts", "Writer", "LAYOUT", "PAGES", "pages_root"]

#: Images of every simulated VM: 96 memory pages and 32 disk pages (512 KiB), big
#: enough that a round takes several link round trips at WAN bandwidths, small enough
#: that a run of 15 VMs stays far below a second of wall time.
LAYOUT: tuple[tuple[str, int], ...] = (("memory", 96), ("disk-0", 32))
PAGES = sum(n for _, n in LAYOUT)
#: Pages in the hot set of a writer, and the share of writes that go there
#: (a working set of 1/8 of memory taking 80 % of writes; Clark et al. §4 measure
#: writable working sets of a few percent to a quarter of memory).
HOT_PAGES = 12
HOT_SHARE = 0.8

_pack_pages = struct.Struct(f"<{PAGES}Q").pack


def pages_root(pages: list[int]) -> bytes:
    """The root a fence or a verification computes over a copy (stands in for the HDE root)."""
    return hashlib.sha256(_pack_pages(*pages)).digest()


@attrs.define
class VmCopy:
    vm: str
    dc: str
    pages: list[int]
    #: "stopped" (not running: just registered, or its DC crashed), "running", "retired"
    state: str = "stopped"
    fence: str | None = None
    epoch: int = 0
    dirty: set[int] = attrs.field(factory=set)


@attrs.define
class Facts:
    """What the oracle knows beyond the ledgers (kept by :class:`VmWorld`)."""

    #: vm -> the DCs where it runs now
    running: dict[str, list[str]] = attrs.field(factory=dict)
    #: migration id -> (vm, the source's pages when it fenced, time of the fence)
    fenced: dict[str, tuple[str, tuple[int, ...], float]] = attrs.field(factory=dict)
    #: vm -> when it stopped for a migration (fence), until it runs again somewhere
    stopped_at: dict[str, float] = attrs.field(factory=dict)
    max_downtime: float = 0.0
    problem: str | None = None

    def fail(self, message: str) -> None:
        if self.problem is None:
            self.problem = message


class VmWorld:
    """Every copy of every VM at every DC (see the module docstring)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.copies: dict[tuple[str, str], VmCopy] = {}
        #: (dc, migration id) -> the incoming copy a target writes into
        self.incoming: dict[tuple[str, str], list[int]] = {}
        self.facts = Facts()
        self.writes = 0

    def create(self, dc: str, vm: str) -> VmCopy:
        copy = self.copies.get((dc, vm))
        if copy is None:
            copy = self.copies[(dc, vm)] = VmCopy(vm, dc, [0] * PAGES)
        return copy

    def at(self, dc: str) -> list[VmCopy]:
        return [c for (d, _), c in self.copies.items() if d == dc]

    # ------------------------------------------------------------------ run state

    def set_state(self, copy: VmCopy, state: str) -> None:
        was = copy.state
        copy.state = state
        where = self.facts.running.setdefault(copy.vm, [])
        if state == "running" and was != "running":
            where.append(copy.dc)
            if len(where) > 1:
                self.facts.fail(f"VM {copy.vm} runs at two DCs: {sorted(where)}")
            stopped = self.facts.stopped_at.pop(copy.vm, None)
            if stopped is not None:
                self.facts.max_downtime = max(self.facts.max_downtime, self.clock() - stopped)
        elif state != "running" and was == "running":
            where.remove(copy.dc)

    def fence(self, copy: VmCopy, migration_id: str) -> None:
        if copy.fence == migration_id:
            return
        copy.fence = migration_id
        if copy.state == "running":
            self.set_state(copy, "stopped")
        now = self.clock()
        self.facts.fenced[migration_id] = (copy.vm, tuple(copy.pages), now)
        self.facts.stopped_at.setdefault(copy.vm, now)

    def crash(self, dc: str) -> None:
        """The DC's process died: its VMs stop; their images stay."""
        for copy in self.at(dc):
            if copy.state == "running":
                self.set_state(copy, "stopped")
            copy.dirty.clear()


class Writer:
    """The guests: every ``tick`` seconds each running copy gets a few writes."""

    def __init__(self, vms: VmWorld, rng: random.Random, rate: float,
                 up: Callable[[str], bool]) -> None:
        self.vms = vms
        self.rng = rng
        self.rate = rate  # expected page writes per second per VM
        self.up = up  # whether a DC is up (a crashed DC's guests write nothing)

    def tick(self, seconds: float) -> None:
        rng = self.rng
        vms = self.vms
        for copy in list(vms.copies.values()):
            if copy.state != "running" or not self.up(copy.dc):
                continue
            pages, dirty = copy.pages, copy.dirty
            for _ in range(rng.randrange(int(2 * self.rate * seconds) + 1)):
                # one draw picks hot or cold and the page within it
                r = rng.random()
                if r < HOT_SHARE:
                    page = int(r * (HOT_PAGES / HOT_SHARE))
                else:
                    page = int((r - HOT_SHARE) * (PAGES / (1.0 - HOT_SHARE)))
                vms.writes += 1
                pages[page] = vms.writes
                dirty.add(page)
