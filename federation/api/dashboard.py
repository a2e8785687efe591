"""The node's dashboard: one self-contained HTML page, served at ``GET /`` on the API.

The page loads nothing else — no script, style sheet, font or image from anywhere —
so it works on a management network without internet access. A small inline script
polls ``/api/status`` every :data:`POLL_MS` milliseconds and redraws: this DC and its
peers as a mesh (lines coloured by link mode, dashed while the control link is down),
members and link estimates, control and bulk routes (direct, or via a third DC), the
ledger (height, view, primary, checkpoint) and its Byzantine evidence, the rollout
policy, the VMs with their owners, and the migrations with their progress (round,
bytes, dirty rate, ETA) or their outcome. Every value is written with ``textContent``
(a VM name is operator input): the script never builds HTML from data.

The script reads the status document only through the variables of :data:`BINDINGS`
(``st.members``, ``mg.round``, ...). ``tests/test_dashboard.py`` finds every such read
in the script, requires the set to equal :data:`STATUS_FIELDS`, and resolves each of
those paths in real status documents, so the page and ``/api/status`` cannot drift
apart unnoticed.
"""

from __future__ import annotations

import base64
import hashlib

__all__ = ["PAGE", "HTML", "BINDINGS", "STATUS_FIELDS", "POLL_MS", "script", "CSP"]

#: How often the page polls /api/status: the gossip and link estimates it shows change
#: about once a second (mesh.gossip.membership's protocol period is 1 s), so faster shows nothing.
POLL_MS = 1000

#: The script's variables that hold a part of the status document, and which part:
#: ``*`` is any value of a map, ``[]`` any item of a list.
BINDINGS: dict[str, str] = {
    "st": "",
    "lk": "links.*",
    "rt": "routes",
    "led": "ledger",
    "byz": "ledger.byzantine",
    "pol": "policy",
    "vm": "vms[]",
    "mg": "migrations[]",
    "oc": "migrations[].outcome",
}

#: Every status field the page reads (checked against the script and real documents).
STATUS_FIELDS: frozenset[str] = frozenset({
    "dc", "federation", "data_plane", "members", "links", "routes", "ledger", "policy",
    "vms", "migrations", "restoring",
    "links.*.connected", "links.*.rtt_ms", "links.*.loss", "links.*.bandwidth_mbps",
    "links.*.mode",
    "routes.control", "routes.bulk",
    "ledger.unavailable", "ledger.height", "ledger.view", "ledger.primary", "ledger.active",
    "ledger.stable_checkpoint", "ledger.byzantine",
    "ledger.byzantine.convicted", "ledger.byzantine.invalid_signatures",
    "ledger.byzantine.malformed",
    "policy.v3_percent", "policy.target_dcs", "policy.target_vms", "policy.kill_switch",
    "policy.target_regions", "policy.excluded_dcs", "policy.rolled_back",
    "vms[].name", "vms[].owner", "vms[].epoch", "vms[].here", "vms[].pages",
    "vms[].migrating",
    "migrations[].id", "migrations[].vm", "migrations[].source", "migrations[].target",
    "migrations[].role", "migrations[].ledger", "migrations[].phase", "migrations[].round",
    "migrations[].bytes_sent", "migrations[].received_bytes", "migrations[].total_bytes",
    "migrations[].wire_bytes", "migrations[].dirty_rate", "migrations[].eta",
    "migrations[].version", "migrations[].streams", "migrations[].data_plane",
    "migrations[].outcome", "migrations[].reason", "migrations[].pages_sent",
    "migrations[].outcome.outcome", "migrations[].outcome.reason",
    "migrations[].outcome.fenced_seconds",
})

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1em 2em; color: #222; background: #fafafa; }
h1 { font-size: 1.3em; margin: 0 0 .2em; } h2 { font-size: 1.05em; margin: 1.2em 0 .3em; }
table { border-collapse: collapse; margin-bottom: .5em; }
th, td { text-align: left; padding: .15em .8em .15em 0; white-space: nowrap; }
th { font-weight: 600; border-bottom: 1px solid #ccc; }
.muted { color: #777; } .bad { color: #b00020; font-weight: 600; } .ok { color: #1b7f3b; }
#banner { padding: .3em .6em; margin: .3em 0; background: #fde2e2; display: none; }
.bar { display: inline-block; width: 12em; height: .8em; background: #e4e4e4;
       vertical-align: middle; } .bar > div { height: 100%; background: #3b6fd8; }
#mesh { background: #fff; border: 1px solid #ddd; }
.alive { fill: #1b7f3b; } .suspect { fill: #d08c00; } .dead, .left { fill: #b00020; }
.self { fill: #3b6fd8; }
"""

_SCRIPT = """
"use strict";
const POLL_MS = __POLL_MS__;
const SVG = "http://www.w3.org/2000/svg";
const MODE_COLOUR = {datacenter: "#1b7f3b", hybrid: "#d08c00", internet: "#b00020"};

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function dash(v) { return v === null || v === undefined ? "-" : v; }
function bytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i === 0 ? n.toFixed(0) + " B" : n.toFixed(1) + " " + units[i];
}
function table(id, head, rows, empty) {
  const box = document.getElementById(id);
  box.replaceChildren();
  if (!rows.length) { box.appendChild(el("p", empty, "muted")); return; }
  const t = el("table"), tr = el("tr");
  head.forEach(h => tr.appendChild(el("th", h)));
  t.appendChild(tr);
  rows.forEach(r => {
    const row = el("tr");
    r.forEach(c => {
      const td = el("td");
      if (c instanceof Node) td.appendChild(c); else td.textContent = String(dash(c));
      row.appendChild(td);
    });
    t.appendChild(row);
  });
  box.appendChild(t);
}
function route(hops, lk) {
  // No route yet while the link has no estimate (the first seconds after a start).
  if (!hops) return lk.mode === null ? el("span", "measuring", "muted") : el("span", "none", "bad");
  return el("span", hops.length <= 2 ? "direct" : "via " + hops.slice(1, -1).join(", "));
}
function dataPath(mg) {
  // Only the source knows: its v3 streams by the DC that relayed them, v1 rounds on the
  // control link.
  if (mg.streams === undefined) return null;
  const via = Object.keys(mg.streams).map(k => k === "direct" ? "direct" : "via " + k);
  if (mg.data_plane.v1) via.push("control link");
  return via.length ? via.join(", ") : null;
}
function bar(fraction) {
  const outer = el("span", null, "bar"), inner = el("div");
  inner.style.width = (100 * Math.max(0, Math.min(1, fraction))).toFixed(0) + "%";
  outer.appendChild(inner);
  return outer;
}

function drawMesh(st) {
  const svg = document.getElementById("mesh");
  svg.replaceChildren();
  const peers = Object.keys(st.members);
  const cx = 170, cy = 130, r = 100;
  const at = {};
  peers.forEach((p, i) => {
    const a = 2 * Math.PI * i / Math.max(1, peers.length) - Math.PI / 2;
    at[p] = [cx + r * Math.cos(a), cy + r * Math.sin(a)];
  });
  const shape = (tag, attrs) => {
    const e = document.createElementNS(SVG, tag);
    Object.entries(attrs).forEach(([k, v]) => e.setAttribute(k, v));
    svg.appendChild(e);
    return e;
  };
  peers.forEach(p => {
    const lk = st.links[p];
    const line = shape("line", {x1: cx, y1: cy, x2: at[p][0], y2: at[p][1],
                               stroke: MODE_COLOUR[lk.mode] || "#999", "stroke-width": 3});
    if (!lk.connected) line.setAttribute("stroke-dasharray", "6 4");
  });
  const label = (x, y, text) => { shape("text", {x: x, y: y, "text-anchor": "middle"})
    .textContent = text; };
  shape("circle", {cx: cx, cy: cy, r: 16, class: "self"});
  label(cx, cy + 32, st.dc);
  peers.forEach(p => {
    shape("circle", {cx: at[p][0], cy: at[p][1], r: 12, class: st.members[p]});
    label(at[p][0], at[p][1] + 26, p + " (" + st.members[p] + ")");
  });
}

function render(st) {
  document.getElementById("title").textContent =
    "DC " + st.dc + " of federation " + st.federation;
  document.getElementById("plane").textContent = st.data_plane;
  drawMesh(st);
  const rt = st.routes;
  table("peers", ["peer", "member", "link", "RTT ms", "loss", "Mbit/s", "mode",
                  "control route", "bulk route"],
        Object.keys(st.members).map(p => {
          const lk = st.links[p];
          return [p, el("span", st.members[p], st.members[p] === "alive" ? "ok" : "bad"),
                  lk.connected ? "up" : el("span", "down", "bad"),
                  lk.rtt_ms === null ? null : lk.rtt_ms.toFixed(1),
                  lk.loss === null ? null : (100 * lk.loss).toFixed(2) + "%",
                  lk.bandwidth_mbps === null ? null : lk.bandwidth_mbps.toFixed(0),
                  lk.mode, route(rt.control[p], lk), route(rt.bulk[p], lk)];
        }), "no peers");

  const led = st.ledger;
  const ledger = document.getElementById("ledger");
  ledger.replaceChildren();
  if (led.unavailable !== undefined) {
    ledger.appendChild(el("p", led.unavailable, "bad"));
  } else {
    ledger.appendChild(el("p", "height " + led.height + ", view " + led.view + " (primary " +
      led.primary + (led.active ? "" : ", view change in progress") + "), stable checkpoint " +
      led.stable_checkpoint));
    const byz = led.byzantine;
    const bad = Object.entries(byz.invalid_signatures).map(([d, n]) => d + ": " + n +
      " bad signatures").concat(Object.entries(byz.malformed).map(([d, n]) => d + ": " + n +
      " malformed"));
    ledger.appendChild(el("p", byz.convicted.length
      ? "Byzantine: convicted of equivocation: " + byz.convicted.join(", ")
      : "Byzantine: no DC convicted", byz.convicted.length ? "bad" : "ok"));
    if (bad.length) ledger.appendChild(el("p", "refused messages: " + bad.join("; "), "bad"));
  }
  const pol = st.policy;
  document.getElementById("policy").textContent = pol === null ? "-" :
    (pol.rolled_back ? "ROLLED BACK by the ledger: " + pol.rolled_back + ". " : "") +
    (pol.kill_switch ? "KILL SWITCH ON: v1 only. " : "") + "v3 for " + pol.v3_percent +
    "% of VMs; target DCs: " + (pol.target_dcs.join(", ") || "-") + "; target regions: " +
    (pol.target_regions.join(", ") || "-") + "; target VMs: " +
    (pol.target_vms.join(", ") || "-") + "; excluded DCs: " +
    (pol.excluded_dcs.join(", ") || "-");
  document.getElementById("restoring").textContent = st.restoring.length
    ? "restoring after a restart: " + st.restoring.join(", ") : "";

  table("vms", ["VM", "owner", "epoch", "here", "pages", "migrating"],
        st.vms.map(vm => [vm.name, vm.owner, vm.epoch, vm.here, vm.pages, vm.migrating]),
        "no VMs");
  table("migrations", ["migration", "VM", "from", "to", "role", "ledger", "phase", "round",
                       "progress", "sent (wire)", "dirty pages/s", "ETA", "version",
                       "data path", "outcome"],
        st.migrations.map(mg => {
          const moved = mg.role === "target" ? mg.received_bytes : mg.bytes_sent;
          const total = mg.total_bytes || 0;
          const oc = mg.outcome;
          // an abort's reason: the ledger's (the deciding DC's words) before this side's
          const why = mg.ledger === "aborted" && mg.reason ? mg.reason
            : oc === undefined ? "" : oc.reason;
          const end = oc === undefined ? (why ? el("span", "aborted: " + why, "bad") : null)
            : el("span", oc.outcome + (why ? ": " + why : "") + (oc.fenced_seconds ? " (fenced " +
            (1000 * oc.fenced_seconds).toFixed(0) + " ms)" : ""),
            oc.outcome === "committed" ? "ok" : "bad");
          const eta = mg.eta === null ? "?" : mg.eta === undefined ? null
            : mg.eta.toFixed(1) + " s";
          return [mg.id, mg.vm, mg.source, mg.target, mg.role, mg.ledger, mg.phase, mg.round,
                  total ? bar((moved || 0) / total) : null,
                  moved === undefined ? null : bytes(moved) + (mg.pages_sent === undefined ? ""
                    : ", " + mg.pages_sent + " pages") + " (" + bytes(mg.wire_bytes) + ")",
                  mg.dirty_rate === undefined ? null : mg.dirty_rate.toFixed(0), eta,
                  mg.version === undefined ? null : "v" + mg.version, dataPath(mg), end];
        }), "no migrations");
}

async function poll() {
  const banner = document.getElementById("banner");
  try {
    const answer = await fetch("/api/status", {cache: "no-store"});
    if (!answer.ok) throw new Error("HTTP " + answer.status);
    render(await answer.json());
    banner.style.display = "none";
    document.getElementById("updated").textContent =
      "updated " + new Date().toLocaleTimeString();
  } catch (err) {
    banner.textContent = "cannot read /api/status: " + err.message + " (retrying)";
    banner.style.display = "block";
  }
  setTimeout(poll, POLL_MS);
}
poll();
"""

HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>DWCP node</title>
<style>__STYLE__</style>
</head>
<body>
<h1 id="title">DWCP node</h1>
<div class="muted"><span id="updated">loading /api/status ...</span></div>
<div id="banner"></div>
<h2>Mesh</h2>
<svg id="mesh" width="340" height="270" role="img" aria-label="links from this DC"></svg>
<p class="muted">lines: link mode (green datacenter, amber hybrid, red internet, grey
unclassified), dashed while the control link is down; circles: membership state</p>
<h2>Peers, link estimates and routes</h2><div id="peers"></div>
<p class="muted">data plane: <span id="plane"></span></p>
<h2>Ledger</h2><div id="ledger"></div>
<p>rollout policy: <span id="policy"></span></p>
<p class="bad" id="restoring"></p>
<h2>VMs</h2><div id="vms"></div>
<h2>Migrations</h2><div id="migrations"></div>
<script>__SCRIPT__</script>
</body>
</html>
""".replace("__STYLE__", _STYLE).replace("__SCRIPT__", _SCRIPT.replace("__POLL_MS__", str(POLL_MS)))

#: The page as served.
PAGE = HTML.encode("utf-8")


def script() -> str:
    """The page's inline script (what the field check reads)."""
    return HTML.split("<script>", 1)[1].split("</script>", 1)[0]


def _source_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


#: The page's Content-Security-Policy: its own inline script and style sheet (by hash),
#: requests to its own origin, nothing else — no other script, no frame around it, no
#: form target (CSP Level 3, W3C; the hash form of script-src, section 8.2).
CSP = ("default-src 'none'; "
       f"script-src {_source_hash(script())}; style-src {_source_hash(_STYLE)}; "
       "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")
