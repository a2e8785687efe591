"""WAN latency for ``make netns-chaos-wan``: a :mod:`bench.wan_relay` process in every
DC's namespace, and each DC's own view of the federation file pointing its peers'
control and data endpoints at that relay (issue 18, item 1).

DC ``d``'s view gives every peer ``p``'s control and data endpoint as
``127.0.0.1:PORT`` (the port the federation file gives it); ``d``'s relay listens there,
inside ``d``'s namespace, and forwards to ``p``'s real endpoint across the tbf-shaped
links, holding each direction for the one-way latency ``d`` -> ``p`` of
:data:`LATENCY_MS`. So every connection a DC opens crosses exactly one relay (its own),
and the peer sees it come from the DC's own address, as without relays. A view differs
from the federation file only in endpoints, which its digest leaves out
(federation/config_print.py): the handshakes still agree. The harness reaches the
nodes' APIs directly (the API endpoints are not relayed).

Killing a DC's relay (``kill -9``, the ``relay-kill9`` fault) ends every connection
that DC opened and refuses new ones until it is started again: its peers can still
reach it; it cannot reach them.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
from pathlib import Path

from federation import config
from sim.geo import REGIONS, RTT_MS

#: The four DCs placed on regions of the simulator's ``geo`` preset (sim/geo.py):
#: two a short hop apart in Europe, one across the Atlantic, one across Eurasia, so
#: one-way latencies span 13-118 ms (a measured P50 round trip, halved per direction).
PLACES = {"dc1": "North Europe", "dc2": "Germany West Central", "dc3": "East US",
          "dc4": "Japan East"}
#: One-way latency a -> b in milliseconds: half the published RTT from a's region to b's.
LATENCY_MS: dict[tuple[str, str], float] = {
    (a, b): RTT_MS[REGIONS.index(ra)][REGIONS.index(rb)] / 2
    for a, ra in PLACES.items() for b, rb in PLACES.items() if a != b}
#: How long a relay may take to print "ready" (a Python start under load).
READY_S = 60.0

_ROOT = Path(__file__).resolve().parent.parent


class RelayFailed(Exception):
    """A relay process did not start (names the DC and its log)."""


def view(cfg: Path, dc: str) -> Path:
    """``dc``'s copy of the federation file ``cfg``: every other DC's control and data
    endpoint at 127.0.0.1 on the same port (``dc``'s relay); its own entry, every API
    endpoint and everything else as in ``cfg``."""
    blocks = re.split(r"(?m)^(?=\[\[)", cfg.read_text())
    out = []
    for block in blocks:
        m = re.match(r'\[\[dc\]\]\nname = "([^"]+)"', block)
        if m and m.group(1) != dc:
            block, n = re.subn(r'(?m)^(control|data) = "[^"]*:(\d+)"$',
                               r'\1 = "127.0.0.1:\2"', block)
            if n != 2:
                raise ValueError(f"{cfg}: {m.group(1)}'s entry has no control and data "
                                 "endpoints to relay")
        out.append(block)
    path = cfg.with_name(f"federation-{dc}.toml")
    path.write_text("".join(out))
    mine, theirs = config.load(path), config.load(cfg)
    assert mine.dc(dc) == theirs.dc(dc), "a DC's own entry stays as it is"
    return path


def routes(cfg: Path, dc: str) -> list[str]:
    """``--route`` arguments of ``dc``'s relay: each peer's control and data endpoint."""
    fed = config.load(cfg)
    out = []
    for peer in fed.dcs:
        if peer.name == dc:
            continue
        for ep in (peer.control, peer.data):
            out.append(f"127.0.0.1:{ep.port}={ep.host}:{ep.port}@"
                       f"{LATENCY_MS[(dc, peer.name)]:g}")
    return out


class WanRelays:
    """One relay process per DC, each in its DC's namespace (``prefixes[dc]``: the argv
    that runs a command there); :meth:`close` kills every one it started."""

    def __init__(self, prefixes: dict[str, list[str]], logs: Path, seed: int) -> None:
        self.prefixes = prefixes
        self.logs = logs
        self.seed = seed
        self.cfg: Path | None = None
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.starts = 0

    def views(self, cfg: Path) -> dict[str, Path]:
        """Every DC's view of ``cfg`` (``node_processes(views=...)``)."""
        return {dc: view(cfg, dc) for dc in self.prefixes}

    def start_all(self, cfg: Path) -> None:
        self.cfg = cfg
        for dc in self.prefixes:
            self.start(dc)

    def start(self, dc: str) -> None:
        """Start ``dc``'s relay and wait for it to listen."""
        assert self.cfg is not None, "start_all first"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        argv = [*self.prefixes[dc], sys.executable, "-m", "bench.wan_relay",
                "--seed", str(self.seed * 1000 + self.starts)]
        for r in routes(self.cfg, dc):
            argv += ["--route", r]
        log_path = self.logs / f"relay-{dc}.log"
        with open(log_path, "a") as log:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log,
                                    stdin=subprocess.DEVNULL, text=True, cwd=_ROOT,
                                    env={**os.environ, "PYTHONPATH": str(_ROOT)})
        self.procs[dc] = proc
        assert proc.stdout is not None
        line = _readline(proc, READY_S)
        if line.strip() != "ready":
            self.kill(dc)
            raise RelayFailed(f"{dc}'s relay did not start ({line!r}); see {log_path}")

    def kill(self, dc: str) -> None:
        """``kill -9`` of ``dc``'s relay (the fault, and the teardown)."""
        proc = self.procs.get(dc)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        if proc is not None:
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()

    def dead(self) -> list[str]:
        """DCs whose relay exited (that the harness did not kill)."""
        return [dc for dc, p in self.procs.items() if p.poll() is not None]

    def close(self) -> None:
        for dc in list(self.procs):
            self.kill(dc)
        self.procs.clear()


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    """The first line ``proc`` prints, or "" if it prints none within ``timeout``."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return ""
    return proc.stdout.readline()
