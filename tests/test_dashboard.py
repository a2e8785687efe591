"""The dashboard page (``GET /``, federation/api/dashboard.py): served self-contained; every
/api/status field its script reads is declared and exists in real status documents (of
a source, a target, a bystander and a node without a ledger); where Node.js is
installed, the script itself renders those documents against a minimal DOM; and where
a headless Chromium is installed (``make browser-check`` installs Debian's
chromium-headless-shell), a real browser loads the page from a running node."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from federation.api.dashboard import BINDINGS, PAGE, STATUS_FIELDS, script
from federation.node.status import status
from tests.harness.api import call, http
from tests.harness.node import (
    build_node,
    make_federation,
    real_vm,
    running_nodes,
    wait_outcome,
    wait_vm,
)

SVG_NAMESPACE = "http://www.w3.org/2000/svg"


def fields_read(js: str) -> set[str]:
    """Every status path the script reads through one of the BINDINGS variables."""
    names = "|".join(sorted(BINDINGS, key=len, reverse=True))
    found = set()
    for var, name in re.findall(rf"(?<![\w.$])({names})\.([A-Za-z_][A-Za-z0-9_]*)", js):
        base = BINDINGS[var]
        found.add(f"{base}.{name}" if base else name)
    return found


def resolves(doc: Any, path: str) -> bool:
    """``path`` (``a.*.b``, ``a[].b``) names a key present somewhere in ``doc``."""
    objs = [doc]
    parts = path.split(".")
    for i, part in enumerate(parts):
        many = part.endswith("[]")
        key = part[:-2] if many else part
        last = i == len(parts) - 1 and not many
        step: list[Any] = []
        for o in objs:
            if not isinstance(o, dict):
                continue
            if key == "*":
                step += list(o.values())
            elif key in o:
                if last:
                    return True
                step.append(o[key])
        if many:
            step = [x for v in step if isinstance(v, list) for x in v]
        objs = step
    return bool(objs)


def test_the_script_reads_exactly_the_declared_fields() -> None:
    read = fields_read(script())
    assert read - STATUS_FIELDS == set(), "the page reads undeclared status fields"
    assert STATUS_FIELDS - read == set(), "declared fields the page no longer reads"
    names = "|".join(BINDINGS)
    used = set(re.findall(rf"(?<![\w.$])({names})\.", script()))
    assert used == set(BINDINGS), f"bindings the script never reads: {set(BINDINGS) - used}"


def test_the_page_is_self_contained() -> None:
    html = PAGE.decode("utf-8")
    assert html.startswith("<!doctype html>") and html.count("<script>") == 1
    for pattern in (r"\bsrc\s*=", r"\bhref\s*=", r"@import", r"url\(", r"<link\b", r"<iframe\b"):
        assert re.search(pattern, html, re.IGNORECASE) is None, pattern
    assert set(re.findall(r"[a-z]+://[^\s\"']+", html)) == {SVG_NAMESPACE}
    assert 'fetch("/api/status"' in html and "innerHTML" not in html


def _docs(tmp_path: Path) -> dict[str, dict[str, Any]]:
    """Real status documents: after a committed migration dc1 -> dc2, at dc1 (source),
    dc2 (target) and dc3 (ledger only); and of a node whose federation has no ledger.
    Also checks what GET / serves."""
    cfg = make_federation(tmp_path / "fed")
    memory, disk = real_vm(tmp_path / "vm")
    docs: dict[str, dict[str, Any]] = {}

    async def main() -> None:
        async with running_nodes(cfg, tmp_path / "data") as nodes:
            dc1 = nodes["dc1"]
            code, headers, body = await http(
                dc1, b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            assert (code, headers["content-type"]) == (200, "text/html; charset=utf-8")
            assert body == PAGE
            code, doc = await call(dc1, "POST", "/api/vms", {
                "name": "web", "memory": str(memory), "disks": [str(disk)]})
            assert code == 201, doc
            code, doc = await call(dc1, "POST", "/api/migrations", {"vm": "web", "to": "dc2"})
            assert code == 202
            assert await wait_outcome(dc1, doc["id"]) == "committed"
            assert await wait_outcome(nodes["dc2"], doc["id"]) == "committed"
            await wait_vm(nodes["dc2"], "web", "running")
            for name in ("dc1", "dc2", "dc3"):
                code, docs[name] = await call(nodes[name], "GET", "/api/status")
                assert code == 200

    trio.run(main)
    solo = build_node(make_federation(tmp_path / "solo", count=2), "dc1", tmp_path / "solo-data")
    try:
        docs["no-ledger"] = json.loads(json.dumps(status(solo)))
    finally:
        solo.close()
    return docs


def _render(js: str, doc: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """Run the page's script under Node.js with a minimal DOM and ``doc`` as the answer of
    /api/status; returns the text of every element the script looked up by id."""
    node = shutil.which("node") or shutil.which("nodejs")
    assert node is not None
    harness = """
const doc = JSON.parse(require("fs").readFileSync(process.argv[2], "utf8"));
class FakeNode {
  constructor(tag) { this.tag = tag; this.kids = []; this.own = ""; this.style = {};
                     this.attrs = {}; this.className = ""; }
  set textContent(v) { this.own = String(v); this.kids = []; }
  get textContent() { return [this.own, ...this.kids.map(k => k.textContent)].join(" "); }
  appendChild(k) { this.kids.push(k); return k; }
  replaceChildren(...k) { this.kids = k; this.own = ""; }
  setAttribute(k, v) { this.attrs[k] = String(v); }
}
const ids = {};
globalThis.Node = FakeNode;
globalThis.document = {
  getElementById: id => ids[id] || (ids[id] = new FakeNode("div")),
  createElement: tag => new FakeNode(tag),
  createElementNS: (ns, tag) => new FakeNode(tag),
};
globalThis.fetch = async url => {
  if (url !== "/api/status") throw new Error("fetched " + url);
  return {ok: true, status: 200, json: async () => doc};
};
globalThis.setTimeout = () => {
  const out = {};
  for (const [id, e] of Object.entries(ids)) out[id] = e.textContent;
  out.banner_display = ids.banner.style.display;
  out.mesh_shapes = ids.mesh.kids.map(k => k.tag + ":" + (k.attrs.class || ""));
  console.log(JSON.stringify(out));
};
"""
    (tmp_path / "doc.json").write_text(json.dumps(doc))
    (tmp_path / "page.js").write_text(harness + js)
    run = subprocess.run([node, str(tmp_path / "page.js"), str(tmp_path / "doc.json")],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_every_field_exists_in_real_status_documents_and_renders(tmp_path: Path) -> None:
    docs = _docs(tmp_path)
    missing = sorted(p for p in STATUS_FIELDS if not any(resolves(d, p) for d in docs.values()))
    assert missing == [], f"/api/status lacks fields the dashboard reads: {missing}"
    assert resolves(docs["dc2"], "migrations[].received_bytes")
    assert not resolves(docs["dc1"], "nonexistent") and not resolves(docs["dc1"], "vms[].nope")

    if shutil.which("node") is None and shutil.which("nodejs") is None:
        pytest.skip("needs Node.js (node) to run the dashboard's script")
    src = _render(script(), docs["dc1"], tmp_path)
    assert src["banner_display"] == "none"
    assert "DC dc1 of federation local" in src["title"]
    mid = docs["dc1"]["migrations"][0]["id"]
    assert mid in src["migrations"] and "committed" in src["migrations"]
    assert "control link" in src["migrations"]  # a v1 migration, seen at its source
    relayed = json.loads(json.dumps(docs["dc1"]))
    relayed["migrations"][0].update(version=3, streams={"dc4": 6, "direct": 2},
                                    data_plane={"v3": 2})
    assert "via dc4, direct" in _render(script(), relayed, tmp_path)["migrations"]
    assert "web" in src["vms"] and "dc2" in src["vms"]
    assert src["peers"].count("alive") == 3 and src["peers"].count(" up ") == 3
    for kind in ("control", "bulk"):
        for peer, hops in docs["dc1"]["routes"][kind].items():
            unmeasured = docs["dc1"]["links"][peer]["mode"] is None
            shown = (("measuring" if unmeasured else "none") if hops is None
                     else "direct" if len(hops) == 2 else "via " + hops[1])
            assert shown in src["peers"]
    # No route: "measuring" while the link has no estimate yet, "none" once it has one.
    fresh = json.loads(json.dumps(docs["dc1"]))
    for peer in fresh["links"]:
        fresh["links"][peer]["mode"] = None
        fresh["routes"]["control"][peer] = fresh["routes"]["bulk"][peer] = None
    fresh["links"]["dc4"]["mode"] = "datacenter"
    shown = _render(script(), fresh, tmp_path)["peers"]
    assert shown.count("measuring") == 2 * (len(fresh["links"]) - 1) and shown.count("none") == 2
    detour = json.loads(json.dumps(docs["dc1"]))
    detour["routes"]["bulk"]["dc3"] = ["dc1", "dc4", "dc3"]
    detour["routes"]["control"]["dc3"] = ["dc1", "dc3"]
    shown = _render(script(), detour, tmp_path)["peers"]
    assert "via dc4" in shown and "direct" in shown
    assert "height" in src["ledger"] and "no DC convicted" in src["ledger"]
    assert src["policy"].startswith("v3 for 0% of VMs")
    assert src["mesh_shapes"].count("circle:alive") == 3
    tgt = _render(script(), docs["dc2"], tmp_path)
    assert "target" in tgt["migrations"] and tgt["banner_display"] == "none"
    bystander = _render(script(), docs["dc3"], tmp_path)
    assert mid in bystander["migrations"]
    alone = _render(script(), docs["no-ledger"], tmp_path)
    assert "PBFT needs" in alone["ledger"] and alone["policy"] == "-"


def _chromium() -> str | None:
    return shutil.which("chromium-headless-shell") or shutil.which("chromium")


def test_a_real_browser_renders_the_page_of_a_running_node(tmp_path: Path) -> None:
    """Chromium loads GET / from dc1 after a committed migration, runs the page's script
    against the live /api/status, and the DOM it leaves shows the migration, the VM,
    the peers and the ledger, with no script error on the console."""
    chromium = _chromium()
    if chromium is None:
        pytest.skip("needs a headless Chromium (`make browser-check` installs "
                    "chromium-headless-shell)")
    cfg = make_federation(tmp_path / "fed")
    memory, disk = real_vm(tmp_path / "vm")
    seen: dict[str, Any] = {}

    async def main() -> None:
        async with running_nodes(cfg, tmp_path / "data") as nodes:
            dc1 = nodes["dc1"]
            code, doc = await call(dc1, "POST", "/api/vms", {
                "name": "web", "memory": str(memory), "disks": [str(disk)]})
            assert code == 201, doc
            code, doc = await call(dc1, "POST", "/api/migrations", {"vm": "web", "to": "dc2"})
            assert code == 202
            seen["mid"] = doc["id"]
            assert await wait_outcome(dc1, doc["id"]) == "committed"
            url = f"http://{dc1.api_host}:{dc1.api_port}/"
            # Virtual time stands still while a fetch is pending, so the budget covers
            # the first poll and its redraw however slow the machine is.
            run = await trio.run_process(
                [chromium, "--headless", "--no-sandbox", "--disable-gpu",
                 f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=3000",
                 "--enable-logging=stderr", "--v=0", "--dump-dom", url],
                capture_stdout=True, capture_stderr=True, check=False)
            seen["dom"], seen["log"] = run.stdout.decode(), run.stderr.decode()
            assert run.returncode == 0, seen["log"][-2000:]

    trio.run(main)
    dom, log = seen["dom"], seen["log"]
    console = [ln for ln in log.splitlines() if ":CONSOLE" in ln]
    assert not [ln for ln in console if "Uncaught" in ln or "Error" in ln], console

    def text_of(element_id: str) -> str:
        match = re.search(rf'<[^>]+id="{element_id}"[^>]*>(.*?)</(?:div|table|section|p|h1|'
                          rf'span|svg|tbody|ul)>', dom, re.DOTALL)
        assert match is not None, f"no element {element_id!r} in the DOM"
        return re.sub(r"<[^>]+>", " ", match.group(1))

    assert "DC dc1 of federation local" in text_of("title")
    assert seen["mid"] in dom and "committed" in dom
    assert "web" in dom and "dc2" in dom
    assert dom.count("alive") >= 3
    assert 'id="banner"' in dom and re.search(r'id="banner"[^>]*display:\s*none', dom)
