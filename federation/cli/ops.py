"""The operator's commands; each talks to a node's HTTP API (:mod:`federation.api.http`).

::

    dwcp vm import NAME --memory FILE [--disk FILE ...]
    dwcp vm delete NAME                # through the ledger; every DC removes its copy
    dwcp vm purge NAME [--staged]      # remove this DC's retained copy of a VM that left
    dwcp vm create|start|stop|console ...   # qemu VMs: federation.cli.vm
    dwcp vms [--json]
    dwcp migrate NAME --to DC          # progress bar on stderr; non-zero exit on abort
    dwcp cancel MIGRATION_ID           # an operator's abort, through the ledger
    dwcp status [--json] [--request ID]

(``dwcp policy`` is :mod:`federation.cli.policy`.)

Every command whose request goes to the ledger (import, delete, migrate, cancel, policy
set) takes ``--request-id ID`` and prints the id it used when the answer is "pending":
the ledger did not answer in time, the command exits 3, and ``dwcp status --request ID``
tells the outcome later. Running the command again with ``--request-id ID`` is safe: the
request never applies twice (federation.node.requests).

Which node: ``--api URL`` (``--node`` is the same), else the ``api`` endpoint of the DC
named by ``--config FILE --name DC``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any, TextIO

from consensus.ledger import CancelMigration, DeleteVm
from federation import config
from federation.api.client import (
    CONFIG_ENV,
    KEY_ENV,
    ApiClient,
    ClientError,
    import_vm,
    load_signer,
    migrate_request,
)
from federation.cli.main import CommandError
from federation.cli.vm import add_qemu_commands
from federation.migration.vocabulary import CANCEL_REASON
from federation.vms.retention import PurgeVm

__all__ = ["PENDING_EXIT", "add_request_id", "ledger_call", "register_vm", "register_vms",
           "register_migrate", "register_cancel",
           "register_status", "Api", "node_api", "add_node_options", "table", "render_status",
           "render_progress"]

#: How often ``dwcp migrate`` polls the migration (the bar's refresh rate).
POLL_INTERVAL = 0.25
#: The exit status of a command whose request is pending in the ledger (outcome unknown
#: yet): not 0 (it did not happen yet), not 1/2 (it may still happen).
PENDING_EXIT = 3


class Pending(Exception):
    """The ledger has not answered yet; the message is the node's "pending, id X"."""


class Api(ApiClient):
    """The API client of the commands: a failure is a :class:`CommandError`."""

    def call(self, method: str, path: str, intent: object = None) -> tuple[int, Any]:
        try:
            return super().call(method, path, intent)
        except ClientError as exc:
            raise CommandError(str(exc)) from None

    def ok(self, method: str, path: str, intent: object = None) -> Any:
        try:
            return super().ok(method, path, intent)
        except ClientError as exc:
            raise CommandError(str(exc)) from None


def add_request_id(p: argparse.ArgumentParser) -> None:
    p.add_argument("--request-id", metavar="ID",
                   help="sign the request under this id (8-64 of A-Z a-z 0-9 . _ -): to send "
                        "again a request whose answer was 'pending' or lost; it never "
                        "applies twice (default: a new id)")


def ledger_call(api: ApiClient, method: str, path: str, intent: object,
                request_id: str | None) -> Any:
    """A request that goes to the ledger, under ``request_id`` if given; raises
    :class:`Pending` when the node answers that the ledger has not decided yet."""
    api.request_id = request_id
    try:
        doc = api.ok(method, path, intent)
    except ClientError as exc:
        raise CommandError(str(exc)) from None
    if isinstance(doc, dict) and doc.get("pending"):
        raise Pending(str(doc["message"]))
    return doc


def pending_exit(exc: Pending) -> int:
    print(exc)
    return PENDING_EXIT


def add_node_options(p: argparse.ArgumentParser) -> None:
    """``--api URL`` (``--node``), or ``--config FILE --name DC``: which node to ask;
    ``--key FILE`` (or ``$DWCP_OPERATOR_KEY``): the operator key every request is signed
    with, of an operator of the federation file (``--config`` or ``$DWCP_CONFIG``)."""
    p.add_argument("--api", "--node", dest="api", help="the node's API, http://HOST:PORT")
    p.add_argument("--config", type=Path, default=os.environ.get(CONFIG_ENV) or None,
                   help=f"the federation file (default ${CONFIG_ENV})")
    p.add_argument("--name", help="the DC whose node to ask (with --config)")
    p.add_argument("--key", type=Path, default=None,
                   help=f"your operator key file (default ${KEY_ENV})")


def node_api(args: argparse.Namespace) -> Api:
    """The API of the node the options of :func:`add_node_options` name, signing as the
    operator of ``--key``."""
    try:
        signer = load_signer(args.key, args.config)
    except ClientError as exc:
        raise CommandError(str(exc)) from None
    if args.api:
        try:
            return Api(args.api, signer)
        except ClientError as exc:
            raise CommandError(str(exc)) from None
    if args.config is None or args.name is None:
        raise CommandError("say which node: --api URL, or --config FILE --name DC")
    try:
        dc = config.load(args.config).dc(args.name)
    except config.ConfigError as exc:
        raise CommandError(str(exc)) from None
    return Api(f"http://{dc.api}", signer)


# --------------------------------------------------------------------------- vm import / vms


def register_vm(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("vm", help="manage VMs (import; create, start, stop, console for qemu)")
    vsub = p.add_subparsers(dest="vm_command", required=True, metavar="ACTION")
    imp = vsub.add_parser("import", help="import a VM at the node and register it as its own")
    imp.add_argument("vm", metavar="NAME")
    imp.add_argument("--memory", required=True, type=Path, help="memory image (4 KiB pages)")
    imp.add_argument("--disk", action="append", default=[], type=Path,
                     help="a disk image (repeat for more disks)")
    add_request_id(imp)
    add_node_options(imp)
    imp.set_defaults(func=run_import)
    delete = vsub.add_parser("delete", help="delete a VM through the ledger (every DC removes "
                                            "its copy), or a staged import never registered")
    delete.add_argument("vm", metavar="NAME")
    add_request_id(delete)
    add_node_options(delete)
    delete.set_defaults(func=run_delete)
    purge = vsub.add_parser("purge", help="remove the node's retained copy of a VM that "
                                          "migrated away (frees its disk)")
    purge.add_argument("vm", metavar="NAME")
    purge.add_argument("--staged", action="store_true",
                       help="also a staged import that was never registered")
    add_node_options(purge)
    purge.set_defaults(func=run_purge)
    add_qemu_commands(vsub)


def run_import(args: argparse.Namespace) -> int:
    """Stage (the node copies the images from its import directories), wait for the copy,
    then register with a request signed now (federation.node.imports)."""
    api = node_api(args)
    if args.request_id:  # sent before: the ledger may have its outcome already
        known = api.ok("GET", f"/api/requests/{urllib.parse.quote(args.request_id, safe='')}")
        if known["outcome"] in ("committed", "refused"):
            return _print_recorded(known)
    api.request_id = args.request_id
    try:
        doc = import_vm(api, args.vm, os.path.abspath(args.memory),
                        tuple(os.path.abspath(d) for d in args.disk), POLL_INTERVAL)
    except ClientError as exc:
        raise CommandError(str(exc)) from None
    if doc.get("pending"):
        return pending_exit(Pending(doc["message"]))
    if "request" in doc:
        return _print_recorded(doc["request"])
    pages = sum(n for _, n in doc["layout"])
    print(f"imported {doc['name']}: {pages} pages, epoch {doc['epoch']}, {doc['state']} "
          f"(request {doc['request_id']})")
    return 0


def _print_recorded(request: dict[str, Any]) -> int:
    """A request the ledger executed before: its first outcome."""
    rid = request["request_id"]
    what = f"{_command(request['command'])} {request['subject']}"
    if request["outcome"] == "refused":
        raise CommandError(f"request {rid} ({what}) was refused by the ledger: "
                           f"{request['error']}")
    print(f"request {rid} ({what}) was committed before (epoch {request['epoch']}); "
          "nothing applied again")
    return 0


def run_delete(args: argparse.Namespace) -> int:
    api = node_api(args)
    path = f"/api/vms/{urllib.parse.quote(args.vm, safe='')}"
    try:
        doc = ledger_call(api, "DELETE", path, DeleteVm(args.vm), args.request_id)
    except Pending as exc:
        return pending_exit(exc)
    if "request" in doc:
        return _print_recorded(doc["request"])
    if doc.get("staged_only"):
        print(f"deleted {args.vm}: a staged import, never registered; its files are gone")
        return 0
    print(f"deleted {args.vm} at epoch {doc['epoch']} (request {doc['request_id']}): every "
          "DC removes its copy")
    return 0


def run_purge(args: argparse.Namespace) -> int:
    """Sign a PurgeVm for this node (role operator); the node refuses a VM that runs,
    is fenced, is arriving or that the ledger gives to its DC."""
    api = node_api(args)
    path = f"/api/vms/{urllib.parse.quote(args.vm, safe='')}/purge"
    doc = api.ok("POST", path, PurgeVm(args.vm, args.staged))
    print(f"purged {doc['name']}: freed {_human(doc['freed_bytes'])}")
    return 0


def register_vms(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("vms", help="list the VMs the ledger and the node know")
    p.add_argument("--json", action="store_true")
    add_node_options(p)
    p.set_defaults(func=run_vms)


def run_vms(args: argparse.Namespace) -> int:
    vms = node_api(args).ok("GET", "/api/vms")
    if args.json:
        print(json.dumps(vms, indent=2))
        return 0
    rows = [["VM", "OWNER", "EPOCH", "HERE", "PAGES", "MIGRATING"]]
    for v in vms:
        rows.append([v["name"], _s(v["owner"]), _s(v["epoch"]), _s(v["here"]),
                     _s(v["pages"]), _s(v["migrating"])])
    print(table(rows))
    return 0


# --------------------------------------------------------------------------- migrate


def register_migrate(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("migrate", help="live-migrate a VM to another DC (progress on stderr)")
    p.add_argument("vm", metavar="NAME")
    p.add_argument("--to", required=True, metavar="DC", help="the target DC")
    p.add_argument("--json", action="store_true", help="print the final migration as JSON")
    add_request_id(p)
    add_node_options(p)
    p.set_defaults(func=run_migrate)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def render_progress(m: dict[str, Any], width: int = 24) -> str:
    """One line: phase, round, a bar of bytes sent over the VM's size, dirty rate, ETA."""
    total = m.get("total_bytes") or 0
    sent = m.get("bytes_sent") or 0
    frac = min(1.0, sent / total) if total else 0.0
    bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
    eta = m.get("eta")
    eta_s = "?" if eta is None or not math.isfinite(eta) else f"{eta:.1f}s"
    pages = m.get("pages_sent")
    pages_s = "" if pages is None else f", {pages} pages"
    # a round's preparation (v3 round 1: the shadow's copy, digests and index) moves
    # nothing yet but is progress: say how far it got
    prepared = (m.get("progress") or {}).get("prepared") or 0
    pages_s += f", preparing: {prepared} pages" if prepared else ""
    return (f"{m.get('phase', m.get('ledger', '?')):<9} round {m.get('round', 0):>2} "
            f"[{bar}] {_human(sent)}{pages_s} (wire {_human(m.get('wire_bytes') or 0)}) "
            f"dirty {m.get('dirty_rate', 0.0):.0f} pages/s  eta {eta_s}")


def run_migrate(args: argparse.Namespace) -> int:
    api = node_api(args)
    try:  # the request names the owner and the epoch the operator moves the VM from
        intent = migrate_request(api, args.vm, args.to)
    except ClientError as exc:
        raise CommandError(str(exc)) from None
    try:
        started = ledger_call(api, "POST", "/api/migrations", intent, args.request_id)
    except Pending as exc:
        return pending_exit(exc)
    mid = started["id"]
    # the id first, before any progress: what `dwcp cancel` and `dwcp status` take (with
    # --json, stdout is the final document alone, so the id goes to stderr)
    print(f"migration {mid}: {args.vm} {intent.source} -> {args.to}",
          file=sys.stderr if args.json else sys.stdout, flush=True)
    tty = sys.stderr.isatty()
    last = ""
    try:
        while True:
            m = api.ok("GET", _migration_path(mid))
            line = render_progress(m)
            if line != last:
                _progress_line(sys.stderr, line, tty)
                last = line
            outcome = m.get("outcome")
            if outcome is not None:
                break
            time.sleep(POLL_INTERVAL)
    except KeyboardInterrupt:
        sys.stderr.write(f"\nmigration {mid} goes on at the node; `dwcp cancel {mid}` "
                         "aborts it\n")
        raise
    if tty:
        sys.stderr.write("\n")
    if args.json:
        print(json.dumps(m, indent=2))
    if outcome["outcome"] != "committed":
        raise CommandError(f"migration {mid} {outcome['outcome']}: {outcome['reason']}")
    print(f"migrated {args.vm} to {args.to}: {mid} committed in {outcome['rounds']} rounds, "
          f"{_human(outcome['bytes_sent'])} sent ({_human(outcome['wire_bytes'])} on the wire), "
          f"fenced {outcome['fenced_seconds'] * 1000:.0f} ms")
    return 0


def _progress_line(stream: TextIO, line: str, tty: bool) -> None:
    stream.write(("\r\x1b[K" + line) if tty else line + "\n")
    stream.flush()


def _migration_path(mid: str, action: str = "") -> str:
    return f"/api/migrations/{urllib.parse.quote(mid, safe='')}{action}"


# --------------------------------------------------------------------------- cancel


def register_cancel(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("cancel", help="cancel a running migration (an abort in the ledger)")
    p.add_argument("migration", metavar="MIGRATION_ID")
    p.add_argument("--no-wait", action="store_true",
                   help="return once the source took the cancel, not when the ledger decided")
    p.add_argument("--json", action="store_true", help="print the final migration as JSON")
    add_request_id(p)
    add_node_options(p)
    p.set_defaults(func=run_cancel)


def run_cancel(args: argparse.Namespace) -> int:
    api = node_api(args)
    mid = args.migration
    try:
        m = ledger_call(api, "POST", _migration_path(mid, "/cancel"), CancelMigration(mid),
                        args.request_id)
    except Pending as exc:
        return pending_exit(exc)
    if "request" in m:
        m = api.ok("GET", _migration_path(mid))
    # the answer is the source's session (the node forwards a cancel to the source); a
    # node that is not the source may know only the ledger's record while we poll it
    asked = m.get("reason") or CANCEL_REASON
    while not args.no_wait and _decided(m) is None:
        time.sleep(POLL_INTERVAL)
        m = api.ok("GET", _migration_path(mid))
    if args.json:
        print(json.dumps(m, indent=2))
    decided = _decided(m)
    if decided is None:
        print(f"cancelling {mid}: the source is {m.get('phase', '?')}; the ledger decides "
              f"(follow it with `dwcp status`)")
        return 0
    if decided == "committed":
        raise CommandError(f"migration {mid} committed before the cancel took effect: "
                           f"{m.get('vm')} now runs at {m.get('target')}")
    reason = (m.get("outcome") or {}).get("reason") if m.get("role") == "source" else asked
    print(f"cancelled {mid}: aborted in the ledger ({reason}); "
          f"{m.get('vm')} stays at {m.get('source')}")
    return 0


def _decided(m: dict[str, Any]) -> str | None:
    """The ledger's final word on a migration document, or None while it is open. A node
    with no session of the migration has only the ledger's record to go by."""
    outcome = m.get("outcome")
    if outcome is not None and outcome.get("outcome") in ("committed", "aborted"):
        return str(outcome["outcome"])
    if m.get("ledger") in ("committed", "aborted") and "role" not in m:
        return str(m["ledger"])
    return None


# --------------------------------------------------------------------------- status


def register_status(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("status", help="the node's view: members, links, routes, ledger, VMs")
    p.add_argument("--json", action="store_true")
    p.add_argument("--request", metavar="ID",
                   help="only the outcome of your request ID: committed, refused, pending, "
                        "unknown")
    p.add_argument("--operator", metavar="NAME",
                   help="with --request: another operator's request")
    add_node_options(p)
    p.set_defaults(func=run_status)


def run_status(args: argparse.Namespace) -> int:
    if args.request:
        return _request_status(args)
    doc = node_api(args).ok("GET", "/api/status")
    print(json.dumps(doc, indent=2) if args.json else render_status(doc))
    return 0


def _request_status(args: argparse.Namespace) -> int:
    rid = urllib.parse.quote(args.request, safe="")
    path = (f"/api/requests/{urllib.parse.quote(args.operator, safe='')}/{rid}"
            if args.operator else f"/api/requests/{rid}")
    doc = node_api(args).ok("GET", path)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(render_request(doc))
    return PENDING_EXIT if doc["outcome"] == "pending" else 0


def render_request(doc: dict[str, Any]) -> str:
    """One line: the outcome of an operator request."""
    head = f"request {doc['request_id']} of {doc['operator']}: {doc['outcome']}"
    if doc["outcome"] == "unknown":
        return (head + " (neither the ledger nor this node knows it: it did not apply; "
                "sending it again under this id is safe)")
    what = f" ({_command(doc['command'])} {doc['subject']})"
    if doc["outcome"] == "committed":
        return head + what + f", epoch {doc['epoch']}"
    if doc["outcome"] == "refused":
        return head + what + f": {doc['error']}"
    return head + what + ", not in the ledger yet"


def _command(tag: str | None) -> str:
    """An operator intent's wire tag as a word: ``operator.delete-vm`` -> ``delete-vm``."""
    return "?" if tag is None else tag.removeprefix("operator.")


def _s(v: Any) -> str:
    return "-" if v is None else str(v)


def table(rows: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart; the first row is the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def data_path(migration: dict[str, Any]) -> str:
    """Where a migration's data went, as its source saw it: the DCs that relayed its v3
    streams ("direct" for none), or the control link for v1 rounds; "-" elsewhere and
    before any data went."""
    streams = migration.get("streams")
    if streams is None:
        return "-"
    via = ["direct" if k == "direct" else f"via {k}" for k in streams]
    if (migration.get("data_plane") or {}).get("v1"):
        via.append("control link")
    return ", ".join(via) or "-"


def downtime(migration: dict[str, Any]) -> str:
    """The guest's measured downtime (stop at the source to cont here), known at the
    target of a qemu VM's migration; at its source, the stop window's fixed part the
    round policy reserved out of the downtime limit; "-" elsewhere."""
    ms = migration.get("downtime_ms")
    if ms is not None:
        return f"{ms:.0f} ms"
    reserve = migration.get("stop_reserve_ms")
    return "-" if reserve is None else f"reserve {reserve:.0f} ms"


def stop_reserve(doc: dict[str, Any]) -> str:
    """The stop window's fixed part a migration from this DC reserves out of its downtime
    limit, and what it was taken from (the recent maximum of the node's measurements, or
    the prior where none or too few were measured)."""
    parts = doc["reserved_ms"]
    counts = doc["measured"]
    def source(n: int) -> str:
        if not n:
            return "prior"
        return f"max of {n}" if n >= doc["trusted"] else f"max of {n}, prior as floor"
    each = ", ".join(f"{k.removesuffix('_s')} {v:.0f} ms ({source(counts.get(k, 0))})"
                     for k, v in parts.items())
    line = f"{doc['reserve_ms']:.0f} ms = {each}; bias {doc['bias']:g}"
    if doc.get("load_error"):
        line += f" (stored history unreadable: {doc['load_error']})"
    return line


def render_status(doc: dict[str, Any]) -> str:
    led = doc["ledger"]
    if "unavailable" in led:
        ledger = led["unavailable"]
    else:
        ledger = (f"height {led['height']}, view {led['view']} (primary {led['primary']}), "
                  f"checkpoint {led['stable_checkpoint']}")
    out = [f"DC {doc['dc']} of federation {doc['federation']}", f"ledger: {ledger}",
           f"data plane: {doc['data_plane']}"]
    if doc.get("stop_reserve"):
        out.append(f"stop window reserve: {stop_reserve(doc['stop_reserve'])}")
    out += [f"PROBLEM: {p}" for p in doc.get("problems", [])]
    out.append("")
    rows = [["PEER", "MEMBER", "LINK", "RTT ms", "LOSS", "Mbit/s", "MODE", "CONTROL", "BULK"]]
    for peer, state in doc["members"].items():
        link = doc["links"][peer]
        rtt = link["rtt_ms"]
        routes = [doc["routes"].get(kind, {}).get(peer) for kind in ("control", "bulk")]
        rows.append([
            peer, state, "up" if link["connected"] else "down",
            "-" if rtt is None else f"{rtt:.1f}",
            "-" if link["loss"] is None else f"{link['loss']:.2%}",
            "-" if link["bandwidth_mbps"] is None else f"{link['bandwidth_mbps']:.0f}",
            _s(link["mode"]),
            *("-" if r is None else ">".join(r[1:]) for r in routes),
        ])
    out += [table(rows), ""]
    vms = [["VM", "OWNER", "EPOCH", "HERE", "MIGRATING"]]
    vms += [[v["name"], _s(v["owner"]), _s(v["epoch"]), _s(v["here"]), _s(v["migrating"])]
            for v in doc["vms"]]
    out += [table(vms) if len(vms) > 1 else "no VMs", ""]
    migs = [["MIGRATION", "VM", "FROM", "TO", "LEDGER", "PHASE", "ROUND", "SENT", "PATH",
             "DOWNTIME"]]
    migs += [[m["id"], _s(m.get("vm")), _s(m.get("source")), _s(m.get("target")),
              _s(m.get("ledger")), _s(m.get("phase")), _s(m.get("round")),
              _human(m.get("bytes_sent") or 0), data_path(m), downtime(m)]
             for m in doc["migrations"]]
    out.append(table(migs) if len(migs) > 1 else "no migrations")
    total = doc.get("migrations_total", len(doc["migrations"]))
    if total > len(doc["migrations"]):
        out.append(f"(the {len(doc['migrations'])} begun last or under way of {total}; "
                   "GET /api/migrations/ID shows any other)")
    # why each aborted migration aborted: the ledger's reason (the deciding DC's words),
    # else this side's; one line each, since a reason does not fit a column
    why = [f"  {m['id']}: aborted: {m['reason']}" for m in doc["migrations"]
           if m.get("reason") and (m.get("ledger") == "aborted" or m.get("phase") in
                                   ("aborted", "aborting"))]
    if why:
        out += ["", "REASONS", *why]
    return "\n".join(out)
