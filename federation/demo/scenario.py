"""The steps of ``dwcp demo`` over a running :class:`federation.demo.processes.LocalFederation`.

Each step talks to the nodes only as an operator would (their HTTP API) and reads
their structured logs for the times of events; every claim printed is checked, and a
check that fails raises :class:`federation.demo.processes.DemoFailed` naming it.
"""

from __future__ import annotations

import functools
import math
import re
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from federation.api.auth import load_operator_key
from federation.api.client import ClientError, Signer, import_vm, migrate_request
from federation.cli.keys import INIT_OPERATOR
from federation.cli.main import CommandError
from federation.cli.ops import Api, _human, render_progress
from federation.demo.guest_writer import expected_pages, mismatches
from federation.demo.vm_data import VmData
from federation.vms.at_rest_key import key_if_any
from federation.vms.sealed_image import content_sha256, open_stored
from federation.vms.sealing import SealKey

if TYPE_CHECKING:
    from federation.demo.processes import LocalFederation

__all__ = ["Demo", "ms"]

#: The demo polls a migration as often as ``dwcp migrate`` does (ops_cli.POLL_INTERVAL).
POLL = 0.25
#: Detection is polled finer: SWIM's probe period is 1 s (mesh.gossip.membership.SwimConfig),
#: so 50 ms resolves it to a few percent.
WATCH = 0.05
#: The demo gives up on a migration after 30 s plus 1 s per 10 MiB of VM: the v1 data
#: plane moved 17 MB/s on this 2-core machine at load 9 (measured with this demo), and a
#: VM crosses the link about once plus its dirty tail. The default VM (384 MiB) gets
#: 68 s, which keeps the whole demo under the issue's 2 minutes.
BUDGET_BASE, BUDGET_PER_BYTE = 30.0, 1.0 / (10 << 20)
#: memberlist's suspicion timeout at N = 4 is ~2.4 s after a missed probe (1 s
#: period): dead in ~5.4 s on a quiet run, 7.8 s at load 9 (measured with this demo).
#: Fifteen seconds before the demo calls it a failure.
DETECT_BUDGET = 15.0
_PHASE = re.compile(r"phase='(\w+)'")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"




def _progress(m: dict[str, Any], dst: str, received: int, width: int = 20) -> str:
    """One progress line: phase, round, a bar of the bytes moved (what the target has
    received, or the source's count after a round) over the VM's size, dirty rate, ETA."""
    total = m.get("total_bytes") or 0
    sent = m.get("bytes_sent") or 0
    moved = max(sent, received)
    frac = min(1.0, moved / total) if total else 0.0
    bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
    eta = m.get("eta")
    eta_s = "-" if eta is None or not math.isfinite(eta) or m.get("round", 0) < 2 and not sent \
        else f"{eta:.1f}s"
    at = f", at {dst} {_human(received)}" if received else ""
    prepared = (m.get("progress") or {}).get("prepared") or 0
    at += f", preparing: {prepared} pages" if prepared else ""
    return (f"{m.get('phase', '?'):<9} round {m.get('round', 0):>2} [{bar}] "
            f"sent {_human(sent)} (wire {_human(m.get('wire_bytes') or 0)}){at}  "
            f"dirty {m.get('dirty_rate', 0.0):.0f} pages/s  eta {eta_s}")


class Demo:
    def __init__(self, fed: LocalFederation, directory: Path, fail: type[Exception]) -> None:
        self.fed = fed
        self.directory = directory
        self.fail = fail

    @functools.cached_property
    def apis(self) -> dict[str, Api]:
        """Each DC's API, signing as the admin `federation init` made."""
        fed = self.fed
        key = load_operator_key(fed.config_path.parent / "keys" / f"{INIT_OPERATOR}.key",
                                fed.federation)
        signer = Signer(key, fed.federation.id)
        return {dc.name: Api(f"http://{dc.api}", signer) for dc in fed.federation.dcs}

    async def get(self, dc: str, path: str) -> Any:
        return await self._call(dc, "GET", path)

    async def post(self, dc: str, path: str, intent: object) -> Any:
        return await self._call(dc, "POST", path, intent)

    async def _call(self, dc: str, method: str, path: str, intent: object = None) -> Any:
        try:
            return await trio.to_thread.run_sync(self.apis[dc].ok, method, path, intent)
        except CommandError as exc:
            raise self.fail(f"{dc} {method} {path}: {exc}") from None

    def vm_dir(self, dc: str, vm: str) -> Path:
        return self.fed.config_path.parent / "data" / dc / "vms" / vm

    def at_rest_key(self, dc: str) -> SealKey | None:
        """``dc``'s at-rest key where ``dwcp node`` made it (beside its identity key)."""
        return key_if_any(self.fed.config_path.parent / "keys" / f"{dc}.at-rest")

    def log_ts(self, dc: str, match: Callable[[dict[str, Any]], bool]) -> float | None:
        """Wall-clock ``ts`` of the first log event of ``dc`` that matches."""
        return next((float(e["ts"]) for e in self.fed.nodes[dc].events if match(e)), None)

    async def wait_ready(self, deadline: float) -> None:
        for dc, api in self.apis.items():
            while True:
                code, doc = await trio.to_thread.run_sync(api.call, "GET", "/ready")
                if code == 200:
                    break
                if trio.current_time() > deadline:
                    raise self.fail(f"{dc} not ready in time: {doc.get('reason')}")
                await trio.sleep(POLL)

    # ------------------------------------------------------------------ migration

    async def import_vm(self, dc: str, vm: str, data: VmData, rate: float) -> dict[str, Any]:
        """Import ``vm`` at ``dc`` through the API; ``dc``'s node runs it with the page
        writer (``rate`` pages per second) it was started with for that VM."""
        t0 = trio.current_time()
        try:
            doc = await trio.to_thread.run_sync(
                import_vm, self.apis[dc], vm, str(data.memory), tuple(str(d) for d in data.disks))
        except (ClientError, CommandError) as exc:
            raise self.fail(f"{dc}: importing {vm}: {exc}") from None
        pages = sum(n for _, n in doc["layout"])
        print(f"   {dc} imported {vm}: {pages} pages ({_human(pages * 4096)}), ledger epoch "
              f"{doc['epoch']}, {doc['state']}, writer dirtying {rate:.0f} pages/s "
              f"({ms(trio.current_time() - t0)}: staged copy + PBFT register)")
        return doc

    async def migrate(self, vm: str, src: str, dst: str, budget: float | None = None,
                      show: bool = True, watch: str | None = None,
                      poll: float = POLL) -> dict[str, Any]:
        """Migrate ``vm`` through ``src``'s API, printing progress (unless ``show`` is
        false), until it commits (a failure if it aborts or takes longer than ``budget``
        seconds, by default one from the VM's size). ``watch``: the DC whose API is asked
        for the migration's state (default ``src``; without ``show`` only that one is
        asked, every ``poll`` seconds: ``dwcp bench live`` keeps the API off the link it
        measures)."""
        began = trio.current_time()
        try:
            intent = await trio.to_thread.run_sync(migrate_request, self.apis[src], vm, dst)
        except (ClientError, CommandError) as exc:
            raise self.fail(f"{src}: migrating {vm}: {exc}") from None
        mid = (await self._call(src, "POST", "/api/migrations", intent))["id"]
        if show:
            print(f"   migration {mid} accepted by {src}")
        path = f"/api/migrations/{urllib.parse.quote(mid)}"
        last, shown, doc = "", 0, {}
        while True:
            try:
                doc = await self.get(watch or src, path)
            except self.fail:
                if watch is None or watch == src:
                    raise
                doc = {}  # the watching DC has not heard of it yet (the ledger's order)
            line = render_progress(doc)
            # The source counts a round's bytes when it ends; the target counts them as
            # they land, so a long round shows its progress too.
            got = 0
            if show and doc.get("outcome") is None:
                code, there = await trio.to_thread.run_sync(self.apis[dst].call, "GET", path)
                got = there.get("received_bytes", 0) if code == 200 else 0
            step = (doc.get("total_bytes") or 1) // 10
            if show and (line != last or got - shown >= step):
                print(f"   {trio.current_time() - began:6.1f}s  {_progress(doc, dst, got)}",
                      flush=True)
                last, shown = line, got
            if doc.get("outcome") is not None:
                break
            bound = budget if budget is not None else (
                BUDGET_BASE + (doc.get("total_bytes") or 0) * BUDGET_PER_BYTE)
            if trio.current_time() - began > bound:
                raise self.fail(f"migration {mid} did not end in {bound:.0f} s "
                                f"(phase {doc.get('phase')}, round {doc.get('round')})")
            await trio.sleep(poll)
        doc["elapsed"] = trio.current_time() - began
        outcome = doc["outcome"]
        if outcome["outcome"] != "committed":
            raise self.fail(f"migration {mid} {outcome['outcome']}: {outcome['reason']}")
        return doc

    async def downtime(self, mid: str, src: str, dst: str) -> float:
        """From the fence at the source (its session's 'fenced' progress) to the start at
        the target (the target's VM worker logged StartAtTarget), from the nodes' logs."""
        def fenced(e: dict[str, Any]) -> bool:
            if e["event"] != "notify" or e.get("kind") != "migration.progress":
                return False
            detail = str(e.get("detail"))  # a Progress record, logged as its repr
            phase = _PHASE.search(detail)
            return mid in detail and phase is not None and phase.group(1) == "fenced"

        def started(e: dict[str, Any]) -> bool:
            return (e["event"] == "vm_action" and e.get("action") == "StartAtTarget"
                    and e.get("migration_id") == mid)

        deadline = trio.current_time() + 10.0
        node = self.fed.nodes[dst]
        await node.wait_for(f"{dst} starting the VM", lambda: self.log_ts(dst, started)
                            is not None, deadline)
        t_fence, t_start = self.log_ts(src, fenced), self.log_ts(dst, started)
        if t_fence is None or t_start is None:
            raise self.fail(f"no fence event of {mid} in {src}'s log")
        return t_start - t_fence

    async def ledgers_agree(self, vm: str, owner: str, mid: str) -> tuple[int, int]:
        """Every node's ledger names ``owner`` at one epoch, the migration committed."""
        deadline = trio.current_time() + 10.0
        while True:
            seen: dict[str, tuple[Any, Any, Any]] = {}
            heights = []
            for dc in self.apis:
                doc = await self.get(dc, "/api/status")
                rec = next((v for v in doc["vms"] if v["name"] == vm), None)
                mig: dict[str, Any] = next(
                    (m for m in doc["migrations"] if m["id"] == mid), {}
                )
                seen[dc] = (None, None, None) if rec is None else (
                    rec["owner"], rec["epoch"], mig.get("ledger"))
                heights.append(doc["ledger"]["height"])
            owners = {v[0] for v in seen.values()}
            epochs = {v[1] for v in seen.values()}
            if owners == {owner} and len(epochs) == 1 and all(
                    v[2] == "committed" for v in seen.values()):
                return epochs.pop(), min(heights)
            if trio.current_time() > deadline:
                raise self.fail(f"the ledgers disagree on {vm}: (owner, epoch, migration) "
                                f"per DC: {seen}")
            await trio.sleep(POLL)

    def check_images(self, vm: str, src: str, dst: str) -> tuple[dict[str, str], int]:
        """The target's images equal the source's copy, frozen since the fence (the source
        retired it, the target runs it without a writer), and equal what the writer last
        wrote before the fence. Returns the hashes and the writes checked."""
        a, b = self.vm_dir(vm=vm, dc=src), self.vm_dir(vm=vm, dc=dst)
        ka, kb = self.at_rest_key(src), self.at_rest_key(dst)
        hashes: dict[str, str] = {}
        for img in sorted(p.name for p in a.glob("*.img")):
            # the pages' hashes: each DC seals its images under its own at-rest key
            ha, hb = content_sha256(a / img, ka), content_sha256(b / img, kb)
            if ha != hb:
                raise self.fail(f"{img}: {dst}'s sha256 {hb[:16]} differs from {src}'s "
                                f"copy at the fence {ha[:16]}")
            hashes[img] = ha
        if not hashes:
            raise self.fail(f"no images of {vm} in {a}")
        expected = expected_pages(a / "writer.log")
        opened = {p.stem: open_stored(p, kb, p.stem) for p in sorted(b.glob("*.img"))}
        try:
            bad = mismatches(opened, expected)
        finally:
            for image in opened.values():
                image.close()
        if bad:
            raise self.fail(f"{dst}'s copy differs from what the writer wrote: {bad[:3]}")
        return hashes, len(expected)

    # ------------------------------------------------------------------ failure detection

    async def watch_failure(self, victim: str, survivors: list[str],
                            t_kill: float) -> dict[str, dict[str, float]]:
        """Poll each survivor's /api/status until it holds ``victim`` dead and no route of
        it passes through or ends at ``victim``; the times each step was first seen."""
        seen: dict[str, dict[str, float]] = {dc: {} for dc in survivors}
        while True:
            for dc in survivors:
                doc = await self.get(dc, "/api/status")
                now = time.time() - t_kill
                marks = seen[dc]
                if not doc["links"][victim]["connected"]:
                    marks.setdefault("link down", now)
                state = doc["members"][victim]
                if state in ("suspect", "dead"):
                    marks.setdefault("suspect", now)
                if state == "dead":
                    marks.setdefault("dead", now)
                routes = doc["routes"]
                around = all(
                    routes[kind].get(victim) is None and all(
                        hops is not None and victim not in hops
                        for peer, hops in routes[kind].items() if peer != victim)
                    for kind in ("control", "bulk"))
                if around and "dead" in marks:
                    marks.setdefault("rerouted", now)
            if all("rerouted" in m for m in seen.values()):
                return seen
            if time.time() - t_kill > DETECT_BUDGET:
                raise self.fail(f"survivors did not detect {victim} and route around it in "
                                f"{DETECT_BUDGET:.0f} s: {seen}")
            await trio.sleep(WATCH)
