"""``make netns-chaos``: real ``dwcp node`` processes on real (namespaced) links, broken
on a seeded schedule while VMs migrate, then healed and checked (issue 18, item 1).

One seed is one run:

* the network: every DC's node in a network namespace of its own, joined to a bridge
  in a hub namespace by a veth pair shaped with tbf at the DC's rate from the profile
  (:class:`bench.netns.BridgeNet`); this process reaches the nodes' APIs through the
  bridge's unshaped management port;
* with ``--wan`` (``make netns-chaos-wan``), WAN latency: every connection a DC opens
  to a peer goes through that DC's delay relay, 13-118 ms one way
  (:mod:`bench.netns_wan`), and the relay's ``kill -9`` is one more fault;
* each DC's data directory is a small tmpfs of its own (:data:`DISK_MIB`), so a disk
  can be filled;
* the VMs: :data:`IMAGE_VMS` image VMs of seeded random content (cheap), and in some
  seeds (every :data:`GUEST_EVERY`-th, where QEMU and the guest are installed) the
  self-checking QEMU guest of ``make qemu-guest`` (TCG: slow, so one per seed at most);
* the chaos phase (``--chaos-seconds``): one thread per VM migrates it to a random DC
  again and again (a few of them cancelled mid-way), while the fault schedule, drawn
  from the seed, breaks one DC at a time: ``ip link set down`` of its link, a tc
  filter that drops one direction of it, ``kill -9`` (restarted after a while),
  ``SIGSTOP`` then ``SIGCONT``, a restart (SIGTERM, start), a full disk;
* the heal: every fault undone, every node running; then the checker
  (:func:`check_run`): every migration commit or abort in every ledger and never both;
  every ledger the same height and the same VM records; one running copy of each VM,
  at its owner (for the guest: one QEMU process on the whole host); each image VM's
  content the content it was imported with; the guest counting on without a reboot or
  a gap, its memory and disk checks passing.

The schedule (faults, their DCs, times and the migrations' targets) is a function of the
seed; the processes' own timing is not, so a replay re-runs the same schedule on the
same network, not the same interleaving. Every failing seed prints its replay line;
``--json`` prints a summary. Needs root (namespaces, tmpfs mounts) and iproute2.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.netns import BridgeNet, netns_missing
from bench.netns_wan import WanRelays
from consensus.ledger import CancelMigration, SetPolicy
from federation.api.client import import_vm, migrate_request
from federation.vms.sealed_image import content_sha256
from tests.harness.processes import NAMES, NodeProcesses, node_processes, stored_key, vm_dir

#: Link rates (Mbit/s, tbf on both ends of each DC's link) by profile; None: unshaped.
PROFILES: dict[str, dict[str, int | None]] = {
    "wan": {"dc1": 100, "dc2": 50, "dc3": 100, "dc4": 20},
    "lan": {"dc1": None, "dc2": None, "dc3": None, "dc4": None},
}
#: Each DC's data directory: a tmpfs this size (the image VMs are ~1 MiB each); with the
#: guest, GUEST_DISK_MIB: its 16 MiB disk, and at a source the migration's shadow of its
#: 128 MiB of RAM and the disk, and a retained copy where it ran before (its running RAM
#: is on /dev/shm apart).
DISK_MIB, GUEST_DISK_MIB = 96, 512
IMAGE_VMS = 2
#: An image VM: memory and one disk of seeded random bytes (random: HDE cannot shrink
#: them, so every migration sends them whole over the shaped links).
MEMORY_KIB, DISK_KIB = 768, 256
#: The guest runs in seeds divisible by this (``--guest auto``).
GUEST_EVERY = 5
FAULTS = ("link-down", "drop-in", "drop-out", "kill9", "sigstop", "restart", "disk-full")
#: With ``--wan`` (a delay relay per DC, bench/netns_wan.py): its relay killed too. A
#: tuple of its own, so the default schedules (of FAULTS) stay what they were.
WAN_FAULTS = (*FAULTS, "relay-kill9")
#: A fault holds 2-8 s (long enough for SWIM to suspect and PBFT to time a view out),
#: the gap between two faults 0.5-3 s.
HOLD_S, GAP_S = (2.0, 8.0), (0.5, 3.0)
CANCEL_P = 0.15
#: After the heal: how long every node gets to be ready and every migration to be
#: decided everywhere, and the ledgers to agree.
READY_S, DECIDE_S, AGREE_S = 90.0, 120.0, 60.0
BOOT_S = 180.0


class RunFailed(Exception):
    """A check of the run did not hold; the message names it."""


@dataclass
class Migration:
    id: str
    vm: str
    source: str
    target: str
    cancelled: bool = False
    #: the guest's: its console log's size at the target when the migration was asked for
    offset: int = 0


@dataclass
class Run:
    seed: int
    rng: random.Random
    nodes: NodeProcesses
    net: BridgeNet
    root: Path
    guest: bool
    chaos_s: float
    relays: WanRelays | None = None
    migrations: list[Migration] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    exits: list[str] = field(default_factory=list)
    #: the guest's stays: (DC, offset in that DC's console log, end or None while there)
    stays: list[tuple[str, int, int | None]] = field(default_factory=list)
    #: the guest's migration its migrator stopped waiting for (the checker's to settle)
    guest_pending: Migration | None = None
    originals: dict[str, dict[str, str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


# ----------------------------------------------------------------------------- checks


def contradictions(seen: dict[str, dict[str, str]]) -> list[str]:
    """Migrations some DC's ledger holds committed and another aborted: ``seen`` maps a
    migration id to each DC's ledger state of it (any state a DC ever reported)."""
    out = []
    for mid, states in sorted(seen.items()):
        decided = {s for s in states.values() if s in ("committed", "aborted")}
        if len(decided) > 1:
            out.append(f"migration {mid} both committed and aborted: "
                       f"{dict(sorted(states.items()))}")
    return out


def undecided(seen: dict[str, dict[str, str]], dcs: tuple[str, ...]) -> list[str]:
    """Migrations not committed or aborted at every DC in ``dcs``."""
    return [f"migration {mid} not decided everywhere: {dict(sorted(states.items()))}"
            for mid, states in sorted(seen.items())
            if any(states.get(dc) not in ("committed", "aborted") for dc in dcs)]


def ledger_disagreement(docs: dict[str, dict[str, Any]]) -> str | None:
    """Why the DCs' ``/api/status`` documents do not hold one ledger (equal heights and
    equal VM records), or None."""
    heights = {dc: d["ledger"].get("height") for dc, d in docs.items()}
    if len(set(heights.values())) != 1:
        return f"ledger heights differ: {heights}"
    records = {dc: sorted((v["name"], v["owner"], v["epoch"], v["migrating"])
                          for v in d["vms"] if v["owner"] is not None)
               for dc, d in docs.items()}
    first = next(iter(records.values()))
    if any(r != first for r in records.values()):
        return f"VM records differ: {records}"
    return None


def still_migrating(docs: dict[str, dict[str, Any]]) -> list[str]:
    """VMs some DC's ledger still holds in a migration (by its id): after the heal every
    migration ends, the ones the harness never learnt the id of included (a request
    whose answer was lost to a fault)."""
    return sorted({f"{v['name']} (migration {v['migrating']} at {dc})"
                   for dc, d in docs.items() for v in d["vms"] if v.get("migrating")})


def copies_violation(vm: str, owner: str, here: dict[str, str | None]) -> str | None:
    """``here``: the VM's state at each DC's backend; one running copy, at the owner."""
    running = sorted(dc for dc, state in here.items() if state == "running")
    if running != [owner]:
        return f"{vm}: running at {running}, the ledger's owner is {owner}"
    return None


# ----------------------------------------------------------------------------- setup


def _image_vm(directory: Path, rng: random.Random) -> tuple[Path, Path]:
    directory.mkdir(parents=True)
    memory, disk = directory / "memory.img", directory / "disk0.img"
    memory.write_bytes(rng.randbytes(MEMORY_KIB << 10))
    disk.write_bytes(rng.randbytes(DISK_KIB << 10))
    return memory, disk


def _mount_disks(cfg: Path, mib: int) -> list[Path]:
    mounted = []
    for dc in NAMES:
        d = cfg.parent / "data" / dc
        d.mkdir(parents=True, exist_ok=True)
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m,mode=0700",
                              "tmpfs", str(d)], capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RunFailed(f"mount tmpfs on {d}: {out.stderr.strip()}")
        mounted.append(d)
    return mounted


def _umount(mounted: list[Path]) -> None:
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True, check=False)


@contextlib.contextmanager
def _federation(root: Path, net: BridgeNet, guest: bool, mounted: list[Path],
                relays: WanRelays | None = None) -> Iterator[NodeProcesses]:
    def before_start(cfg: Path) -> None:
        mounted.extend(_mount_disks(cfg, GUEST_DISK_MIB if guest else DISK_MIB))
        if relays is not None:
            relays.start_all(cfg)

    placed: dict[str, Any] = {
        "host": net.mgmt, "hosts": dict(net.addresses),
        "prefixes": {dc: net.prefix(dc) for dc in NAMES}, "before_start": before_start}
    if relays is not None:
        placed["views"] = relays.views
    if guest:
        from tests.harness.qemu_nodes import qemu_nodes
        with qemu_nodes(root, **placed) as nodes:
            yield nodes
    else:
        with node_processes(root, **placed) as nodes:
            yield nodes


# ----------------------------------------------------------------------------- faults


def _fill(directory: Path) -> Path:
    """Fill the tmpfs at ``directory`` (a file of all its free space); the file."""
    filler = directory / ".netns-chaos-fill"
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    fd = os.open(filler, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        with contextlib.suppress(OSError):  # ENOSPC at the very end: as full as it gets
            os.posix_fallocate(fd, 0, max(free, 4096))
    finally:
        os.close(fd)
    return filler


def _apply(run: Run, kind: str, dc: str, hold: float) -> None:
    """Break ``dc`` with ``kind`` for ``hold`` seconds, then undo it."""
    nodes, net = run.nodes, run.net
    proc = nodes.procs[dc]
    if kind == "link-down":
        net.set_link(dc, False)
        time.sleep(hold)
        net.set_link(dc, True)
    elif kind in ("drop-in", "drop-out"):
        direction = kind.split("-")[1]
        net.set_drop(dc, direction, True)
        time.sleep(hold)
        net.set_drop(dc, direction, False)
    elif kind == "kill9":
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        time.sleep(hold)
        nodes.start(dc)
    elif kind == "sigstop":
        if proc.poll() is None:
            proc.send_signal(signal.SIGSTOP)
            time.sleep(hold)
            proc.send_signal(signal.SIGCONT)
    elif kind == "restart":
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                run.errors.append(f"{dc} did not exit within 30 s of SIGTERM")
                proc.kill()
                proc.wait()
            if proc.returncode not in (0, -signal.SIGTERM):
                run.exits.append(f"{dc} exited {proc.returncode} after SIGTERM")
        nodes.start(dc)
    elif kind == "relay-kill9":
        assert run.relays is not None, "relay faults are drawn with --wan only"
        run.relays.kill(dc)
        time.sleep(hold)
        run.relays.start(dc)
    elif kind == "disk-full":
        filler = _fill(nodes.cfg.parent / "data" / dc)
        try:
            time.sleep(hold)
        finally:
            filler.unlink()
    else:
        raise ValueError(f"fault {kind!r}: one of {WAN_FAULTS}")


def _revive(run: Run, why: str) -> None:
    """Start every node whose process exited on its own (a violation: a node survives a
    cut link, a stopped peer and a full disk; the checker reports it after the heal)."""
    for dc, proc in run.nodes.procs.items():
        if proc.poll() is not None:
            run.exits.append(f"{dc} exited with {proc.returncode} {why}")
            run.nodes.start(dc)
    if run.relays is not None:
        for dc in run.relays.dead():
            run.exits.append(f"{dc}'s relay exited {why}")
            run.relays.start(dc)


def _chaos(run: Run, schedule: list[tuple[float, str, str, float]], began: float) -> None:
    for gap, kind, dc, hold in schedule:
        time.sleep(gap)
        if time.monotonic() - began > run.chaos_s:
            break
        run.faults.append(f"t={time.monotonic() - began:.1f}s {kind} {dc} {hold:.1f}s")
        _apply(run, kind, dc, hold)
        _revive(run, f"during or after {kind} of {dc}")


def make_schedule(rng: random.Random, chaos_s: float, faults: tuple[str, ...] = FAULTS,
                  ) -> list[tuple[float, str, str, float]]:
    """(gap before, fault, DC, hold) until the chaos phase is over: from the seed alone."""
    out, t = [], 0.0
    while t < chaos_s:
        gap, hold = rng.uniform(*GAP_S), rng.uniform(*HOLD_S)
        out.append((gap, rng.choice(faults), rng.choice(NAMES), hold))
        t += gap + hold
    return out


# ----------------------------------------------------------------------------- migrations


def _try(f: Any, *args: Any) -> Any:
    try:
        return f(*args)
    except Exception:  # noqa: BLE001 - a node down, stopped or cut off: the caller retries
        return None


def _owner(run: Run, vm: str) -> str | None:
    for dc in NAMES:
        doc = _try(run.nodes.api(dc).ok, "GET", f"/api/vms/{vm}")
        if doc and doc.get("owner") and not doc.get("migrating"):
            return str(doc["owner"])
    return None


def _outcome(run: Run, m: Migration) -> str | None:
    for dc in (m.source, m.target):
        doc = _try(run.nodes.api(dc).ok, "GET", f"/api/migrations/{m.id}")
        if doc and doc.get("ledger") in ("committed", "aborted"):
            return str(doc["ledger"])
    return None


def _console_size(run: Run, dc: str) -> int:
    from tests.harness.qemu_nodes import console_logs
    path = console_logs(run.nodes, "g", [dc])[0]
    return path.stat().st_size if path.exists() else 0


def _start_migration(api: Any, vm: str, target: str) -> Any:
    return api.ok("POST", "/api/migrations", migrate_request(api, vm, target))


def _moved(run: Run, m: Migration) -> None:
    """The guest's migration ``m`` committed: its stay at the source ends here, one at
    the target begins at the console offset taken when ``m`` was asked for."""
    with run.lock:
        dc, start, _ = run.stays[-1]
        run.stays[-1] = (dc, start, _console_size(run, dc))
        run.stays.append((m.target, m.offset, None))


def _migrator(run: Run, vm: str, rng: random.Random, until: float) -> None:
    """Migrate ``vm`` to a random other DC, again and again, until ``until``."""
    while time.monotonic() < until:
        owner = _owner(run, vm)
        if owner is None:
            time.sleep(0.5)
            continue
        target = rng.choice([d for d in NAMES if d != owner])
        cancel = rng.random() < CANCEL_P
        delay = rng.uniform(0.0, 2.0)
        api = run.nodes.api(owner)
        offset = _console_size(run, target) if vm == "g" else 0
        doc = _try(_start_migration, api, vm, target)
        if doc is None:
            time.sleep(0.5)
            continue
        m = Migration(str(doc["id"]), vm, owner, target, offset=offset)
        with run.lock:
            run.migrations.append(m)
        if cancel:
            time.sleep(delay)
            m.cancelled = _try(api.call, "POST", f"/api/migrations/{m.id}/cancel",
                               CancelMigration(m.id)) is not None
        while time.monotonic() < until + DECIDE_S:
            done = _outcome(run, m)
            if done is not None:
                if vm == "g" and done == "committed":
                    _moved(run, m)
                break
            time.sleep(0.25)
        else:
            if vm == "g":
                run.guest_pending = m  # decided (or not) after the heal: check_run looks
            return  # the checker reports it undecided
        time.sleep(rng.uniform(0.2, 1.5))


# ----------------------------------------------------------------------------- checker


def _wait(what: str, check: Any, timeout: float, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = _try(check)
        if got:
            return got
        if time.monotonic() > deadline:
            raise RunFailed(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)


def check_run(run: Run) -> dict[str, Any]:
    """The heal's checks; raises :class:`RunFailed` naming the first that does not hold."""
    nodes = run.nodes
    for dc in NAMES:
        _wait(f"{dc} ready after the heal", lambda dc=dc: nodes.ready(dc), READY_S)
    seen: dict[str, dict[str, str]] = {m.id: {} for m in run.migrations}

    refused: set[str] = set()

    def look() -> bool:
        for m in run.migrations:
            for dc in NAMES:
                doc = _try(nodes.api(dc).ok, "GET", f"/api/migrations/{m.id}")
                if doc and doc.get("ledger"):
                    seen[m.id][dc] = str(doc["ledger"])
                elif doc and dc == m.source and (doc.get("outcome") or {}).get(
                        "outcome") == "refused":
                    refused.add(m.id)  # the ledger refused its begin (seed 53: the VM
                    # was in another migration the restarted source had not heard of)
        for mid in refused:
            if not seen.get(mid):  # no ledger holds it: it never began
                seen.pop(mid, None)
        if bad := contradictions(seen):
            raise RunFailed(bad[0])
        return not undecided(seen, NAMES)

    deadline = time.monotonic() + DECIDE_S
    while not look():
        if time.monotonic() > deadline:
            raise RunFailed(undecided(seen, NAMES)[0])
        time.sleep(1.0)
    for m in run.migrations:
        if m.id not in seen:
            continue  # refused by the ledger: never began
        for dc in (m.source, m.target):  # the sessions end as the ledger decided
            doc = nodes.api(dc).ok("GET", f"/api/migrations/{m.id}")
            got = (doc.get("outcome") or {}).get("outcome")
            if got is not None and got != seen[m.id][dc]:
                raise RunFailed(f"migration {m.id}: {dc}'s session ended {got}, its "
                                f"ledger says {seen[m.id][dc]}")

    last: list[str | None] = [None]

    def agreed() -> dict[str, dict[str, Any]] | None:
        docs = {dc: nodes.status(dc) for dc in NAMES}
        moving = still_migrating(docs)
        last[0] = ledger_disagreement(docs) or (f"still migrating: {moving}" if moving
                                                 else None)
        return docs if last[0] is None else None

    try:
        docs = _wait("every ledger the same, no VM migrating", agreed, DECIDE_S)
    except RunFailed as exc:
        raise RunFailed(f"{exc}: {last[0]}") from None
    owners = {v["name"]: v["owner"] for v in docs["dc1"]["vms"] if v["owner"]}
    for vm, owner in sorted(owners.items()):
        why: list[str | None] = [None]

        def one_copy(vm: str = vm, owner: str = owner, why: list[str | None] = why) -> bool:
            here = {dc: nodes.vm_here(dc, vm) for dc in NAMES}
            why[0] = copies_violation(vm, owner, here)
            return why[0] is None

        try:
            _wait(f"one running copy of {vm}", one_copy, AGREE_S)
        except RunFailed as exc:
            raise RunFailed(f"{exc}: {why[0]}") from None
        if vm in run.originals:
            _check_images(run, vm, owner)
    if run.guest:
        late = run.guest_pending
        # a guest migration slower than the migrator's wait (seed 40 of --wan --guest
        # always under load: committed 200 s after its begin) is decided by now
        if late is not None and seen.get(late.id, {}).get(late.target) == "committed":
            _moved(run, late)
        _check_guest(run, owners["g"])
    committed = sum(1 for s in seen.values() if s.get("dc1") == "committed")
    return {"migrations": len(run.migrations), "committed": committed,
            "aborted": len(seen) - committed, "refused": len(run.migrations) - len(seen),
            "cancel_requests": sum(m.cancelled for m in run.migrations),
            # each DC's round-trip estimate of each peer after the heal (with --wan: the
            # relays' latency both ways, plus the links' own)
            "rtt_ms": {dc: {peer: link.get("rtt_ms") for peer, link in sorted(
                d.get("links", {}).items())} for dc, d in docs.items()}}


def _check_images(run: Run, vm: str, owner: str) -> None:
    d = vm_dir(run.nodes, owner, vm)
    key = stored_key(d)
    for name, digest in run.originals[vm].items():
        got = content_sha256(d / f"{name}.img", key)
        if got != digest:
            raise RunFailed(f"{vm}'s {name} at its owner {owner}: sha256 {got[:16]}, "
                            f"imported as {digest[:16]}")


def _check_guest(run: Run, owner: str) -> None:
    from tests.harness.qemu_nodes import guest_console, qemu_processes, running_copies
    nodes = run.nodes
    if running_copies(nodes, "g") != [owner] or qemu_processes(nodes, "g") != [owner]:
        _wait(f"one QEMU of the guest, at {owner}",
              lambda: running_copies(nodes, "g") == [owner]
              and qemu_processes(nodes, "g") == [owner], 60)
    with run.lock:
        stays = list(run.stays)
    if stays[-1][0] != owner:
        raise RunFailed(f"the guest's owner is {owner}, its last committed move was to "
                        f"{stays[-1][0]}")

    def console() -> Any:
        return guest_console(nodes, "g", [d for d, _, _ in stays], [o for _, o, _ in stays],
                             [e for _, _, e in stays])

    before = console()
    con = _wait("the guest counting on and checking after the heal", lambda: (
        (c := console()).last_heartbeat >= before.last_heartbeat + 10
        and len(c.checks) > len(before.checks) and c), 180, every=1.0)
    if con.boots != 1:
        raise RunFailed(f"the guest rebooted ({con.boots} boots)")
    if con.counter_gaps():
        raise RunFailed(f"the guest's counter has gaps: {con.counter_gaps()[:3]}")
    if con.errors:
        raise RunFailed(f"the guest's checks failed: {con.errors[:2]}")


# ----------------------------------------------------------------------------- one seed


@contextlib.contextmanager
def _relays(net: BridgeNet, root: Path, seed: int, wan: bool) -> Iterator[WanRelays | None]:
    """With ``wan``, every DC's delay relay (started with the federation, before the
    nodes); killed on the way out, before the namespaces go."""
    if not wan:
        yield None
        return
    relays = WanRelays({dc: net.prefix(dc) for dc in NAMES}, root / "logs", seed)
    try:
        yield relays
    finally:
        relays.close()


def guest_wanted(seed: int, mode: str) -> bool:
    if mode == "never":
        return False
    from tests.harness.qemu import qemu_missing
    if qemu_missing() is not None:
        return False
    return mode == "always" or seed % GUEST_EVERY == 0


def run_seed(seed: int, workdir: Path, chaos_s: float, profile: str, guest_mode: str,
             keep: bool, wan: bool = False) -> dict[str, Any]:
    """One seed from a fresh network and federation to the checker's verdict; ``wan``:
    every DC's connections through its delay relay (bench/netns_wan.py)."""
    rng = random.Random(seed)
    guest = guest_wanted(seed, guest_mode)
    root = workdir / f"seed-{seed}"
    root.mkdir(parents=True)
    started = time.monotonic()
    result: dict[str, Any] = {"seed": seed, "guest": guest, "profile": profile, "wan": wan}
    mounted: list[Path] = []
    run: Run | None = None
    try:
        with BridgeNet(list(NAMES), PROFILES[profile],
                       name=f"dx{(os.getpid() + seed) % 10**6}") as net, \
                _relays(net, root, seed, wan) as relays, \
                _federation(root, net, guest, mounted, relays) as nodes:
            run = Run(seed, rng, nodes, net, root, guest, chaos_s, relays)
            nodes.api("dc1").ok("POST", "/api/policy", SetPolicy(100, (), (), False))
            vms = []
            for k in range(IMAGE_VMS):
                vm = f"img{k}"
                memory, disk = _image_vm(root / "images" / vm, rng)
                run.originals[vm] = {"memory": hashlib.sha256(memory.read_bytes()).hexdigest(),
                                     "disk-0": hashlib.sha256(disk.read_bytes()).hexdigest()}
                import_vm(nodes.api(rng.choice(NAMES)), vm, str(memory), (str(disk),))
                vms.append(vm)
            if guest:
                from tests.harness.qemu_nodes import create_guest, guest_console
                create_guest(nodes, "dc1", "g", root)
                run.stays.append(("dc1", 0, None))
                _wait("the guest's first checks", lambda: len(
                    guest_console(nodes, "g", ["dc1"]).checks) >= 2, BOOT_S, every=1.0)
                vms.append("g")
            schedule = make_schedule(rng, chaos_s, WAN_FAULTS if wan else FAULTS)
            seeds = {vm: rng.randrange(1 << 30) for vm in vms}
            began = time.monotonic()
            until = began + chaos_s
            workers = [threading.Thread(target=_migrator, daemon=True,
                                        args=(run, vm, random.Random(seeds[vm]), until))
                       for vm in vms]
            for w in workers:
                w.start()
            _chaos(run, schedule, began)
            _revive(run, "by the end of the chaos phase")
            for w in workers:
                w.join(timeout=max(0.0, until - time.monotonic()) + DECIDE_S)
            result.update(check_run(run))
            _revive(run, "during the checks")
            if run.exits:
                raise RunFailed(f"nodes exited on their own: {run.exits}")
            result["ok"] = True
    except RunFailed as exc:
        result.update(ok=False, error=str(exc))
    except Exception as exc:  # noqa: BLE001 - a harness step failed: reported as the seed's failure
        result.update(ok=False, error=f"{type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc(limit=6))
    finally:
        _umount(mounted)
    if run is not None:
        result.update(faults=run.faults, exits=run.exits, harness_errors=run.errors)
    result["seconds"] = round(time.monotonic() - started, 1)
    result["replay"] = replay_line(seed, chaos_s, profile, guest_mode, wan)
    if result["ok"] and not keep:
        shutil.rmtree(root, ignore_errors=True)
    else:
        result["kept"] = str(root)
    return result


def replay_line(seed: int, chaos_s: float, profile: str, guest_mode: str,
                wan: bool = False) -> str:
    extra = f" --chaos-seconds {chaos_s:g} --profile {profile} --guest {guest_mode}"
    extra += " --wan" if wan else ""
    return f"python -m bench.netns_chaos --seeds {seed}{extra}"


def parse_seeds(text: str) -> list[int]:
    try:
        if "-" in text:
            a, b = (int(x) for x in text.split("-", 1))
            if a > b:
                raise ValueError
            return list(range(a, b + 1))
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise SystemExit(f"--seeds {text!r}: A-B (A <= B) or a comma list of integers") \
            from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.netns_chaos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="1-100", help="A-B or a comma list (default 1-100)")
    p.add_argument("--chaos-seconds", type=float, default=30.0,
                   help="length of the fault-and-migration phase of each seed (default 30)")
    p.add_argument("--profile", choices=sorted(PROFILES), default="wan",
                   help="the links' tbf rates (default wan: " + ", ".join(
                       f"{dc} {r} Mbit/s" for dc, r in PROFILES["wan"].items()) + ")")
    p.add_argument("--guest", choices=("auto", "always", "never"), default="auto",
                   help=f"the QEMU guest: auto = in seeds divisible by {GUEST_EVERY} where "
                   "QEMU and the guest are installed")
    p.add_argument("--wan", action="store_true",
                   help="WAN latency: every DC's connections through a delay relay in its "
                   "namespace, 13-118 ms one way (bench/netns_wan.py), and relay kills "
                   "among the faults")
    p.add_argument("--keep", action="store_true", help="keep every seed's directory")
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    args = p.parse_args(argv)
    seeds = parse_seeds(args.seeds)
    if not args.chaos_seconds > 0:
        raise SystemExit(f"--chaos-seconds {args.chaos_seconds}: must be positive")
    missing = netns_missing()
    if missing is not None:
        print(f"netns-chaos: cannot run: {missing}", file=sys.stderr)
        return 2
    # SIGTERM ends the run as Ctrl-C does: the seed's nodes, QEMUs, namespaces and
    # mounts are taken down by the context managers on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix="dwcp-netns-chaos-"))
    started = time.monotonic()
    results = []
    for seed in seeds:
        r = run_seed(seed, workdir, args.chaos_seconds, args.profile, args.guest, args.keep,
                     args.wan)
        results.append(r)
        if r["ok"]:
            print(f"seed {seed}: ok in {r['seconds']} s: {r['migrations']} migrations "
                  f"({r['committed']} committed, {r['aborted']} aborted, {r['refused']} refused), "
                  f"{len(r['faults'])} faults{', guest' if r['guest'] else ''}", flush=True)
        else:
            print(f"FAIL seed {seed}: {r['error']}", flush=True)
            print(f"  replay: {r['replay']}", flush=True)
            print(f"  logs: {r.get('kept')}/logs; faults: {r.get('faults')}", flush=True)
    failed = [r for r in results if not r["ok"]]
    wall = time.monotonic() - started
    if not any(r.get("kept") for r in results):
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"netns-chaos: {len(results)} seeds, {len(failed)} failed, {wall:.1f}s", flush=True)
    if args.json:
        print(json.dumps({
            "seeds": [seeds[0], seeds[-1]], "runs": len(results), "failed": len(failed),
            "failures": [{k: r.get(k) for k in ("seed", "error", "replay", "kept", "faults")}
                         for r in failed],
            "migrations": sum(r.get("migrations", 0) for r in results),
            "committed": sum(r.get("committed", 0) for r in results),
            "aborted": sum(r.get("aborted", 0) for r in results),
            "refused": sum(r.get("refused", 0) for r in results),
            "faults": sum(len(r.get("faults") or []) for r in results),
            "fault_kinds": dict(sorted(collections.Counter(
                f.split()[1] for r in results for f in r.get("faults") or []).items())),
            "guest_seeds": sum(r["guest"] for r in results),
            "wall_seconds": round(wall, 1)}, sort_keys=True))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
