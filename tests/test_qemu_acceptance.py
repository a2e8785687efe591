"""Issue 17's acceptance on real node processes (slow: ``make chaos``, or ``pytest -m slow
tests/test_qemu_acceptance.py``): 20 live migrations of the self-checking guest between
four ``dwcp node`` processes, loopback and tbf: dc3 runs behind a veth pair shaped to
100 Mbit/s (``bench.netns.FarLink``), so every leg to or from it crosses the shaped link
and the others stay on this host's stack; every other migration goes to dc3 (or leaves
it). 5 of them are cancelled mid-way and 5 have ``kill -9`` of the source or the target
node (restarted at once) at a random moment of a random stage: in pre-copy, just after
the fence, as soon as the ledger committed and a little after the commit. After each the
ledgers agree on one owner, exactly one QEMU runs the guest (there: by the nodes' pid
files and by every ``qemu-system`` process on the host), and the guest's console, joined
across the DCs it ran at, counts on without a reboot or a gap and its memory and disk
checks keep passing. ``DWCP_ACCEPT_SEED`` replays a run (the seed is printed)."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from bench.netns import FarLink, netns_missing
from consensus.ledger import CancelMigration, SetPolicy
from federation.api.client import migrate_request
from federation.demo.qemu_guest.console import Console
from tests.harness.processes import NAMES, NodeProcesses
from tests.harness.qemu import qemu_missing
from tests.harness.qemu_nodes import (
    console_logs,
    create_guest,
    guest_console,
    qemu_nodes,
    qemu_process_list,
    qemu_processes,
    running_copies,
)

_NETNS = netns_missing()
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(qemu_missing() is not None, reason=str(qemu_missing())),
              pytest.mark.skipif(_NETNS is not None,
                                 reason=f"the tbf legs need network namespaces: {_NETNS}")]

MIGRATIONS, CANCELS, KILLS = 20, 5, 5
BOOT_S, DECIDE_S = 180.0, 240.0
#: The DC behind the 100 Mbit/s link.
FAR = "dc3"
#: Where in a migration the kills land, one each (shuffled): two at or after the commit.
KILL_MOMENTS = ("precopy", "fenced", "committed", "committed", "after")
#: A session's phases from the moment on (federation.migration.vocabulary.Phase).
_FROM = {"precopy": {"precopy", "fenced", "final", "verifying", "verified", "committed"},
         "fenced": {"fenced", "final", "verifying", "verified", "committed"},
         "committed": {"committed"}, "after": {"committed"}}


def _size(nodes: NodeProcesses, dc: str) -> int:
    path = console_logs(nodes, "g", [dc])[0]
    return path.stat().st_size if path.exists() else 0


def _state(nodes: NodeProcesses, mid: str, dc: str) -> tuple[str, str]:
    """(phase of ``dc``'s session, ledger state) of ``mid`` as ``dc`` sees it."""
    try:
        doc = nodes.api(dc).ok("GET", f"/api/migrations/{mid}")
    except Exception:  # noqa: BLE001 - not known there yet
        return "", ""
    return str(doc.get("phase", "")), str(doc.get("ledger", ""))


def _disturb(nodes: NodeProcesses, rng: random.Random, kind: str, moment: str, mid: str,
             src: str, dst: str) -> str:
    """Cancel the migration, or kill -9 its source or target at ``moment`` of it (a
    random delay inside the stage); what happened, for the run's summary."""
    api = nodes.api(src)
    if kind == "cancel":
        nodes.wait(f"{mid} under way", lambda: api.ok(
            "GET", f"/api/migrations/{mid}").get("phase") in ("precopy", "fenced", "final"))
        time.sleep(rng.uniform(0.0, 3.0))
        code, _ = api.call("POST", f"/api/migrations/{mid}/cancel", CancelMigration(mid))
        assert code in (202, 409), code  # 409: it had committed already
        return "cancel"
    if kind != "kill":
        return kind
    victim = rng.choice([src, dst])
    watcher = dst if victim == src else src
    bystander = next(n for n in NAMES if n not in (src, dst))

    def reached() -> str | None:
        phase, _ = _state(nodes, mid, watcher)
        _, ledger = _state(nodes, mid, bystander)
        if ledger == "aborted" or phase in ("aborted", "aborting"):
            return "aborted"
        if ledger == "committed" or phase in _FROM[moment]:
            return "committed" if ledger == "committed" else phase
        return None

    seen = nodes.wait(f"{mid} at {moment}", reached, DECIDE_S)
    time.sleep({"precopy": rng.uniform(0.0, 3.0), "fenced": rng.uniform(0.0, 0.3),
                "committed": 0.0, "after": rng.uniform(0.5, 3.0)}[moment])
    nodes.procs[victim].kill()
    nodes.procs[victim].wait()
    nodes.start(victim)
    nodes.wait(f"{victim} back", lambda: nodes.ready(victim), 120)
    return f"kill {'src' if victim == src else 'dst'} {victim}@{moment} (seen {seen})"


def _decided(nodes: NodeProcesses, mid: str, src: str, dst: str, what: str) -> str:
    """The owner every ledger agrees on once the migration has an outcome: the target if
    it committed, the source if it aborted (the outcome first: a snapshot of the four
    ledgers taken just before the commit executes still shows the source)."""
    def outcome() -> str | None:
        for dc in (src, dst):
            try:
                doc = nodes.api(dc).ok("GET", f"/api/migrations/{mid}")
            except Exception:  # noqa: BLE001 - a node restarting; asked again
                continue
            if doc.get("outcome"):
                return str(doc["outcome"]["outcome"])
        return None

    done = nodes.wait(f"{what} decided", outcome, DECIDE_S)
    owner = dst if done == "committed" else src
    nodes.wait(f"{what}: every ledger has {owner} as the owner", lambda: (
        (a := nodes.agreed("g")) and a["owner_epoch"][0] == owner), DECIDE_S)
    return owner


@pytest.mark.timeout(7200)  # 20 migrations of a TCG guest: 20-60 min on a shared machine
def test_twenty_migrations_with_cancels_and_kills_keep_the_guest_whole(
        tmp_path: Path) -> None:
    seed = int(os.environ.get("DWCP_ACCEPT_SEED", random.randrange(1 << 30)))
    print(f"replay: DWCP_ACCEPT_SEED={seed} pytest -m slow {__file__}")
    rng = random.Random(seed)
    kinds = ["plain"] * (MIGRATIONS - CANCELS - KILLS) + ["cancel"] * CANCELS + \
        ["kill"] * KILLS
    rng.shuffle(kinds)
    moments = list(KILL_MOMENTS)
    rng.shuffle(moments)
    with FarLink(100) as link, qemu_nodes(tmp_path, link, FAR) as nodes:
        nodes.api("dc1").ok("POST", "/api/policy", SetPolicy(100, (), (), False))
        create_guest(nodes, "dc1", "g", tmp_path)
        # (DC, where its stay starts in that DC's console, where it ends: None while there)
        runs: list[tuple[str, int, int | None]] = [("dc1", 0, None)]

        def console() -> Console:  # the guest's one serial line across the DCs it ran at
            return guest_console(nodes, "g", [d for d, _, _ in runs],
                                 [o for _, o, _ in runs], [e for _, _, e in runs])

        nodes.wait("the guest's first checks", lambda: len(console().checks) >= 2, BOOT_S)
        owner = "dc1"
        outcomes: list[str] = []
        for i, kind in enumerate(kinds):
            near = [n for n in NAMES if n not in (owner, FAR)]
            # legs 0, 1 of every 4 cross the shaped link (to FAR, then away from it),
            # legs 2, 3 stay on the host's stack, unless the guest is still at FAR
            dst = FAR if i % 4 < 2 and owner != FAR else rng.choice(near)
            via = "tbf" if FAR in (owner, dst) else "loopback"
            what = f"seed {seed}, migration {i} ({kind}, {owner}->{dst} over {via})"
            before = console()
            offset = _size(nodes, dst)
            api = nodes.api(owner)
            mid = api.ok("POST", "/api/migrations", migrate_request(api, "g", dst))["id"]
            done = _disturb(nodes, rng, kind, moments.pop() if kind == "kill" else "", mid,
                            owner, dst)
            new = _decided(nodes, mid, owner, dst, what)
            nodes.wait(f"the guest running at {new}",
                       lambda n=new: nodes.vm_here(n, "g") == "running", 120)
            if new != owner:  # the source's QEMU is retired: its stay there has ended
                runs[-1] = (owner, runs[-1][1], _size(nodes, owner))
                runs.append((new, offset, None))
            outcomes.append(f"{via} {done}: {'moved' if new != owner else 'stayed'}")
            print(f"{what}: {outcomes[-1]}", flush=True)
            owner = new
            nodes.wait(f"one QEMU of the guest, at {owner}",
                       lambda o=owner: running_copies(nodes, "g") == [o], 60)
            # and no other QEMU of it anywhere on the host, pid file or not
            try:
                nodes.wait(f"no QEMU of the guest but the one at {owner}",
                           lambda o=owner: qemu_processes(nodes, "g") == [o], 60)
            except AssertionError as exc:
                seen = [line for _, line in qemu_process_list(nodes, "g")]
                raise AssertionError(f"{what}: QEMUs of the guest: {seen}") from exc
            con = nodes.wait(f"the guest counting on and checking after {what}",
                             lambda b=before: (
                                 (c := console()).last_heartbeat >= b.last_heartbeat + 10
                                 and len(c.checks) > len(b.checks) and c), 180)
            assert con.boots == 1, f"{what}: a reboot"
            assert con.counter_gaps() == [], f"{what}: counter gaps {con.counter_gaps()[:3]}"
            assert not con.errors, f"{what}: {con.errors[:2]}"
        print(f"seed {seed}: {outcomes}")
        assert sum(o.endswith("moved") for o in outcomes) >= MIGRATIONS - CANCELS - KILLS
        for via in ("tbf", "loopback"):
            assert sum(o.startswith(via) for o in outcomes) >= 5, (via, outcomes)
        assert qemu_processes(nodes, "g") == [owner]
        nodes.stop_all()
