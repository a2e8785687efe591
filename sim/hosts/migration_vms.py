"""The VMs of the ``migration-chaos`` scenario: an in-memory page model, its writer, and
the :class:`~federation.vms.backend.VmBackend` a simulated DC runs its migrations on.

Every DC holds *copies* of VMs (:class:`VmCopy`): the pages of a VM's images as
integers (the value a page holds is the number of the write that last touched it, so
two copies are equal exactly when they hold the same writes), its run state, the
migration that fences it, and per page the dirty generation of its last write.
Copies model disk images: they survive a crash of their DC (a crash stops the VM,
it does not lose what was written), the way the image backend's files do; so do the
incoming copies a target writes into (:class:`IncomingCopy`).

:class:`SimBackend` is one DC's view of them as a VM backend, with the image
backend's rules (a fenced VM refuses to start, a stale epoch is refused, every
action idempotent). Its images are real 4 KiB pages: a page holding value ``v``
reads as ``v`` (8 bytes, little-endian) followed by zeros, so the data plane moves
real bytes — a round's size on the wire is its pages' size, and the link's bandwidth
decides how long it takes — and the roots a fence and a verification compute are
the HDE roots of those bytes (:func:`federation.vms.actions.images_root`).

The :class:`Writer` is the guest: on every tick it writes a few pages of every running
copy, drawn from the world's seeded RNG, with a hot set that gets most writes (the
writable working set of Clark et al., NSDI 2005, §4).

:class:`VmWorld` also keeps the oracle's facts (:class:`Facts`): which DCs run each VM,
the pages each source held when it was fenced, and downtimes. A VM running at two
DCs is recorded as a violation at the moment it happens.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs

from federation.vms.backend import (
    FencedError,
    StaleEpochError,
    VmError,
    VmInfo,
    VmState,
)
from mesh.hde.image import PAGE_SIZE, Image, ImageWriter

__all__ = ["VmCopy", "IncomingCopy", "VmWorld", "Facts", "Writer", "SimBackend", "LAYOUT",
           "PAGES", "render", "decode"]

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
#: First page of each image in a copy's page list.
_OFFSET = {name: sum(n for _, n in LAYOUT[:i]) for i, (name, _) in enumerate(LAYOUT)}
_VALUE = 8
_PAD = bytes(PAGE_SIZE - _VALUE)


def render(values: Sequence[int]) -> bytes:
    """The bytes of pages holding ``values`` (see the module docstring)."""
    return b"".join(v.to_bytes(_VALUE, "little") + _PAD for v in values)


def decode(data: bytes | bytearray | memoryview) -> list[int]:
    """The values of rendered pages (the inverse of :func:`render`)."""
    return [int.from_bytes(data[p : p + _VALUE], "little") for p in range(0, len(data), PAGE_SIZE)]


@attrs.define
class VmCopy:
    vm: str
    dc: str
    pages: list[int]
    #: "stopped" (not running: just registered, or its DC crashed), "running", "retired"
    state: str = "stopped"
    #: the migration that fenced the copy (and, once retired, that moved it away)
    fence: str | None = None
    epoch: int = 0
    #: page -> dirty generation of its last write (see SimBackend.dirty_mark)
    dirty: dict[int, int] = attrs.field(factory=dict)
    generation: int = 0
    #: percent of the time the guest is held (auto-converge, SimBackend.throttle); only a
    #: running copy is throttled: whatever stops it lifts the throttle
    throttle: int = 0


@attrs.define
class IncomingCopy:
    """A target's copy of a VM under construction: what the data plane wrote."""

    migration_id: str
    images: dict[str, bytearray]

    def pages(self) -> list[int]:
        return [v for name, _ in LAYOUT for v in decode(self.images[name])]


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
        #: (dc, vm) -> the incoming copy a target writes into
        self.incoming: dict[tuple[str, str], IncomingCopy] = {}
        self.facts = Facts()
        self.writes = 0
        #: throttles put on a running copy (auto-converge decisions carried out)
        self.throttles = 0

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
        if state != "running":
            copy.throttle = 0

    def fence(self, copy: VmCopy, migration_id: str) -> None:
        if copy.fence == migration_id:
            return
        copy.fence = migration_id
        if copy.state == "running":
            self.set_state(copy, "stopped")
        now = self.clock()
        self.facts.fenced[migration_id] = (copy.vm, tuple(copy.pages), now)
        self.facts.stopped_at.setdefault(copy.vm, now)

    def write(self, copy: VmCopy, page: int) -> None:
        """The guest writes ``page``: it holds the write's number, dirty in the current
        generation."""
        self.writes += 1
        copy.pages[page] = self.writes
        copy.dirty[page] = copy.generation

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
        random_ = rng.random
        vms = self.vms
        hot = HOT_PAGES / HOT_SHARE
        cold = PAGES / (1.0 - HOT_SHARE)
        for copy in list(vms.copies.values()):
            if copy.state != "running" or not self.up(copy.dc):
                continue
            # a throttled guest runs (and writes) 100 - throttle % of the time
            rate = self.rate * (100 - copy.throttle) / 100
            pages = copy.pages
            dirty = copy.dirty
            generation = copy.generation
            # VmWorld.write inlined: one call less per guest write (tens of thousands a run)
            writes = vms.writes
            for _ in range(rng.randrange(int(2 * rate * seconds) + 1)):
                # one draw picks hot or cold and the page within it
                r = random_()
                page = int(r * hot) if r < HOT_SHARE else int((r - HOT_SHARE) * cold)
                writes += 1
                pages[page] = writes
                dirty[page] = generation
            vms.writes = writes


class SimBackend:
    """One DC's copies as a :class:`federation.vms.backend.VmBackend` (see the module
    docstring). ``owner_of(vm)`` is what this DC's ledger says; a copy that starts running
    here while it names another owner is a violation, recorded at once."""

    def __init__(self, world: VmWorld, dc: str, owner_of: Callable[[str], str | None]) -> None:
        self.world = world
        self.dc = dc
        self.owner_of = owner_of

    # ------------------------------------------------------------------ queries

    def _copy(self, name: str) -> VmCopy:
        copy = self.world.copies.get((self.dc, name))
        if copy is None:
            raise VmError(f"no VM {name!r} at {self.dc}")
        return copy

    def info(self, name: str) -> VmInfo:
        incoming = self.world.incoming.get((self.dc, name))
        copy = self.world.copies.get((self.dc, name))
        if incoming is not None:
            epoch = copy.epoch if copy is not None else 0
            return VmInfo(name, epoch, VmState.INCOMING, LAYOUT, incoming.migration_id)
        if copy is None:
            raise VmError(f"no VM {name!r} at {self.dc}")
        if copy.state == "running":
            state = VmState.RUNNING
        elif copy.state == "retired":
            state = VmState.RETIRED
        else:
            state = VmState.FENCED if copy.fence is not None else VmState.STOPPED
        return VmInfo(name, copy.epoch, state, LAYOUT, copy.fence or "")

    def remove(self, name: str) -> bool:
        """The ledger deleted ``name``: this DC's copy stops and is gone."""
        copy = self.world.copies.get((self.dc, name))
        if copy is None:
            return False
        if copy.state == "running":
            self.world.set_state(copy, "retired")
        del self.world.copies[(self.dc, name)]
        return True

    def list_vms(self) -> list[VmInfo]:
        names = {vm for (dc, vm) in self.world.copies if dc == self.dc}
        names |= {vm for (dc, vm) in self.world.incoming if dc == self.dc}
        return [self.info(n) for n in sorted(names)]

    def open_images(self, name: str) -> dict[str, Image]:
        """The images as they are now (a snapshot: a later write is in a later round)."""
        pages = self._copy(name).pages
        return {img: Image(bytearray(render(pages[_OFFSET[img] : _OFFSET[img] + n])),
                           f"{name}/{img}") for img, n in LAYOUT}

    def import_vm(self, name: str, memory: Path, disks: Sequence[Path] = (),
                  epoch: int = 0) -> VmInfo:
        raise VmError(f"VM {name!r}: the simulator's VMs are registered by the scenario "
                      "(VmWorld.create), not imported from files")

    # ------------------------------------------------------------------ incoming

    def machine_spec(self, name: str) -> bytes:
        self._copy(name)  # an unknown VM is an error here too
        return b""  # a simulated VM is its pages

    def device_state(self, name: str, migration_id: str) -> bytes:
        if self._copy(name).fence != migration_id:
            raise VmError(f"VM {name!r} is not fenced by migration {migration_id!r}")
        return b""  # its writer's state is in the world, not in a device

    def prepare_incoming(self, name: str, layout: Sequence[tuple[str, int]],
                         migration_id: str, machine: bytes = b"") -> dict[str, ImageWriter]:
        if machine:
            raise VmError(f"VM {name!r}: the simulator runs no machine spec")
        if tuple(layout) != LAYOUT:
            raise VmError(f"VM {name!r}: layout {list(layout)} is not the simulator's "
                          f"{list(LAYOUT)}")
        copy = self.world.copies.get((self.dc, name))
        if copy is not None and copy.state != "retired" and (
                copy.state == "running" or copy.fence is not None):
            raise VmError(f"VM {name!r} runs here; cannot receive it")
        key = (self.dc, name)
        incoming = self.world.incoming.get(key)
        if incoming is None or incoming.migration_id != migration_id:
            incoming = self.world.incoming[key] = IncomingCopy(
                migration_id, {img: bytearray(n * PAGE_SIZE) for img, n in LAYOUT})
        return {img: ImageWriter(buf, f"{name}/{img}") for img, buf in incoming.images.items()}

    def discard_incoming(self, name: str, migration_id: str) -> None:
        incoming = self.world.incoming.get((self.dc, name))
        if incoming is not None and incoming.migration_id == migration_id:
            del self.world.incoming[(self.dc, name)]

    # ------------------------------------------------------------------ dirty tracking

    def dirty_mark(self, name: str) -> int:
        copy = self._copy(name)
        copy.generation += 1
        return copy.generation

    def dirty_since(self, name: str, mark: int) -> dict[str, list[int]]:
        copy = self._copy(name)
        out: dict[str, list[int]] = {}
        for page in sorted(p for p, g in copy.dirty.items() if g >= mark):
            img = next(n for n, _ in reversed(LAYOUT) if page >= _OFFSET[n])
            out.setdefault(img, []).append(page - _OFFSET[img])
        return out

    # ------------------------------------------------------------------ running

    def start(self, name: str, epoch: int, device_state: bytes = b"") -> VmInfo:
        if device_state:
            raise VmError(f"VM {name!r}: the simulator has no device state to load")
        world = self.world
        incoming = world.incoming.get((self.dc, name))
        copy = world.copies.get((self.dc, name))
        if copy is not None and epoch < copy.epoch:
            raise StaleEpochError(f"VM {name!r}: start with epoch {epoch}, but it last ran "
                                  f"with epoch {copy.epoch}")
        if incoming is not None:
            del world.incoming[(self.dc, name)]
            copy = world.create(self.dc, name)
            copy.pages = incoming.pages()
            copy.fence = None
            copy.dirty.clear()
            fenced = world.facts.fenced.get(incoming.migration_id)
            if epoch and (fenced is None or tuple(copy.pages) != fenced[1]):
                world.facts.fail(f"{self.dc} started {name} ({incoming.migration_id}) with "
                                 "pages that differ from what its writer last wrote before "
                                 "the fence")
        elif copy is None:
            raise VmError(f"no VM {name!r} at {self.dc}")
        elif copy.state == "retired":
            raise VmError(f"VM {name!r} was migrated away ({copy.fence!r}); only a "
                          "migration brings it back")
        elif copy.fence is not None:
            raise FencedError(f"VM {name!r} is fenced by migration {copy.fence!r}")
        copy.epoch = epoch
        self.run(copy)
        return self.info(name)

    def run(self, copy: VmCopy) -> None:
        """Run ``copy`` (checked against this DC's ledger)."""
        if copy.state == "running":
            return
        self.world.set_state(copy, "running")
        owner = self.owner_of(copy.vm)
        if owner != self.dc:
            self.world.facts.fail(f"{copy.vm} started at {self.dc}, whose ledger says "
                                  f"{owner} owns it")

    def throttle(self, name: str, percent: int) -> None:
        """Hold the running guest ``percent`` % of the time (0: not at all), as the qemu
        backend's duty cycle does; a copy that is not running stays unthrottled."""
        if not 0 <= percent < 100:
            raise VmError(f"VM {name!r}: throttle {percent} % is not within 0..99")
        copy = self._copy(name)
        copy.throttle = percent if copy.state == "running" else 0
        if copy.throttle:
            self.world.throttles += 1

    def throttled(self, name: str) -> int:
        return self._copy(name).throttle

    def fence(self, name: str, migration_id: str) -> VmInfo:
        copy = self._copy(name)
        if copy.state == "retired" or (self.dc, name) in self.world.incoming:
            raise VmError(f"VM {name!r} is not running here; only a running VM is fenced")
        if copy.fence is not None and copy.fence != migration_id:
            raise FencedError(f"VM {name!r} is fenced by migration {copy.fence!r}")
        self.world.fence(copy, migration_id)
        return self.info(name)

    def release_fence(self, name: str, migration_id: str) -> VmInfo:
        copy = self._copy(name)
        if copy.state == "retired" or copy.fence is None:
            return self.info(name)  # nothing of this migration to lift
        if copy.fence != migration_id:
            raise VmError(f"VM {name!r} is fenced by migration {copy.fence!r}, "
                          f"not {migration_id!r}")
        copy.fence = None
        self.run(copy)
        return self.info(name)

    def retire(self, name: str, migration_id: str) -> VmInfo:
        copy = self._copy(name)
        if copy.state == "retired" and copy.fence == migration_id:
            return self.info(name)
        if copy.fence != migration_id:
            raise VmError(f"VM {name!r} is not fenced by migration {migration_id!r}")
        self.world.set_state(copy, "retired")
        return self.info(name)

    def close(self) -> None:
        """Nothing to release: the copies are the world's, and no image stays open."""
