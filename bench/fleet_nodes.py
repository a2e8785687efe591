"""The node phase of ``dwcp bench fleet``: four real ``dwcp node`` processes on loopback,
``vms`` image VMs imported and registered through their API the way an operator's
``dwcp vm import`` does, then ``concurrent`` migrations submitted at once (each DC's
share to the next DC), every one followed to its outcome through the API.

Figures: ``registered_per_s``; ``migrations_per_min`` (committed migrations over the span
from the first submit to the last outcome); ``ledger_commit_p99_ms`` (an API request that
is one ledger command, ``POST /api/vms`` and ``POST /api/migrations``: signed request to
the ledger's answer); ``api_p99_ms`` (every API call made while the migrations ran,
polls and ``GET /api/status`` included) and ``status_p99_ms``/``status_bytes``;
``node_rss_mib_max`` (each node's VmRSS, sampled). Checks, each a failure if it does not
hold: every migration committed or aborted with a reason; at the end every ledger has the
same height and the same owner and epoch for every VM; each VM is held (not retired) at
exactly one DC, its owner.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.measure import percentile, rss_mib
from consensus.ledger import ImportVm, MigrateVm
from federation import config
from federation.api.auth import load_operator_key
from federation.api.client import ApiClient, Signer
from federation.cli.keys import INIT_OPERATOR, init_federation
from federation.demo.processes import NODE_MAIN, free_base_port
from federation.demo.real_data import write_process_memory

__all__ = ["Fleet", "run_nodes", "FleetFailed"]

#: A small VM: 64 pages (256 KiB) of this process's memory, so the data plane's work per
#: migration is small and the ledger, the sessions and the API carry the load.
VM_BYTES = 256 * 1024
#: Distinct images the VMs are imported from (a copy each, so the targets' page stores
#: hold several contents, not one).
IMAGES = 8
#: Client threads making API calls: 4 per node, well under the API's 16 connections per
#: source address (federation.api.limits.ApiLimits).
CLIENTS = 16
#: A migration's outcome is looked at this often (``dwcp migrate`` polls every 0.25 s).
POLL = 0.25
#: RSS and ``GET /api/status`` are sampled this often during the migrations.
SAMPLE = 0.5
#: Seconds the whole fleet gets for one step (start, registration, the migrations).
STEP_TIMEOUT = 900.0


class FleetFailed(Exception):
    """A check of the node phase that did not hold; the message says which."""


def _percentile(values: list[float], q: float) -> float | None:
    return percentile(values, q) if values else None


class Calls:
    """Every API call's latency, by kind, with its wall-clock start (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_kind: dict[str, list[tuple[float, float]]] = {}
        self.errors: list[str] = []

    def add(self, kind: str, started: float, took: float) -> None:
        with self.lock:
            self.by_kind.setdefault(kind, []).append((started, took))

    def between(self, t0: float, t1: float, kinds: tuple[str, ...] | None = None
                ) -> list[float]:
        with self.lock:
            return [took for k, rows in self.by_kind.items() if kinds is None or k in kinds
                    for started, took in rows if t0 <= started <= t1]


class Fleet:
    """Four ``dwcp node`` processes of a fresh federation in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.cfg = init_federation(directory / "fed", 4, fed_id="fleet",
                                   base_port=free_base_port(4))
        self.fed = config.load(self.cfg)
        key = load_operator_key(self.cfg.parent / "keys" / f"{INIT_OPERATOR}.key", self.fed)
        self.signer = Signer(key, self.fed.id)
        self.names = list(self.fed.names)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.calls = Calls()
        self.images = self.cfg.parent / "images"
        self.images.mkdir(mode=0o700, exist_ok=True)

    def start(self) -> None:
        for name in self.names:
            with open(self.dir / f"{name}.log", "ab") as log:
                self.procs[name] = subprocess.Popen(
                    [sys.executable, "-c", NODE_MAIN, "node", "--config", str(self.cfg),
                     "--name", name], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=log)
        deadline = time.monotonic() + 120
        for name in self.names:
            self.until(f"{name} ready", lambda name=name: self.ready(name), deadline)

    def ready(self, name: str) -> bool:
        try:
            return ApiClient(str(self.fed.dc(name).api), None, timeout=5).request(
                "GET", "/ready")[0] == 200
        except Exception:  # noqa: BLE001 - not listening yet: looked at again
            return False

    def until(self, what: str, check: Callable[[], Any], deadline: float) -> Any:
        """Until ``check()`` holds; fails naming ``what`` and the logs if a node exits or
        the deadline passes."""
        while True:
            got = check()
            if got:
                return got
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise FleetFailed(f"{dead} exited while waiting for {what}; logs in {self.dir}")
            if time.monotonic() > deadline:
                raise FleetFailed(f"{what}: not within the time allowed; logs in {self.dir}")
            time.sleep(POLL)

    def api(self, name: str) -> ApiClient:
        return ApiClient(str(self.fed.dc(name).api), self.signer, timeout=120)

    def call(self, kind: str, name: str, method: str, path: str,
             intent: object = None) -> tuple[int, Any]:
        t0 = time.time()
        p0 = time.perf_counter()
        code, raw = self.api(name).request(method, path, intent)
        self.calls.add(kind, t0, time.perf_counter() - p0)
        return code, json.loads(raw) if raw else None

    def rss(self) -> dict[str, float | None]:
        return {n: rss_mib(p.pid) for n, p in self.procs.items()}

    def stop(self) -> dict[str, int | None]:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for n, p in self.procs.items():
            try:
                codes[n] = p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                codes[n] = None
        return codes

    # ------------------------------------------------------------------ steps

    def write_images(self) -> list[Path]:
        data = Path(write_process_memory(self.dir / "memory.src", VM_BYTES * IMAGES)
                    ).read_bytes()
        out = []
        for i in range(IMAGES):
            piece = data[i * VM_BYTES:(i + 1) * VM_BYTES] or data[:VM_BYTES]
            path = self.images / f"memory{i}.img"
            path.write_bytes(piece)
            out.append(path)
        return out

    def register(self, vm: str, dc: str, memory: Path) -> None:
        """``dwcp vm import``: stage (the node copies the image), wait, register."""
        intent = ImportVm(vm, dc, str(memory), ())
        code, doc = self.call("import", dc, "POST", "/api/imports", intent)
        if code != 202:
            raise FleetFailed(f"import of {vm} at {dc}: HTTP {code} {doc}")
        while doc["state"] == "copying":
            time.sleep(0.05)  # the copy of 256 KiB: looked at again, not waited for
            code, doc = self.call("import_status", dc, "GET", f"/api/imports/{vm}")
        if doc["state"] != "staged":
            raise FleetFailed(f"import of {vm} at {dc}: {doc}")
        code, doc = self.call("ledger", dc, "POST", "/api/vms", intent)
        if code != 201:
            raise FleetFailed(f"register of {vm} at {dc}: HTTP {code} {doc}")

    def migrate(self, vm: str, source: str, target: str) -> str:
        code, doc = self.call("ledger", source, "POST", "/api/migrations",
                              MigrateVm(vm, target, source, 0))
        if code != 202 or "id" not in doc:
            raise FleetFailed(f"migration of {vm} {source}->{target}: HTTP {code} {doc}")
        return str(doc["id"])

    def outcome(self, source: str, mid: str) -> dict[str, Any] | None:
        code, doc = self.call("poll", source, "GET", f"/api/migrations/{mid}")
        if code == 200 and doc.get("ledger") in ("committed", "aborted"):
            return dict(doc)
        return None

    def statuses(self) -> dict[str, dict[str, Any]]:
        out = {}
        for n in self.names:
            code, doc = self.call("status", n, "GET", "/api/status")
            if code != 200:
                raise FleetFailed(f"GET /api/status at {n}: HTTP {code}")
            out[n] = doc
        return out


def check_agreement(docs: dict[str, dict[str, Any]]) -> list[str]:
    """What is wrong with the ledgers and the copies of the final statuses (empty: none)."""
    problems = []
    heights = {n: d["ledger"]["height"] for n, d in docs.items()}
    if len(set(heights.values())) != 1:
        problems.append(f"ledger heights differ: {heights}")
    views = {n: {v["name"]: (v["owner"], v["epoch"]) for v in d["vms"] if v["owner"]}
             for n, d in docs.items()}
    first = next(iter(views.values()))
    for n, v in views.items():
        if v != first:
            diff = sorted(k for k in set(v) | set(first) if v.get(k) != first.get(k))[:5]
            problems.append(f"{n}'s ledger differs on {diff}")
    held: dict[str, list[str]] = {}
    for n, d in docs.items():
        for v in d["vms"]:
            if v["here"] not in (None, "retired"):
                held.setdefault(v["name"], []).append(n)
    for vm, (owner, _) in first.items():
        where = held.get(vm, [])
        if where != [owner]:
            problems.append(f"{vm} is held at {where}, its owner is {owner}")
    return problems


def run_nodes(directory: Path, vms: int, concurrent: int) -> dict[str, Any]:
    fleet = Fleet(directory)
    out: dict[str, Any] = {"vms": vms, "concurrent_migrations": concurrent}
    try:
        t = time.perf_counter()
        fleet.start()
        out["start_s"] = round(time.perf_counter() - t, 2)
        images = fleet.write_images()
        names = fleet.names
        owner = {f"vm{i:05d}": names[i % len(names)] for i in range(vms)}
        t0 = time.time()
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(lambda i: fleet.register(f"vm{i:05d}", owner[f"vm{i:05d}"],
                                                   images[i % IMAGES]), range(vms)))
        t1 = time.time()
        out["registered_per_s"] = round(vms / (t1 - t0), 1)
        reg = fleet.calls.between(t0, t1, ("ledger",))
        out["register_p99_ms"] = _ms(_percentile(reg, 0.99))
        out["rss_after_register_mib"] = fleet.rss()
        # the migrations: the first ``concurrent`` VMs, each to the next DC
        moving = [f"vm{i:05d}" for i in range(min(concurrent, vms))]
        target = {vm: names[(names.index(owner[vm]) + 1) % len(names)] for vm in moving}
        rss_max: dict[str, float] = {}
        stop = threading.Event()

        def sampler() -> None:
            while not stop.is_set():
                for n, r in fleet.rss().items():
                    if r is not None:
                        rss_max[n] = max(rss_max.get(n, 0.0), r)
                try:
                    fleet.call("status", names[int(time.time() * 2) % len(names)], "GET",
                               "/api/status")
                except Exception as exc:  # noqa: BLE001 - counted as an API failure
                    fleet.calls.errors.append(f"status: {exc}")
                stop.wait(SAMPLE)

        watcher = threading.Thread(target=sampler, daemon=True)
        m0 = time.time()
        watcher.start()
        with ThreadPoolExecutor(CLIENTS) as pool:
            ids = dict(zip(moving, pool.map(
                lambda vm: fleet.migrate(vm, owner[vm], target[vm]), moving), strict=True))
            out["submit_s"] = round(time.time() - m0, 2)
            outcomes: dict[str, dict[str, Any]] = {}
            deadline = time.monotonic() + STEP_TIMEOUT
            while len(outcomes) < len(moving):
                left = [vm for vm in moving if vm not in outcomes]
                for vm, doc in zip(left, pool.map(
                        lambda vm: fleet.outcome(owner[vm], ids[vm]), left), strict=True):
                    if doc is not None:
                        outcomes[vm] = doc | {"seen_at": time.time()}
                if time.monotonic() > deadline:
                    raise FleetFailed(f"{len(left)} migrations without an outcome after "
                                      f"{STEP_TIMEOUT} s: {left[:5]}")
                time.sleep(POLL)
        m1 = max(d["seen_at"] for d in outcomes.values())
        stop.set()
        watcher.join()
        committed = [vm for vm, d in outcomes.items() if d["ledger"] == "committed"]
        aborted = {vm: d.get("reason") for vm, d in outcomes.items() if d["ledger"] == "aborted"}
        out["migrations_committed"] = len(committed)
        out["migrations_aborted"] = len(aborted)
        out["abort_reasons"] = sorted({str(r) for r in aborted.values()})[:5]
        out["migrations_span_s"] = round(m1 - m0, 2)
        out["migrations_per_min"] = round(len(committed) / (m1 - m0) * 60, 1)
        led = fleet.calls.between(m0, m1, ("ledger",))
        allcalls = fleet.calls.between(m0, m1)
        status = fleet.calls.between(m0, m1, ("status",))
        out["ledger_commit_p99_ms"] = _ms(_percentile(reg + led, 0.99))
        out["api_p99_ms"] = _ms(_percentile(allcalls, 0.99))
        out["api_p50_ms"] = _ms(_percentile(allcalls, 0.50))
        out["api_calls_during_migrations"] = len(allcalls)
        out["status_p99_ms"] = _ms(_percentile(status, 0.99))
        out["api_errors"] = fleet.calls.errors[:5]
        out["node_rss_mib_max"] = {n: round(r, 1) for n, r in sorted(rss_max.items())}
        # the end: every ledger agrees, every VM at one place
        problems: list[str] = []
        deadline = time.monotonic() + 120

        def settled() -> dict[str, dict[str, Any]] | None:
            docs = fleet.statuses()
            problems[:] = check_agreement(docs)
            return None if problems else docs

        try:
            docs = fleet.until("every ledger to agree", settled, deadline)
        except FleetFailed as exc:
            raise FleetFailed(f"{exc}: {problems[:5]}") from None
        out["status_bytes"] = len(json.dumps(docs[names[0]]))
        missing = [vm for vm in aborted if not aborted[vm]]
        if missing:
            raise FleetFailed(f"aborted without a reason: {missing[:5]}")
        out["checks"] = "every migration committed or aborted with a reason; ledgers agree; " \
                        "each VM held at its owner only"
    finally:
        out["exit_codes"] = fleet.stop()
    return out


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 1)
