"""Real ``dwcp node`` processes on loopback, driven through their HTTP API, and the
checks made on their data directories afterwards."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from federation import config
from federation.api.auth import load_operator_key
from federation.api.client import Signer
from federation.cli.keys import INIT_OPERATOR
from federation.cli.ops import Api
from federation.demo.guest_writer import expected_pages, mismatches
from federation.node.node_config import render_node_config
from federation.vms.at_rest_key import key_if_any
from federation.vms.sealed_image import open_stored
from federation.vms.sealing import SealKey
from tests.harness.node import make_federation
from tests.harness.waiting import poll_until

NAMES = ("dc1", "dc2", "dc3", "dc4")
#: ``dwcp`` without depending on the console script being on PATH.
DWCP_MAIN = "import sys; from federation.cli.main import main; sys.exit(main())"
#: A node with the demo's page writer on named VMs (:mod:`federation.demo.writer_node`).
WRITER_NODE_MAIN = "import sys; from federation.demo.writer_node import main; sys.exit(main())"
#: A node process answers over HTTP: looking every 0.1 s keeps the API calls few.
NODE_LOOK_EVERY = 0.1


class NodeProcesses:
    """``dwcp node`` processes of the federation ``cfg``, each logging to ``logs/<dc>.log``;
    ``writers[dc]``: ``VM=RATE[:SEED]`` page writers of DC ``dc``'s VMs (the writer is a
    test tool, not an API field: such a DC runs as the demo's writer node)."""

    def __init__(self, cfg: Path, logs: Path,
                 writers: dict[str, list[str]] | None = None,
                 prefixes: dict[str, list[str]] | None = None,
                 views: dict[str, Path] | None = None) -> None:
        self.cfg = cfg
        self.logs = logs
        self.fed = config.load(cfg)
        self.writers = writers or {}
        #: argv a DC's node runs under (``ip netns exec NS``: a DC behind a FarLink)
        self.prefixes = prefixes or {}
        #: the federation file a DC's node runs if not ``cfg`` (a restart keeps it)
        self.views = views or {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def api(self, name: str) -> Api:
        """The API of ``name``, signing as the admin ``federation init`` made."""
        key = load_operator_key(self.cfg.parent / "keys" / f"{INIT_OPERATOR}.key", self.fed)
        return Api(f"http://{self.fed.dc(name).api}", Signer(key, self.fed.id))

    def start(self, name: str, cfg: Path | None = None,
              argv: list[str] | None = None) -> None:
        """Start ``name``'s node (with the federation file ``cfg`` if given, e.g. a DC
        whose file differs from the others', else the view it was given; or as ``dwcp
        ARGV``, a whole command line)."""
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        if argv is not None:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-c", DWCP_MAIN, *argv], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=log)
            log.close()
            return
        node = ["--config", str(cfg or self.views.get(name, self.cfg)), "--name", name]
        writers = [f"--writer={w}" for w in self.writers.get(name, [])]
        argv = ([sys.executable, "-c", WRITER_NODE_MAIN, *node, *writers] if writers
                else [sys.executable, "-c", DWCP_MAIN, "node", *node])
        argv = [*self.prefixes.get(name, []), *argv]
        self.procs[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=log)
        log.close()

    def wait(self, what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
        """Until ``check()`` is true (a node not answering yet counts as false); fails at
        once, pointing at the logs, if a node process exits meanwhile."""

        def holds() -> Any:
            try:
                got = check()
            except Exception:  # noqa: BLE001 - a node not up yet; retried until the deadline
                got = None
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if not got and dead:
                raise AssertionError(f"{dead} exited while waiting for {what}; logs in "
                                     f"{self.logs}")
            return got

        return poll_until(holds, f"{what} (logs in {self.logs})", timeout,
                          every=NODE_LOOK_EVERY)

    def ready(self, name: str) -> bool:
        return self.api(name).call("GET", "/ready")[0] == 200

    def ready_doc(self, name: str) -> dict[str, Any]:
        """``GET /ready`` of ``name`` (open: no signature), whatever its status."""
        return dict(self.api(name).call("GET", "/ready")[1])

    def log_events(self, name: str, event: str) -> list[dict[str, Any]]:
        """The JSON log lines of ``name`` with this ``event``."""
        out = []
        for line in (self.logs / f"{name}.log").read_text().splitlines():
            try:
                doc = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(doc, dict) and doc.get("event") == event:
                out.append(doc)
        return out

    def status(self, name: str) -> dict[str, Any]:
        return self.api(name).ok("GET", "/api/status")

    def vm_here(self, name: str, vm: str) -> str | None:
        for v in self.api(name).ok("GET", "/api/vms"):
            if v["name"] == vm:
                return v["here"]
        return None

    def agreed(self, vm: str) -> dict[str, Any] | None:
        """The (owner, epoch) every ledger holds for ``vm`` once all heights are equal."""
        docs = [self.status(n) for n in NAMES]
        heights = {d["ledger"]["height"] for d in docs}
        owners = {next((v["owner"], v["epoch"]) for v in d["vms"] if v["name"] == vm)
                  for d in docs}
        if len(heights) == 1 and len(owners) == 1:
            return {"owner_epoch": owners.pop(), "height": heights.pop()}
        return None

    def stop(self, name: str) -> int:
        """SIGTERM ``name`` and wait for it to exit; its exit status."""
        p = self.procs[name]
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        return p.wait(timeout=30)

    def stop_all(self) -> dict[str, int]:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        return {n: p.wait(timeout=30) for n, p in self.procs.items()}

    def kill_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


def run_dwcp(*args: str, timeout: float = 120,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``dwcp ARGS`` as an operator runs it (the signing key and federation file from the
    environment :func:`tests.harness.node.make_federation` sets)."""
    return subprocess.run([sys.executable, "-c", DWCP_MAIN, *args], capture_output=True,
                          text=True, timeout=timeout, env=os.environ | (env or {}),
                          stdin=subprocess.DEVNULL)


@contextmanager
def node_processes(tmp_path: Path, writers: dict[str, list[str]] | None = None,
                   node_settings: str = "",
                   views: Callable[[Path], dict[str, Path]] | None = None,
                   ready: tuple[str, ...] = NAMES,
                   node_config: Callable[[str], str] | None = None,
                   host: str = "127.0.0.1", hosts: dict[str, str] | None = None,
                   prefixes: dict[str, list[str]] | None = None,
                   before_start: Callable[[Path], None] | None = None,
                   ) -> Iterator[NodeProcesses]:
    """A fresh four-DC federation in ``tmp_path``, every node a process, all ready; each
    node imports VM images from anywhere under ``tmp_path`` (its node config, with
    ``node_settings`` and ``node_config(dc)`` added). ``views(cfg)``: DCs that run another
    federation file than ``cfg``, and that file; ``ready``: the DCs to wait for. ``host``:
    every DC's address but those in ``hosts``; ``prefixes``: argv a DC's node runs under
    (a DC behind a ``bench.netns.FarLink``); ``before_start(cfg)``: called once the
    federation and node files are written, before any node starts (``make netns-chaos``
    mounts each DC's small data disk there)."""
    cfg = make_federation(tmp_path / "fed", host=host, hosts=hosts)
    configs = views(cfg) if views is not None else {}
    for name in NAMES:
        extra = node_config(name) if node_config is not None else ""
        (cfg.parent / "nodes" / f"{name}.toml").write_text(
            render_node_config([str(tmp_path)]) + node_settings + extra)
    logs = tmp_path / "logs"
    logs.mkdir()
    if before_start is not None:
        before_start(cfg)
    nodes = NodeProcesses(cfg, logs, writers, prefixes, configs)
    try:
        for name in NAMES:
            nodes.start(name)
        for name in ready:
            nodes.wait(f"{name} ready", lambda name=name: nodes.ready(name))
        yield nodes
    finally:
        nodes.kill_all()


def vm_dir(nodes: NodeProcesses, dc: str, vm: str) -> Path:
    return nodes.cfg.parent / "data" / dc / "vms" / vm


def stored_key(directory: Path) -> SealKey | None:
    """The at-rest key of the DC whose VM directory this is (``dwcp node`` makes it beside
    the DC's identity key: <federation dir>/keys/<DC>.at-rest), or None."""
    dc, fed_dir = directory.parents[1].name, directory.parents[3]
    return key_if_any(fed_dir / "keys" / f"{dc}.at-rest")


def writer_mismatches(directory: Path, writer_log: Path) -> list[str]:
    """The pages the writer's log says were written and the VM's images in ``directory``
    do not hold (empty: intact)."""
    layout = json.loads((directory / "meta.json").read_text())["layout"]
    key = stored_key(directory)
    images = {name: open_stored(directory / f"{name}.img", key, name) for name, _ in layout}
    try:
        return mismatches(images, expected_pages(writer_log))
    finally:
        for img in images.values():
            img.close()


def readme_block(root: Path, title: str) -> list[str]:
    """The command lines of the first code block under ``## title`` in README.md."""
    text = (root / "README.md").read_text(encoding="utf-8")
    m = re.search(rf"^## {re.escape(title)}\n.*?```\n(.*?)```", text, re.MULTILINE | re.DOTALL)
    assert m, f"README.md has no code block under '## {title}'"
    return [line for line in m.group(1).splitlines() if line.strip()]
