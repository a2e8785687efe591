"""An operator's cancel through real nodes (tests/harness/node.py) and the real CLI:
``POST /api/migrations/ID/cancel`` at the source and at another DC (which submits the
operator's signed abort to the ledger itself), ``dwcp cancel`` while ``dwcp migrate``
follows the migration, and the errors for a finished and an unknown migration."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import trio

from consensus.ledger import CancelMigration, SetPolicy
from federation.dataplane.v3_source import V3RoundSender
from federation.migration.vocabulary import Phase, SendRound
from federation.node.assembly import Node
from tests.harness.api import api_import, api_migrate, call
from tests.harness.node import make_federation, real_vm, running_nodes, wait_outcome, wait_vm
from tests.harness.waiting import wait_until

_MAIN = "import sys; from federation.cli.main import main; sys.exit(main())"


def _as_from_a_terminal() -> None:
    """The child starts with SIGINT as an operator's shell leaves it (default action,
    not blocked), whatever this test process's earlier tests did to its own."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


async def dwcp(*args: str) -> tuple[int, str, str]:
    done = await trio.run_process([sys.executable, "-c", _MAIN, *args], capture_stdout=True,
                                  capture_stderr=True, check=False)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def api(node: Node) -> str:
    return f"http://{node.api_host}:{node.api_port}"


async def import_web(node: Node, tmp_path: Path) -> None:
    memory, disk = real_vm(tmp_path / "vm")
    code, doc = await api_import(node, "web", memory, [disk])
    assert code == 201, doc


def ledgers_agree(nodes: dict[str, Node], mid: str, state: str) -> bool:
    return all((m := n.need_core().replica.ledger.migrations.get(mid)) is not None
               and m.state == state for n in nodes.values())


def test_cancel_while_the_target_never_answers_asked_of_another_dc(
        tmp_path: Path) -> None:
    """dc2 is down: the source waits in ``begun``; a cancel asked of dc3 goes to the
    ledger with the operator's signature, and dc1's session ends with the ledger."""
    cfg = make_federation(tmp_path / "fed")

    async def main() -> None:
        async with running_nodes(cfg, tmp_path / "data", names=("dc1", "dc3", "dc4")) as nodes:
            dc1, dc3 = nodes["dc1"], nodes["dc3"]
            await import_web(dc1, tmp_path)
            # the operator starts the migration, then gives up following it (Ctrl-C)
            proc = subprocess.Popen(
                [sys.executable, "-c", _MAIN, "migrate", "web", "--to", "dc2", "--api",
                 api(dc1)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                preexec_fn=_as_from_a_terminal, env={**os.environ, "PYTHONFAULTHANDLER": "1"})
            try:
                await wait_until(lambda: any(
                    m.state == "begun" for m in dc1.need_core().replica.ledger.migrations.values()),
                    "the begin", 20)
                assert proc.stderr is not None  # dwcp migrate prints a line at every poll
                with trio.fail_after(20):
                    first = await trio.to_thread.run_sync(proc.stderr.readline,
                                                          abandon_on_cancel=True)
                assert " round " in first, first  # it has polled the migration once
                proc.send_signal(signal.SIGINT)
                try:
                    _, err = await trio.to_thread.run_sync(proc.communicate, None, 20)
                except subprocess.TimeoutExpired:  # say where it is: faulthandler's dump
                    proc.send_signal(signal.SIGABRT)
                    _, err = await trio.to_thread.run_sync(proc.communicate, None, 10)
                    raise AssertionError(f"dwcp migrate ignored SIGINT for 20 s:\n{err}") from None
            finally:
                if proc.poll() is None:
                    proc.kill()
            (mid,) = dc1.need_core().sessions
            assert proc.returncode == 130
            assert f"migration {mid} goes on at the node; `dwcp cancel {mid}` aborts it" in err
            await wait_until(lambda: ledgers_agree(nodes, mid, "begun"), "dc3 knows the begin", 20)
            assert dc1.need_core().sessions[mid].phase is Phase.BEGUN

            code, doc = await call(dc3, "POST", f"/api/migrations/{mid}/cancel",
                                   CancelMigration(mid))
            assert code == 202, doc
            assert doc["ledger"] == "aborted" and "role" not in doc
            assert (await wait_outcome(dc1, mid)).startswith("aborted")
            await wait_until(lambda: ledgers_agree(nodes, mid, "aborted"),
                             "every ledger aborted", 20)
            await wait_vm(dc1, "web", "running")
            assert dc1.need_core().replica.ledger.owner("web") == "dc1"
            assert dc1.need_core().replica.ledger.epoch("web") == 0

            # a second cancel, again through dc3: the ledger's clear refusal comes back
            code, doc = await call(dc3, "POST", f"/api/migrations/{mid}/cancel",
                                   CancelMigration(mid))
            assert code == 409 and doc["error"] == (
                f"the ledger refused to cancel {mid!r}: migration {mid!r} is already aborted")
            code, doc = await call(dc1, "POST", f"/api/migrations/{mid}/cancel",
                                   CancelMigration(mid))
            assert code == 409 and "has already aborted" in doc["error"]
            code, doc = await call(dc3, "POST", "/api/migrations/nope/cancel",
                                   CancelMigration("nope"))
            assert (code, doc["error"]) == (404, "no migration 'nope'")
            # a signed cancel of another migration is no cancel of this one
            code, doc = await call(dc3, "POST", f"/api/migrations/{mid}/cancel",
                                   CancelMigration("other"))
            assert code == 409 and "signed migration_id='other'" in doc["error"]

    trio.run(main)


def test_dwcp_cancel_stops_dwcp_migrate_then_a_finished_one_is_refused(
        tmp_path: Path) -> None:
    """A migration held in its first pre-copy round (the round is not started) is
    cancelled with ``dwcp cancel``; ``dwcp migrate`` exits non-zero with the reason; the
    target discards its copy; the VM runs at the source. Then a real migration commits
    and cancelling it is refused."""
    cfg = make_federation(tmp_path / "fed")

    async def main() -> None:
        async with running_nodes(cfg, tmp_path / "data") as nodes:
            dc1, dc4 = nodes["dc1"], nodes["dc4"]
            await import_web(dc1, tmp_path)
            held: list[SendRound] = []
            submit = dc1.rounds.submit

            def hold_rounds(action: object) -> None:  # the session's SendRound waits here
                if isinstance(action, SendRound):
                    held.append(action)
                else:
                    submit(action)

            dc1.rounds.submit = hold_rounds  # type: ignore[method-assign]
            async with trio.open_nursery() as nursery:
                migrate: dict[str, Any] = {}

                async def run_migrate() -> None:
                    migrate["result"] = await dwcp("migrate", "web", "--to", "dc4",
                                                   "--api", api(dc1))

                nursery.start_soon(run_migrate)
                await wait_until(lambda: bool(held), "round 1 is asked for", 20)
                mid = held[0].migration_id
                assert dc1.need_core().sessions[mid].phase is Phase.PRECOPY
                await wait_vm(dc4, "web", "incoming")
                rc, out, err = await dwcp("cancel", mid, "--api", api(dc1))
                assert (rc, err) == (0, ""), err
                assert out.strip() == (f"cancelled {mid}: aborted in the ledger "
                                       "(cancelled by operator); web stays at dc1")
            rc, out, err = migrate["result"]
            assert rc == 2 and out == f"migration {mid}: web dc1 -> dc4\n", out
            assert err.strip().endswith(
                f"dwcp migrate: migration {mid} aborted: cancelled by operator")
            await wait_vm(dc1, "web", "running")
            await wait_vm(dc4, "web", "retired")
            await wait_until(lambda: ledgers_agree(nodes, mid, "aborted"),
                             "every ledger aborted", 20)

            del dc1.rounds.submit  # rounds run again
            code, doc = await api_migrate(dc1, "web", "dc4")
            assert code == 202
            done = doc["id"]
            assert await wait_outcome(dc1, done) == "committed"
            rc, out, err = await dwcp("cancel", done, "--json", "--api", api(dc4))
            assert rc == 2 and out == "", out
            # dc4 is not the source: it asks the ledger, which says why not
            assert err.strip() == (f"dwcp cancel: the ledger refused to cancel {done!r}: "
                                   f"migration {done!r} is already committed (HTTP 409)")
            rc, out, err = await dwcp("cancel", mid, "--no-wait", "--api", api(dc4))
            assert rc == 2 and f"migration {mid!r} is already aborted" in err
            status = json.loads((await dwcp("status", "--json", "--api", api(dc4)))[1])
            assert {m["id"]: m["ledger"] for m in status["migrations"]} == {
                mid: "aborted", done: "committed"}

    trio.run(main)


def test_cancel_during_a_v3_round_waits_for_its_worker_thread(tmp_path: Path,
                                                               monkeypatch: Any) -> None:
    """A v3 round's worker thread is still copying the shadow images when the cancel's
    abort is in the ledger and the VM resumes: the data plane's state of the migration is
    dropped only after that thread is done, never from under it (which would take the
    node down)."""
    cfg = make_federation(tmp_path / "fed")
    entered, release = threading.Event(), threading.Event()
    original = V3RoundSender._refresh

    def held_refresh(self: V3RoundSender) -> Any:
        entered.set()
        release.wait(30)
        return original(self)

    monkeypatch.setattr(V3RoundSender, "_refresh", held_refresh)

    async def main() -> None:
        async with running_nodes(cfg, tmp_path / "data") as nodes:
            dc1 = nodes["dc1"]
            await import_web(dc1, tmp_path)
            policy = SetPolicy(100, (), (), False)
            assert (await call(dc1, "POST", "/api/policy", policy))[0] == 200
            code, doc = await api_migrate(dc1, "web", "dc3")
            assert code == 202
            mid = doc["id"]
            await trio.to_thread.run_sync(entered.wait, 20)
            assert dc1.need_core().sessions[mid].version == 3
            code, doc = await call(dc1, "POST", f"/api/migrations/{mid}/cancel",
                                   CancelMigration(mid))
            assert code == 202, doc
            assert await wait_outcome(dc1, mid) == "aborted: cancelled by operator"
            await wait_vm(dc1, "web", "running")
            assert mid in dc1.v3.sender.sources, "dropped while its round's thread still runs"
            release.set()
            await wait_until(lambda: mid not in dc1.v3.sender.sources,
                             "the round's state is dropped", 20)
            assert (await call(dc1, "GET", "/health"))[0] == 200
            code, doc = await api_migrate(dc1, "web", "dc3")
            assert code == 202
            assert await wait_outcome(dc1, doc["id"]) == "committed"

    try:
        trio.run(main)
    finally:
        release.set()
