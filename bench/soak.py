"""``dwcp bench soak --minutes N --json``: four ``dwcp node`` processes on loopback for N
minutes under a steady operator workload, sampled for growth (issue 18 item 2).

What runs, all through the nodes' HTTP API as an operator does it
(:class:`federation.demo.processes.LocalFederation` starts the processes from a
federation ``dwcp federation init`` wrote):

- **migrations**: two image VMs (made of real data: this process's memory pages,
  :mod:`federation.demo.real_data`), imported at dc1 and dc2, each migrated round the
  ring of DCs one after the other (``--migrate-every`` seconds between two migrations
  of one VM): back and forth across every pair, v3 for every VM (the policy is set to
  100 % at start), so each DC keeps a retained copy of each VM and later migrations
  use it as their base;
- **a consensus load**: ``--load-rate`` ledger commands a second (an admin's
  ``SetPolicy``, each a signed operator request that PBFT orders and every replica
  executes and records), sent round the DCs that are up;
- **gossip**: SWIM membership and the link estimates run on their own all the time;
- **restarts**: every ``--restart-every`` minutes one DC (dc3, dc2, dc1, dc3, ...: each
  in turn but the ``--steady`` one, dc4 by default; the PBFT primary included) is
  stopped, alternately with SIGTERM and with ``kill -9``, and started again from its
  data directory; migrations pause around it (so a migration that fails is a failure,
  not a casualty of the restart), the load does not (it goes to the other DCs; PBFT
  keeps a quorum of 3). The steady DC runs as one process the whole run: its slope is
  not cut into lifetimes shorter than its caches take to fill.

Every ``--sample-every`` seconds (60), per node: RSS (``/proc/PID/status`` VmRSS), open
descriptors (``/proc/PID/fd``), CPU seconds (``/proc/PID/stat``), trio tasks (the node's
``dwcp_trio_tasks`` metric),
the SQLite files' size (``node.sqlite3`` with its WAL), its ``migration/<id>`` rows
(the persisted session records, deleted once the session is forgotten) and the data
directory's allocated size (``st_blocks``: images are sparse); and, at most every
CACHES_EVERY seconds, the node is asked (SIGUSR2) for a ``heap_report`` line, whose
``caches`` give each bounded cache's entries, cap and bytes. A sample is taken between
migrations (new ones wait for it, as for a restart), so it measures what stays, not
the tasks, descriptors and shadow copies of a migration in flight. A progress line per
sample goes to stderr.

Slopes (per hour, least squares): a restart starts a new process, so RSS, descriptors
and tasks are fitted with one common slope and one intercept per process lifetime
(the pooled within-lifetime estimator), over the samples of a process that has run
at least ``--warmup-minutes``; the disk outlives restarts, so its slope is fitted per
data directory over the samples after the warm-up from the run's start. The JSON's
top-level slopes pool all four nodes; ``per_node`` has each node's own; ``steady`` the
never-restarted DC's RSS slope over the whole run after its warm-up, its glibc bytes in
use, and what each of its caches grew by against the RSS growth (``unexplained_mib``:
the growth no cache or ledger record accounts for).
``cpu_percent_per_hour`` (a diagnostic, no bound) is the slope of each node's CPU use
between two samples: the same load costing more as the history grows.

Every log line the nodes wrote whose event is in :data:`ERROR_EVENTS`, every stderr
line that is not a JSON log line (a traceback), and a SIGTERM exit status other than
0 are errors: they fail ``ok``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
import tracemalloc
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import trio

from bench.measure import cpu_seconds, open_fds, rss_mib
from consensus.ledger import SetPolicy
from consensus.ledger_commands import MAX_REMEMBERED
from federation.api.client import ClientError, import_vm, migrate_request
from federation.cli.main import CommandError
from federation.demo.processes import DemoFailed, LocalFederation, NodeProcess
from federation.demo.real_data import write_process_memory
from federation.demo.scenario import Demo
from federation.node import heap_report
from federation.node.assembly import ENDED_KEEP_MAX, ENDED_SWEEP_SECONDS

__all__ = ["register", "pooled_slope", "run_soak", "ERROR_EVENTS", "record_bytes"]

MIB = 1 << 20
#: Log events that say something went wrong (docs/operations.md, "Logs"). Not among
#: them: ``dial_failed``, ``peer_down``, ``link_*``, ``member`` notifications — what a
#: restart of a peer normally causes.
ERROR_EVENTS = frozenset({
    "core_failed", "api_error", "connection_failed", "ws_protocol_error", "bad_message",
    "unrouted", "send_invalid", "channel_refused", "handshake_failed", "peer_mismatch",
    "accept_backoff", "round_failed", "vm_reconcile_failed", "vm_resume_failed",
    "vm_import_failed", "vm_staged_kept", "records_kept",
})
#: Log events the harness keeps (what waiting on a node needs); the others are counted
#: and dropped, so an hour of logs does not fill the soak's own memory.
_KEEP = frozenset({"listening", "node_ready", "peer_up", "peer_down", "link_replaced",
                   "signal", "stopped"}) | ERROR_EVENTS
#: The two VMs: their memory and disk sizes (MiB of this process's memory pages).
VMS = {"soak-a": "dc1", "soak-b": "dc2"}
VM_MEMORY_MIB, VM_DISK_MIB = 8, 2
#: A migration of an 8 MiB VM takes a few seconds on a loaded 2-core machine; one that
#: has not ended after this long is counted failed.
MIGRATION_BUDGET = 120.0
#: Startup of four interpreters on a loaded machine took up to ~12 s (the demo's
#: measurement); a restarted node also replays its log and catches up.
START_BUDGET = 90.0
#: How long a restart waits for the migrations in flight to end.
PAUSE_BUDGET = MIGRATION_BUDGET + 30.0
POLL = 0.25

# Bounds (``bounds`` in the JSON; :meth:`Soak.bounds` says each term). What a node may
# grow by is of two kinds:
#
# - **a rate**: the one structure kept for good, the ledger's migration records (every
#   replica keeps a record per migration ever begun): the run's migrations per hour times
#   a record's bytes, measured in the nodes (``heap_report``'s ``caches``:
#   ``ledger_migrations`` bytes / entries); on disk the record's encoding
#   (:func:`record_bytes`) times RECORD_FACTOR (the snapshot beside the log, the log's
#   copy, SQLite's pages);
# - **a one-time allowance**: each bounded cache once full, its bytes per entry measured
#   in the nodes times its cap (``heap_report``'s ``caches``; the largest over the
#   nodes' last reports): the request book (16,384), the replica's verifier (8,192), the
#   signature memo (8,192), the gossip statements (1,024 at 4 DCs), the client replies,
#   the result memo, the ended sessions (1,000). On disk: the request book and the ended
#   sessions' persisted records (deleted once forgotten, federation.node.assembly), at
#   their encodings times RECORD_FACTOR.
#
# A least-squares slope over a span of L hours of a one-time growth of A MiB is at most
# STEP_FACTOR * A / L (the worst case: all of it at once in the middle of the span), so
# a slope's bound is STEP_FACTOR * A / L + the rate + a slack for the allocator (glibc's
# free lists move by +-10 MiB between two samples) and the noise of a slope under load.
# For a run long enough the allowance term vanishes: ``long_run`` is the bound then.
RECORD_FACTOR = 3.0
STEP_FACTOR = 1.5
RSS_SLACK_MIB_PER_HOUR = 8.0
DISK_SLACK_MIB_PER_HOUR = 4.0
#: A node is asked for its heap report (its caches) at a sample at most this often, so
#: a short run sampling every few seconds does not spend the nodes' CPU on it (each is a
#: gc pass and a walk of the caches); with --heap-report, at every sample.
CACHES_EVERY = 30.0
#: The DC the soak never restarts by default (``--steady``): not the first PBFT primary
#: (dc1), so the primary is still restarted in turn with the others.
STEADY = "dc4"
#: Descriptors and tasks have no reason to grow: a migration in flight holds a few of
#: each, and a sample that lands on one sees them; a leak of one per migration (the
#: soak runs ~700 an hour) or per restart would be far above these.
FDS_PER_HOUR_BOUND = 6.0
TASKS_PER_HOUR_BOUND = 30.0


# --------------------------------------------------------------------------- statistics


def pooled_slope(segments: list[list[tuple[float, float]]]) -> float | None:
    """The least-squares slope common to ``segments`` (lists of (t, y)), each with its own
    intercept: sum (t - mean t)(y - mean y) / sum (t - mean t)^2 within each segment.
    None when no segment has two distinct times."""
    num = den = 0.0
    for seg in segments:
        if len(seg) < 2:
            continue
        mt = sum(t for t, _ in seg) / len(seg)
        my = sum(y for _, y in seg) / len(seg)
        num += sum((t - mt) * (y - my) for t, y in seg)
        den += sum((t - mt) ** 2 for t, _ in seg)
    return num / den if den > 0 else None


def record_bytes(count: int = 2000) -> dict[str, float]:
    """Bytes per record the soak makes, measured: the Python memory of ``count`` request
    records in a :class:`consensus.operator_requests.RequestBook`, of ``count`` migration
    records in a dict, and of ``count`` ended sessions as a node keeps them (the session
    rebuilt from its persisted record, its last progress and its outcome; tracemalloc),
    and the wire encodings of the two ledger records and of a session's record."""
    from consensus.authz import Authorization
    from consensus.ledger_commands import MigrationRecord, RequestRecord
    from consensus.operator_requests import RequestBook
    from federation.migration.restore import restore
    from federation.migration.vocabulary import ImageSize, Outcome, Progress, SessionRecord
    from mesh import wire

    def request(i: int) -> RequestRecord:
        return RequestRecord("admin", f"{i:032x}", 1.8e9 + i, bytes(32), "SetPolicy", "",
                             bytes(24))

    def migration(i: int) -> MigrationRecord:
        return MigrationRecord(f"soak-a-dc1-dc2-{i:08x}", "soak-a", "dc1", "dc2", i,
                               "committed", bytes(32), bytes(32), 1.8e9 + i, 3, "", "")

    def session(i: int) -> bytes:
        # a source's: the operator's signed request rides along (~300 B as the API signs)
        return wire.encode(SessionRecord(
            f"soak-a-dc1-dc2-{i:08x}", "source", "dc1", "soak-a", "dc1", "dc2", i,
            "committed", 3, 3, (1, 3), (ImageSize("memory", 2048), ImageSize("disk-0", 512)),
            True, True, bytes(32), 30, 0.3, "", 10 << 20, 3 << 20,
            Authorization(bytes(240), bytes(60))))

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        book = RequestBook()
        for i in range(count):
            book.add(request(i))
        mid = tracemalloc.get_traced_memory()[0]
        migs = {f"m{i}": migration(i) for i in range(count)}
        after = tracemalloc.get_traced_memory()[0]
        kept: dict[str, tuple[Any, Progress, Outcome]] = {}
        for i in range(count):
            mid_i = f"soak-a-dc1-dc2-{i:08x}"
            s, _ = restore(session(i), None, 0.0)
            kept[mid_i] = (s, Progress(mid_i, "soak-a", "source", "committed", 3, 10 << 20,
                                       3 << 20, 0.0, 1e7, 0.0, 2560, 0),
                           Outcome(mid_i, "soak-a", "source", "committed", "", 3, 10 << 20,
                                   3 << 20, 0.1))
        sessions = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del book, migs, kept
    return {
        "request_memory": (mid - before) / count,
        "migration_memory": (after - mid) / count,
        "session_memory": (sessions - after) / count,
        "request_wire": float(len(wire.encode_struct(request(0)))),
        "migration_wire": float(len(wire.encode_struct(migration(0)))),
        "session_wire": float(len(session(0))),
    }


# --------------------------------------------------------------------------- processes


class SoakNode(NodeProcess):
    """A node whose log lines are counted and written to its log file, errors kept, and
    only the events waiting needs retained in memory."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lines = 0
        self.errors: list[str] = []
        self.down = False  # stopped by the soak, not yet ready again
        #: the node's ``heap_report`` lines, one a sample: their summaries
        self.heap_reports: list[dict[str, Any]] = []
        self.incarnation = 0
        #: the soak's start (trio clock), once set: a report's ``t_s`` counts from it
        self.t0: float | None = None

    def _on_line(self, line: str) -> None:
        self.lines += 1
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or "event" not in record:
            if line.strip():
                self.errors.append(f"{self.name}: {line}")
        elif record["event"] in ERROR_EVENTS:
            self.errors.append(f"{self.name}: {line}")
        elif record["event"] == "heap_report":
            t_s = None if self.t0 is None else trio.current_time() - self.t0
            self.heap_reports.append(_heap_summary(record, self.incarnation, t_s))
        if isinstance(record, dict) and record.get("event") not in _KEEP:
            if self.log_path is not None:  # every line in the log file, as the demo's
                with self.log_path.open("a", encoding="utf-8") as f:
                    f.write(line + "\n")
            self._wake()
            return
        super()._on_line(line)
        if len(self.other_lines) > 100:
            del self.other_lines[:-100]


def _heap_summary(record: dict[str, Any], incarnation: int,
                  t_s: float | None = None) -> dict[str, Any]:
    """What the soak's JSON keeps of a node's ``heap_report`` line: its figures in MiB,
    its caches (``[entries, cap, bytes]``) and its few most grown types and tracebacks
    (the full line is in the node's log). ``t_s``: when it came, from the soak's start."""
    smaps, malloc = record.get("smaps") or {}, record.get("malloc") or {}
    traced = record.get("traced") or {}
    return {
        "ts": record.get("ts"), "t_s": None if t_s is None else round(t_s, 2),
        "incarnation": incarnation, "n": record.get("n"),
        "caches": record.get("caches") or {},
        "anon_mib": round(smaps.get("Anonymous", 0) / 1024, 2),
        "malloc_in_use_mib": round(malloc.get("in_use", 0) / MIB, 2),
        "malloc_free_mib": round(malloc.get("free", 0) / MIB, 2),
        "arenas": len(malloc.get("arenas") or []),
        "arenas_mib": round(sum(a[0] for a in malloc.get("arenas") or []) / MIB, 2),
        "traced_mib": round(traced.get("total", 0) / MIB, 2),
        "objects": (record.get("objects") or {}).get("total"),
        "types_grown": ((record.get("objects") or {}).get("grown") or [])[:5],
        "traced_grown": [[g["grew"], g["at"][-3:]] for g in (traced.get("grown") or [])[:5]],
    }


def _anon_mib(pid: int) -> float | None:
    """``pid``'s anonymous resident memory (heap, arenas, stacks), from smaps_rollup."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
            for line in f:
                if line.startswith("Anonymous:"):
                    return int(line.split()[1]) / 1024
    except (OSError, IndexError, ValueError):
        return None
    return None


def _proc_figures(pid: int) -> tuple[float, int, float] | None:
    """(RSS in MiB, open descriptors, CPU seconds used) of ``pid``; None if it is gone."""
    rss, fds, cpu = rss_mib(pid), open_fds(pid), cpu_seconds(pid)
    return None if rss is None or fds is None or cpu is None else (rss, fds, cpu)


def _allocated(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                continue  # removed while we walked (a work copy renamed, a WAL checkpointed)
    return total


def _sqlite_bytes(data: Path) -> int:
    total = 0
    for suffix in ("", "-wal", "-shm"):
        try:
            total += (data / f"node.sqlite3{suffix}").stat().st_size
        except FileNotFoundError:
            continue
    return total


def _migration_rows(data: Path) -> int | None:
    """The node's persisted ``migration/<id>`` records (a read-only look at its
    ``node.sqlite3``; a WAL reader does not stop the node's writes); None if unreadable."""
    try:
        db = sqlite3.connect(f"file:{data / 'node.sqlite3'}?mode=ro", uri=True, timeout=5.0)
        try:
            row = db.execute("SELECT count(*) FROM kv WHERE key >= 'migration/' "
                             "AND key < 'migration0'").fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return None
    return int(row[0])


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


# --------------------------------------------------------------------------- the soak


class Soak:
    def __init__(self, fed: LocalFederation, directory: Path, args: argparse.Namespace) -> None:
        self.fed = fed
        self.directory = directory
        self.args = args
        self.demo = Demo(fed, directory, DemoFailed)
        self.t0 = 0.0
        self.samples: list[dict[str, Any]] = []
        self.incarnation = {dc: 0 for dc in fed.nodes}
        self.started_at = {dc: 0.0 for dc in fed.nodes}
        self.migrations = {"committed": 0, "failed": 0}
        self.migration_failures: list[str] = []
        self.commands = {"committed": 0, "pending": 0, "refused": 0, "unreachable": 0}
        self.command_errors: list[str] = []
        self.restarts: list[dict[str, Any]] = []
        self.problems: list[str] = []
        self.pausers = 0  # restarts and samples under way: migrations wait for them
        #: when each node was last asked for a heap report (its caches)
        self._reported: dict[str, float] = {}
        self.in_flight = 0
        self.changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.failure: str | None = None

    @property
    def nodes(self) -> dict[str, SoakNode]:
        return self.fed.nodes  # type: ignore[return-value]

    def now(self) -> float:
        return trio.current_time() - self.t0

    def _poke(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    # ---------------------------------------------------------------- setup

    async def setup(self, nursery: trio.Nursery) -> None:
        await self.fed.start_all(nursery)
        self.t0 = trio.current_time()
        for dc in self.nodes:
            self.started_at[dc] = 0.0
            self.nodes[dc].t0 = self.t0
        images = self.directory / "images"
        for vm in VMS:
            await trio.to_thread.run_sync(write_process_memory, images / f"{vm}-memory.img",
                                          VM_MEMORY_MIB * MIB)
            await trio.to_thread.run_sync(write_process_memory, images / f"{vm}-disk.img",
                                          VM_DISK_MIB * MIB)
        deadline = trio.current_time() + START_BUDGET
        await self.fed.wait_full_mesh(deadline)
        await self.demo.wait_ready(deadline)
        await self.demo.post("dc1", "/api/policy", SetPolicy(100, (), (), False))
        for vm, dc in VMS.items():
            try:
                await trio.to_thread.run_sync(
                    import_vm, self.demo.apis[dc], vm, str(images / f"{vm}-memory.img"),
                    (str(images / f"{vm}-disk.img"),))
            except (ClientError, CommandError) as exc:
                raise DemoFailed(f"{dc}: importing {vm}: {exc}") from None

    # ---------------------------------------------------------------- migrations

    async def _gate(self) -> None:
        while self.pausers:
            await self.changed.wait()
        self.in_flight += 1

    @contextlib.asynccontextmanager
    async def _between_migrations(self, what: str) -> AsyncIterator[None]:
        """Hold new migrations back and wait for those in flight to end (a restart does
        not cut one short; a sample does not see the transient tasks, descriptors and
        shadow copies of one)."""
        self.pausers += 1
        try:
            with trio.move_on_after(PAUSE_BUDGET):
                while self.in_flight:
                    await self.changed.wait()
            if self.in_flight:
                self.problems.append(f"{self.now():.0f}s: {what} with {self.in_flight} "
                                     "migrations still in flight")
            yield
        finally:
            self.pausers -= 1
            self._poke()

    def _release(self) -> None:
        self.in_flight -= 1
        self._poke()

    async def migrator(self, vm: str, first_owner: str, until: float) -> None:
        ring = list(self.nodes)
        owner = first_owner
        while trio.current_time() < until:
            await self._gate()
            try:
                target = ring[(ring.index(owner) + 1) % len(ring)]
                if await self._migrate(vm, owner, target):
                    owner = target
                else:
                    owner = await self._owner(vm, owner)
            finally:
                self._release()
            await trio.sleep(self.args.migrate_every)

    async def _owner(self, vm: str, guess: str) -> str:
        try:
            vms = await trio.to_thread.run_sync(self.demo.apis[guess].ok, "GET", "/api/vms")
        except (ClientError, CommandError):
            return guess
        found = next((v for v in vms if v["name"] == vm), None)
        return str(found["owner"]) if found and found["owner"] else guess

    async def _migrate(self, vm: str, src: str, dst: str) -> bool:
        api = self.demo.apis[src]
        began = trio.current_time()
        try:
            intent = await trio.to_thread.run_sync(migrate_request, api, vm, dst)
            mid = (await trio.to_thread.run_sync(api.ok, "POST", "/api/migrations",
                                                 intent))["id"]
            path = f"/api/migrations/{urllib.parse.quote(mid)}"
            while True:
                doc = await trio.to_thread.run_sync(api.ok, "GET", path)
                if doc.get("outcome") is not None:
                    break
                if trio.current_time() - began > MIGRATION_BUDGET:
                    raise DemoFailed(f"did not end in {MIGRATION_BUDGET:.0f} s (phase "
                                     f"{doc.get('phase')}, round {doc.get('round')})")
                await trio.sleep(POLL)
        except (ClientError, CommandError, DemoFailed) as exc:
            self._failed(vm, src, dst, str(exc))
            return False
        out = doc["outcome"]
        if out["outcome"] != "committed":
            self._failed(vm, src, dst, f"{mid} {out['outcome']}: {out.get('reason')}")
            return False
        self.migrations["committed"] += 1
        return True

    def _failed(self, vm: str, src: str, dst: str, why: str) -> None:
        self.migrations["failed"] += 1
        self.migration_failures.append(f"{self.now():.0f}s {vm} {src}->{dst}: {why}")

    # ---------------------------------------------------------------- consensus load

    async def loader(self, index: int, until: float) -> None:
        """One of the load's callers: a command every ``loaders / rate`` seconds."""
        period = self.args.loaders / self.args.load_rate
        names = list(self.nodes)
        k = index
        next_at = trio.current_time()
        while trio.current_time() < until:
            up = [dc for dc in names if not self.nodes[dc].down]
            dc = up[k % len(up)]
            k += 1
            api = self.demo.apis[dc]
            try:
                code, doc = await trio.to_thread.run_sync(
                    api.call, "POST", "/api/policy", SetPolicy(100, (), (), False))
            except (ClientError, CommandError) as exc:
                if self.nodes[dc].down:  # stopped between the choice and the call
                    self.commands["unreachable"] += 1
                else:
                    self.commands["unreachable"] += 1
                    self._command_error(f"{dc}: {exc}")
            else:
                if code == 200:
                    self.commands["committed"] += 1
                elif code == 202 and isinstance(doc, dict) and doc.get("pending"):
                    self.commands["pending"] += 1
                else:
                    self.commands["refused"] += 1
                    self._command_error(f"{dc}: HTTP {code} {doc}")
            next_at = max(next_at + period, trio.current_time())
            await trio.sleep_until(next_at)

    def _command_error(self, what: str) -> None:
        if len(self.command_errors) < 50:
            self.command_errors.append(f"{self.now():.0f}s {what}")

    # ---------------------------------------------------------------- restarts

    async def restarter(self, until: float) -> None:
        order = [dc for dc in reversed(list(self.nodes)) if dc != self.args.steady]
        k = 0
        every = self.args.restart_every * 60
        next_at = trio.current_time() + every
        while next_at < until - 5:
            await trio.sleep_until(next_at)
            dc = order[k % len(order)]
            how = "SIGTERM" if k % 2 == 0 else "SIGKILL"
            k += 1
            await self._restart(dc, how)
            next_at += every

    async def _restart(self, dc: str, how: str) -> None:
        async with self._between_migrations(f"restarting {dc}"):
            node = self.nodes[dc]
            at = self.now()
            node.down = True
            try:
                if how == "SIGTERM":
                    node.terminate(signal.SIGTERM)
                else:
                    node.kill()
                await node.wait_for(f"exit after {how}", node.exited,
                                    trio.current_time() + 60)
                code = node.returncode
                if how == "SIGTERM" and code != 0:
                    self.problems.append(f"{self.now():.0f}s: {dc} exited {code} after "
                                         "SIGTERM")
                stopped = self.now()
                self.incarnation[dc] += 1
                node.incarnation = self.incarnation[dc]
                self.started_at[dc] = self.now()
                assert self._nursery is not None
                await node.start(self._nursery)
                ready = await self._wait_back(dc)
            finally:
                node.down = False
            self.restarts.append({"dc": dc, "how": how, "at_s": round(at, 1),
                                  "exit_code": code, "down_s": round(stopped - at, 2),
                                  "ready_after_s": None if ready is None else round(ready, 2)})

    async def _wait_back(self, dc: str) -> float | None:
        """Seconds from the start until ``dc`` is ready with a full mesh again."""
        began = trio.current_time()
        deadline = began + START_BUDGET
        try:
            await self.fed.wait_full_mesh(deadline)
            api = self.demo.apis[dc]
            while True:
                try:
                    code, _ = await trio.to_thread.run_sync(api.call, "GET", "/ready")
                except (ClientError, CommandError):
                    code = 0
                if code == 200:
                    return trio.current_time() - began
                if trio.current_time() > deadline:
                    raise DemoFailed(f"{dc} not ready {START_BUDGET:.0f} s after its restart")
                await trio.sleep(POLL)
        except DemoFailed as exc:
            self.problems.append(f"{self.now():.0f}s: {exc}")
            return None

    # ---------------------------------------------------------------- sampling

    async def sampler(self, until: float) -> None:
        every = self.args.sample_every
        next_at = trio.current_time()
        while True:
            async with self._between_migrations("sampling"):
                await self._sample()
            self._progress()
            next_at += every
            if next_at > until:
                return
            await trio.sleep_until(next_at)

    async def _sample(self) -> None:
        t = self.now()
        for dc, node in self.nodes.items():
            proc = node.process
            if proc is None or node.returncode is not None or node.down:
                continue
            figures = _proc_figures(proc.pid)
            if figures is None:
                continue
            tasks = None
            try:
                code, raw = await trio.to_thread.run_sync(
                    self.demo.apis[dc].request, "GET", "/metrics")
                if code == 200:
                    tasks = _metric(raw.decode(), "dwcp_trio_tasks")
            except ClientError:
                pass  # the node is between lives; the sample has no task count
            anon = _anon_mib(proc.pid)
            if (getattr(self.args, "heap_report", None) is not None
                    or t - self._reported.get(dc, -math.inf) >= CACHES_EVERY):
                self._reported[dc] = t
                with contextlib.suppress(ProcessLookupError):  # what its caches hold
                    os.kill(proc.pid, signal.SIGUSR2)  # its heap_report line follows
            data = self.fed.config_path.parent / "data" / dc
            disk = await trio.to_thread.run_sync(_allocated, data)
            self.samples.append({
                "t_s": round(t, 2), "dc": dc, "pid": proc.pid,
                "incarnation": self.incarnation[dc],
                "up_s": round(t - self.started_at[dc], 2),
                "rss_mib": round(figures[0], 2),
                "anon_mib": None if anon is None else round(anon, 2), "fds": figures[1],
                "cpu_s": round(figures[2], 2),
                "trio_tasks": None if tasks is None else int(tasks),
                "sqlite_mib": round(_sqlite_bytes(data) / MIB, 3),
                "migration_rows": await trio.to_thread.run_sync(_migration_rows, data),
                "data_dir_mib": round(disk / MIB, 3),
            })

    def _progress(self) -> None:
        t = self.now()
        last = {s["dc"]: s for s in self.samples if s["t_s"] >= t - 1}
        per = " ".join(f"{dc}:{s['rss_mib']:.0f}M/{s['fds']}fd/{s['trio_tasks']}t/"
                       f"{s['data_dir_mib']:.1f}M" for dc, s in sorted(last.items()))
        errors = sum(len(n.errors) for n in self.nodes.values())
        c = self.commands
        print(f"soak {t / 60:5.1f}/{self.args.minutes:g} min: migrations "
              f"{self.migrations['committed']} ok {self.migrations['failed']} failed; "
              f"commands {c['committed']} (pending {c['pending']}, refused {c['refused']}, "
              f"unreachable {c['unreachable']}); restarts {len(self.restarts)}; "
              f"errors {errors}; {per}", file=sys.stderr, flush=True)

    # ---------------------------------------------------------------- run

    async def run(self) -> None:
        """The soak; a step that did not happen in time ends it (``failure``)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            with trio.CancelScope() as scope:
                nursery.start_soon(self._on_signal, scope)
                try:
                    await self._run(nursery)
                except* DemoFailed as group:  # from a step in any task: kept as the failure
                    self.failure = str(group.exceptions[0])
                finally:
                    self.fed.kill_all()
            nursery.cancel_scope.cancel()  # the signal watcher and the log readers

    async def _on_signal(self, scope: trio.CancelScope) -> None:
        """SIGTERM or SIGINT ends the soak early: every node is killed and the JSON says
        so (a soak killed outright would leave its four nodes running)."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                self.failure = f"stopped by {signal.Signals(signum).name}"
                scope.cancel()
                return

    async def _run(self, nursery: trio.Nursery) -> None:
        await self.setup(nursery)
        until = trio.current_time() + self.args.minutes * 60
        async with trio.open_nursery() as work:
            for vm, dc in VMS.items():
                work.start_soon(self.migrator, vm, dc, until)
            for i in range(self.args.loaders):
                work.start_soon(self.loader, i, until)
            work.start_soon(self.restarter, until)
            work.start_soon(self.sampler, until)
        await self.fed.stop_all(trio.current_time() + 60)
        for dc, node in self.nodes.items():
            if node.returncode != 0:
                self.problems.append(f"{dc} exited {node.returncode} after the "
                                     "final SIGTERM")

    # ---------------------------------------------------------------- report

    def slopes(self, samples: list[dict[str, Any]]) -> dict[str, float | None]:
        warm = self.args.warmup_minutes * 60
        lives: dict[tuple[str, int], list[dict[str, Any]]] = {}
        disks: dict[str, list[dict[str, Any]]] = {}
        for s in samples:
            if s["up_s"] >= warm:
                lives.setdefault((s["dc"], s["incarnation"]), []).append(s)
            if s["t_s"] >= warm:
                disks.setdefault(s["dc"], []).append(s)

        def per_hour(groups: list[list[dict[str, Any]]], key: str) -> float | None:
            segs = [[(s["t_s"], float(s[key])) for s in g if s[key] is not None]
                    for g in groups]
            slope = pooled_slope(segs)
            return None if slope is None else round(slope * 3600, 3)

        busy = [[{"t_s": b["t_s"], "cpu_percent": 100 * (b["cpu_s"] - a["cpu_s"])
                  / (b["t_s"] - a["t_s"])} for a, b in itertools.pairwise(g)
                 if b["t_s"] > a["t_s"]] for g in lives.values()]
        return {
            "rss_mib_per_hour": per_hour(list(lives.values()), "rss_mib"),
            # a diagnostic: the anonymous part of RSS (heap and arenas, not mapped files)
            "anon_mib_per_hour": per_hour(list(lives.values()), "anon_mib"),
            "fds_per_hour": per_hour(list(lives.values()), "fds"),
            "tasks_per_hour": per_hour(list(lives.values()), "trio_tasks"),
            "disk_mib_per_hour": per_hour(list(disks.values()), "data_dir_mib"),
            "sqlite_mib_per_hour": per_hour(list(disks.values()), "sqlite_mib"),
            # a diagnostic, no bound: a node whose work per command grows with its history
            # (a scan over every migration ever, say) uses more CPU for the same load
            "cpu_percent_per_hour": per_hour(busy, "cpu_percent"),
        }

    def lifetimes(self, samples: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        """The samples of each process lifetime once it has run the warm-up."""
        warm = self.args.warmup_minutes * 60
        lives: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for s in samples:
            if s["up_s"] >= warm:
                lives.setdefault((s["dc"], s["incarnation"]), []).append(s)
        return list(lives.values())

    def caches(self) -> dict[str, dict[str, Any]]:
        """Each cache of the nodes' last heap reports (``[entries, cap, bytes]``):
        its bytes per entry and, for a capped one, its size once full in MiB (bytes per
        entry times the cap), the largest over the nodes, with the node it is from."""
        out: dict[str, dict[str, Any]] = {}
        for dc, node in self.nodes.items():
            last = next((r for r in reversed(node.heap_reports) if r["caches"]), None)
            if last is None:
                continue
            for name, (entries, cap, size) in last["caches"].items():
                if not entries:
                    continue
                per = size / entries
                full = None if cap is None else round(per * cap / MIB, 3)
                seen = out.get(name)
                if seen is None or (full or per) > (seen["full_mib"] or seen["bytes_per_entry"]):
                    out[name] = {"dc": dc, "entries": entries, "cap": cap,
                                 "mib": round(size / MIB, 3),
                                 "bytes_per_entry": round(per, 1), "full_mib": full}
        return out

    def steady(self) -> dict[str, Any] | None:
        """The DC never restarted (``--steady``): its RSS slope over the whole run after
        the warm-up, its glibc bytes in use, and what each of its caches grew by in that
        span (heap reports), against the RSS it grew by."""
        dc = self.args.steady
        if dc is None or dc not in self.nodes:
            return None
        warm = self.args.warmup_minutes * 60
        seg = [s for s in self.samples if s["dc"] == dc and s["incarnation"] == 0
               and s["up_s"] >= warm]
        if len(seg) < 2:
            return None
        span_h = (seg[-1]["t_s"] - seg[0]["t_s"]) / 3600

        def slope(points: list[tuple[float, float]]) -> float | None:
            b = pooled_slope([points])
            return None if b is None else round(b * 3600, 3)

        rss = slope([(s["t_s"], s["rss_mib"]) for s in seg])
        reports = [r for r in self.nodes[dc].heap_reports if r["incarnation"] == 0
                   and r["t_s"] is not None and r["t_s"] >= warm and r["caches"]]
        grew: dict[str, float] = {}
        if len(reports) >= 2:
            first, last = reports[0]["caches"], reports[-1]["caches"]
            grew = {name: round((last[name][2] - first.get(name, [0, 0, 0])[2]) / MIB, 3)
                    for name in last}
        rss_growth = None if rss is None else round(rss * span_h, 3)
        explained = round(sum(grew.values()), 3)
        return {
            "dc": dc, "pid": seg[0]["pid"], "from_s": seg[0]["t_s"], "to_s": seg[-1]["t_s"],
            "samples": len(seg), "rss_mib_per_hour": rss,
            "anon_mib_per_hour": slope([(s["t_s"], s["anon_mib"]) for s in seg
                                        if s["anon_mib"] is not None]),
            "malloc_in_use_mib_per_hour": slope([(r["t_s"], r["malloc_in_use_mib"])
                                                 for r in reports]),
            "rss_mib": [seg[0]["rss_mib"], seg[-1]["rss_mib"]],
            "malloc_in_use_mib": ([reports[0]["malloc_in_use_mib"],
                                   reports[-1]["malloc_in_use_mib"]] if reports else None),
            "caches_grew_mib": grew,
            # the slope's growth over the span, less what the caches and the ledger's
            # records grew by (deep_size, Python objects only): what nothing here explains
            "rss_growth_mib": rss_growth,
            "unexplained_mib": None if rss_growth is None else round(rss_growth - explained, 3),
        }

    def bounds(self, sizes: dict[str, float], migrations_per_hour: float,
               caches: dict[str, dict[str, Any]], steady: dict[str, Any] | None,
               ) -> dict[str, Any]:
        """The bounds of the slopes, each term named (the comment above RECORD_FACTOR)."""
        lives = self.lifetimes(self.samples)
        # sum w_i / L_i / sum w_i over the lifetimes, w_i = sum (t - mean t)^2: the
        # pooled slope weighs each lifetime's own slope so
        num = den = 0.0
        for g in lives:
            ts = [s["t_s"] for s in g]
            if len(ts) < 2 or ts[-1] <= ts[0]:
                continue
            mt = sum(ts) / len(ts)
            w = sum((t - mt) ** 2 for t in ts)
            num += w / ((ts[-1] - ts[0]) / 3600)
            den += w
        per_hour_pooled = num / den if den else None
        allowance = sum(c["full_mib"] for c in caches.values() if c["full_mib"] is not None)
        ledger = caches.get("ledger_migrations")
        record = ledger["bytes_per_entry"] if ledger else sizes["migration_memory"]
        rate = migrations_per_hour * record / MIB
        warm = self.args.warmup_minutes * 60
        disk_times = [s["t_s"] for s in self.samples if s["t_s"] >= warm]
        disk_span_h = max(max(disk_times, default=0) - min(disk_times, default=0), 60.0) / 3600
        disk_allowance = RECORD_FACTOR * (MAX_REMEMBERED * sizes["request_wire"]
                                          + ENDED_KEEP_MAX * sizes["session_wire"]) / MIB
        disk_rate = RECORD_FACTOR * migrations_per_hour * sizes["migration_wire"] / MIB

        def bound(allowance_mib: float, per_hour: float | None, rate_mib: float,
                  slack: float) -> float | None:
            if per_hour is None:
                return None
            return round(STEP_FACTOR * allowance_mib * per_hour + rate_mib + slack, 3)

        steady_per_hour = None
        if steady is not None and steady["to_s"] > steady["from_s"]:
            steady_per_hour = 3600 / (steady["to_s"] - steady["from_s"])
        return {
            "rss_mib_per_hour": bound(allowance, per_hour_pooled, rate,
                                      RSS_SLACK_MIB_PER_HOUR),
            "steady_rss_mib_per_hour": bound(allowance, steady_per_hour, rate,
                                             RSS_SLACK_MIB_PER_HOUR),
            "fds_per_hour": FDS_PER_HOUR_BOUND,
            "tasks_per_hour": TASKS_PER_HOUR_BOUND,
            "disk_mib_per_hour": bound(disk_allowance, 1 / disk_span_h, disk_rate,
                                       DISK_SLACK_MIB_PER_HOUR),
            "long_run": {"rss_mib_per_hour": round(rate + RSS_SLACK_MIB_PER_HOUR, 3),
                         "disk_mib_per_hour": round(disk_rate + DISK_SLACK_MIB_PER_HOUR, 3)},
            "terms": {
                "allowance_mib": round(allowance, 3),
                "allowance_per_hour_pooled": (None if per_hour_pooled is None
                                              else round(per_hour_pooled, 3)),
                "allowance_per_hour_steady": (None if steady_per_hour is None
                                              else round(steady_per_hour, 3)),
                "ledger_record_bytes": round(record, 1),
                "ledger_records_mib_per_hour": round(rate, 3),
                "disk_allowance_mib": round(disk_allowance, 3),
                "disk_span_h": round(disk_span_h, 3),
                "disk_records_mib_per_hour": round(disk_rate, 3),
            },
            "why": (
                f"RSS: {STEP_FACTOR:g} x the caches' one-time allowance "
                f"({allowance:.1f} MiB: each bounded cache full, its bytes per entry "
                "measured in the nodes times its cap, caches_mib) / the span the slope is "
                "fitted over (the steady DC's; for the pooled slope the mean of 1 / each "
                "lifetime's span, weighted as the slope weighs them): a one-time growth "
                f"all at once in the middle of a span makes a slope of {STEP_FACTOR:g} x "
                f"growth / span; + the ledger's migration records, {migrations_per_hour:.0f}"
                f" an hour x {record:.0f} B (measured in the nodes; kept for good); + "
                f"{RSS_SLACK_MIB_PER_HOUR:g} MiB/h for glibc's free lists and the slope's "
                f"noise under load. Disk: {STEP_FACTOR:g} x a one-time allowance "
                f"({disk_allowance:.1f} MiB: the request book full, {MAX_REMEMBERED} x "
                f"{sizes['request_wire']:.0f} B, and the {ENDED_KEEP_MAX} ended sessions' "
                f"records a node keeps, x {sizes['session_wire']:.0f} B, both x "
                f"{RECORD_FACTOR:g}: the snapshot beside the log, the log, SQLite's pages) "
                f"/ the span after the warm-up; + the migration records, "
                f"{migrations_per_hour:.0f} an hour x {sizes['migration_wire']:.0f} B x "
                f"{RECORD_FACTOR:g}; + {DISK_SLACK_MIB_PER_HOUR:g} MiB/h. long_run: the "
                "bounds once every cache is full (no allowance). Descriptors and tasks "
                "have no reason to grow: a migration in flight holds a few, and a leak of "
                "one per migration or per restart would be hundreds an hour."),
        }

    def report(self, began_wall: float, sizes: dict[str, float]) -> dict[str, Any]:
        minutes = self.args.minutes
        slopes = self.slopes(self.samples)
        per_node = {dc: self.slopes([s for s in self.samples if s["dc"] == dc])
                    for dc in self.nodes}
        hours = minutes / 60
        migrations_per_hour = (self.migrations["committed"] + self.migrations["failed"]) / hours
        caches = self.caches()
        steady = self.steady()
        bounds = self.bounds(sizes, migrations_per_hour, caches, steady)
        errors = [e for n in self.nodes.values() for e in n.errors]
        over_cap = [f"{dc} {name}: {e} > {cap}" for dc, n in self.nodes.items()
                    for r in n.heap_reports
                    for name, (e, cap, _) in r["caches"].items() if cap is not None and e > cap]
        # a node keeps the persisted records of its ended sessions as long as the sessions
        # (ENDED_KEEP_MAX; the sweep runs every ENDED_SWEEP_SECONDS, so up to a sweep's
        # worth more), plus those in flight
        sessions_per_hour = 2 * migrations_per_hour / len(self.nodes)
        rows_bound = (ENDED_KEEP_MAX + math.ceil(sessions_per_hour * ENDED_SWEEP_SECONDS
                                                 / 3600) + 2 * len(VMS))
        rows = [s["migration_rows"] for s in self.samples if s["migration_rows"] is not None]
        checks = {
            "samples": len({s["t_s"] for s in self.samples}) >= 3,
            "migration_rows_within_retention": bool(rows) and max(rows) <= rows_bound,
            "no_error_lines": not errors,
            "no_problems": not self.problems,
            "migrations_committed": self.migrations["committed"] > 0,
            "no_migration_failed": self.migrations["failed"] == 0,
            "commands_committed": self.commands["committed"] > 0,
            "no_command_refused": self.commands["refused"] == 0,
            # every node's caches were measured, and none held more than its cap
            "caches_measured": all(any(r["caches"] for r in n.heap_reports)
                                   for n in self.nodes.values()),
            "caches_within_caps": not over_cap,
        }
        for key in ("rss_mib_per_hour", "fds_per_hour", "tasks_per_hour",
                    "disk_mib_per_hour"):
            value, limit = slopes[key], bounds[key]
            checks[key] = value is not None and limit is not None and value <= limit
        if self.args.steady is not None:
            value = None if steady is None else steady["rss_mib_per_hour"]
            limit = bounds["steady_rss_mib_per_hour"]
            checks["steady_rss_mib_per_hour"] = (value is not None and limit is not None
                                                 and value <= limit)
        return {
            "bench": "soak",
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(began_wall)),
            "machine": {"cores": os.cpu_count(), "platform": platform.platform(),
                        "load_at_end": os.getloadavg()},
            "params": {"minutes": minutes, "warmup_minutes": self.args.warmup_minutes,
                       "sample_every_s": self.args.sample_every,
                       "restart_every_minutes": self.args.restart_every,
                       "steady": self.args.steady,
                       "migrate_every_s": self.args.migrate_every,
                       "load_rate_per_s": self.args.load_rate, "loaders": self.args.loaders,
                       "vms": {vm: f"{VM_MEMORY_MIB} MiB memory + {VM_DISK_MIB} MiB disk"
                               for vm in VMS}},
            "warmup": (f"a process's samples count once it has run {self.args.warmup_minutes:g}"
                       " min (RSS, descriptors, tasks; one intercept per process lifetime); "
                       "the disk's after that long from the run's start"),
            **slopes,
            "steady": steady,
            "per_node": per_node,
            "caches_mib": caches,
            "migration_rows": {"max": max(rows, default=None), "bound": rows_bound,
                               "last": {dc: next((s["migration_rows"] for s in
                                                  reversed(self.samples) if s["dc"] == dc),
                                                 None) for dc in self.nodes}},
            "migrations": {**self.migrations, "failures": self.migration_failures},
            "commands": {**self.commands, "errors": self.command_errors},
            "restarts": self.restarts,
            "log_lines": {dc: n.lines for dc, n in self.nodes.items()},
            "errors": errors,
            "problems": self.problems + over_cap,
            "record_bytes": {k: round(v, 1) for k, v in sizes.items()},
            "bounds": bounds,
            "checks": checks,
            "ok": all(checks.values()),
            "samples": self.samples,
            "heap_reports": {dc: n.heap_reports for dc, n in self.nodes.items()},
        }


def run_soak(args: argparse.Namespace) -> dict[str, Any]:
    directory = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="dwcp-soak-"))
    directory.mkdir(parents=True, exist_ok=True)
    sizes = record_bytes()
    began = time.time()
    fed = LocalFederation(directory, 4)
    fed.nodes = {
        name: SoakNode(name, fed.config_path, fed.changes, directory / "logs" / f"{name}.log")
        for name in fed.federation.names
    }
    soak = Soak(fed, directory, args)
    frames = getattr(args, "heap_report", None)
    saved = os.environ.get(heap_report.ENV)
    if frames:  # the nodes inherit it
        os.environ[heap_report.ENV] = str(frames)
    try:
        trio.run(soak.run)
    finally:
        if frames:
            if saved is None:
                os.environ.pop(heap_report.ENV, None)
            else:
                os.environ[heap_report.ENV] = saved
    failure = soak.failure
    doc = soak.report(began, sizes)
    doc["directory"] = str(directory)
    if failure is not None:
        doc["problems"].append(f"the soak stopped: {failure}")
        doc["checks"]["no_problems"] = False
        doc["ok"] = False
    if doc["ok"] and not args.dir and not args.keep:
        shutil.rmtree(directory, ignore_errors=True)
        doc["directory"] = None
    return doc


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("soak", help="four dwcp nodes for N minutes under migrations, ledger "
                                    "load and restarts; the slope of RSS, descriptors, "
                                    "tasks and disk (issue 18)")
    p.add_argument("--minutes", type=float, default=10.0,
                   help="how long the workload runs (default 10, what make bench runs; the "
                        "published run: 60)")
    p.add_argument("--warmup-minutes", type=float, default=5.0,
                   help="samples count once their process has run this long (default 5)")
    p.add_argument("--sample-every", type=float, default=60.0, metavar="SECONDS",
                   help="seconds between two samples of every node (default 60)")
    p.add_argument("--restart-every", type=float, default=5.0, metavar="MINUTES",
                   help="stop and start one DC (in turn; SIGTERM and kill -9 alternately)")
    p.add_argument("--steady", default=STEADY, metavar="DC",
                   type=lambda v: None if v == "none" else v,
                   help=f"the DC never restarted (default {STEADY}; the others are, in turn): "
                        "its RSS slope over the whole run after the warm-up, with its "
                        "caches, is the run's honest slope (`steady`); none: all in turn")
    p.add_argument("--migrate-every", type=float, default=10.0, metavar="SECONDS",
                   help="pause between two migrations of one VM (two VMs migrate)")
    p.add_argument("--load-rate", type=float, default=2.0,
                   help="ledger commands per second (an admin's SetPolicy)")
    p.add_argument("--loaders", type=int, default=2, help="callers sharing the load")
    p.add_argument("--dir", help="work directory (kept; default a temporary one, removed "
                                 "when the run is ok)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--heap-report", type=int, default=None, metavar="FRAMES",
                   help="diagnose growth: start the nodes with DWCP_TRACEMALLOC=FRAMES "
                        "(0: tracemalloc off) and ask each for a heap_report line "
                        "(SIGUSR2; federation.node.heap_report; summed up in "
                        "heap_reports) at every sample, not only every "
                        f"{CACHES_EVERY:g} s for its caches; with FRAMES > 0 they say "
                        "which tracebacks grew; tracemalloc slows the nodes, so slopes "
                        "measured with it are not the node's")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    for name in ("minutes", "sample_every", "restart_every", "migrate_every", "load_rate"):
        if getattr(args, name) <= 0:
            print(f"dwcp bench soak: --{name.replace('_', '-')} must be positive",
                  file=sys.stderr)
            return 2
    if args.heap_report is not None and not 0 <= args.heap_report <= 100:
        print("dwcp bench soak: --heap-report must be 0 to 100 frames", file=sys.stderr)
        return 2
    if args.steady is not None and args.steady not in {f"dc{i}" for i in range(1, 5)}:
        print(f"dwcp bench soak: --steady {args.steady}: expected dc1..dc4 or none",
              file=sys.stderr)
        return 2
    if args.warmup_minutes < 0 or args.loaders < 1:
        print("dwcp bench soak: --warmup-minutes must be >= 0 and --loaders >= 1",
              file=sys.stderr)
        return 2
    doc = run_soak(args)
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        for key in ("rss_mib_per_hour", "fds_per_hour", "tasks_per_hour", "disk_mib_per_hour",
                    "migrations", "commands", "restarts", "errors", "problems", "bounds",
                    "checks", "ok"):
            print(f"{key}: {doc[key]}")
    return 0 if doc["ok"] else 1
