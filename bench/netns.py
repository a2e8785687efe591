"""Two network namespaces joined by a veth pair shaped with tbf: a slow WAN link on
one machine, for the ``tbf100_*`` figures of ``dwcp bench amst``.

``TbfLink`` creates namespaces ``<name>a`` and ``<name>b``, the veth pair
``<name>a`` -- ``<name>b`` (10.213.0.1 and 10.213.0.2) and a tbf qdisc on the
egress of both ends; leaving the ``with`` block always deletes both namespaces,
which deletes the veth pair and its qdiscs with them. Needs root (CAP_NET_ADMIN)
and ``ip``/``tc`` from iproute2. ``python -m bench.netns send|recv`` are the two
ends of the raw-copy measurement, run inside the namespaces.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ADDRESS_A = "10.213.0.1"
ADDRESS_B = "10.213.0.2"
# tc-tbf(8): burst must be at least rate/HZ (100 Mbit/s at HZ=100 is 125 kB) and at
# least one packet; veth hands tbf GSO packets up to 64 KiB. 128 KiB covers both.
BURST = "128kb"
# tc-tbf(8) latency: the longest a packet may wait in the queue; 50 ms is a WAN-sized
# buffer (about rate x 50 ms = 625 kB at 100 Mbit/s).
LATENCY = "50ms"
RAW_PORT = 5201  # iperf3's default port: a familiar number for a throughput test


class NetnsError(Exception):
    """A namespace, veth or qdisc could not be set up (names the command that failed)."""


def _ip(*args: str) -> None:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {out.stderr.strip()}")


#: Namespaces and root-namespace links this process created and has not deleted yet.
_HELD: set[str] = set()


def _add_netns(ns: str) -> None:
    """``ip netns add ns``; a namespace of that name that this process does not hold is
    a leftover of a run that died before its ``close`` (a killed test, a CI job cut off):
    names carry the creating process's pid, so no live process shares one with us. The
    leftover is deleted (with its links) and the name taken again."""
    if ns not in _HELD:
        _delete_leftover(["netns", "del", ns], f"/run/netns/{ns}")
    _ip("netns", "add", ns)
    _HELD.add(ns)


def _add_near_veth(near_if: str, far_if: str, ns: str) -> None:
    """A veth pair with ``near_if`` in this namespace and ``far_if`` in ``ns``; a left
    over ``near_if`` (see :func:`_add_netns`) is deleted first."""
    if near_if not in _HELD:
        _delete_leftover(["link", "del", near_if], f"/sys/class/net/{near_if}")
    _ip("link", "add", near_if, "type", "veth", "peer", "name", far_if, "netns", ns)
    _HELD.add(near_if)


def _delete_leftover(ip_args: list[str], exists: str) -> None:
    if os.path.lexists(exists):
        subprocess.run(["ip", *ip_args], capture_output=True, check=False)


def _del(ip_args: list[str], name: str) -> None:
    """Delete a namespace or link this process made; never raises."""
    subprocess.run(["ip", *ip_args], capture_output=True, check=False)
    _HELD.discard(name)


def _tc(ns: str, *args: str) -> None:
    out = subprocess.run(["ip", "netns", "exec", ns, "tc", *args], capture_output=True,
                         text=True, check=False)  # fmt: skip
    if out.returncode != 0:
        raise NetnsError(f"tc {' '.join(args)} (in {ns}): {out.stderr.strip()}")


class TbfLink:
    """Namespaces ``a`` and ``b`` joined by veth, tbf at ``rate_mbit`` each way."""

    def __init__(self, rate_mbit: int = 100, name: str | None = None) -> None:
        # interface names are at most 15 bytes (IFNAMSIZ); "dw" + pid + side fits
        self.name = name or f"dw{os.getpid() % 10**8}"
        self.ns_a, self.ns_b = self.name + "a", self.name + "b"
        self.rate_mbit = rate_mbit
        self._created: list[str] = []

    def open(self) -> TbfLink:
        try:
            for ns in (self.ns_a, self.ns_b):
                _add_netns(ns)
                self._created.append(ns)
            _ip("link", "add", self.ns_a, "netns", self.ns_a, "type", "veth",
                "peer", "name", self.ns_b, "netns", self.ns_b)  # fmt: skip
            for ns, addr in ((self.ns_a, ADDRESS_A), (self.ns_b, ADDRESS_B)):
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ns)
                _ip("-n", ns, "link", "set", ns, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                _tc(ns, "qdisc", "add", "dev", ns, "root", "tbf", "rate",
                    f"{self.rate_mbit}mbit", "burst", BURST, "latency", LATENCY)  # fmt: skip
        except BaseException:
            self.close()
            raise
        return self

    def exec_prefix(self, side: str) -> list[str]:
        """argv prefix that runs a command inside namespace ``a`` or ``b``."""
        return ["ip", "netns", "exec", self.ns_a if side == "a" else self.ns_b]

    def tx_bytes(self, side: str) -> int:
        """Bytes sent by the veth end in namespace ``side`` (IP packets incl. headers)."""
        ns = self.ns_a if side == "a" else self.ns_b
        path = Path("/sys/class/net") / ns / "statistics" / "tx_bytes"
        out = subprocess.run([*self.exec_prefix(side), "cat", str(path)], capture_output=True,
                             text=True, check=False)  # fmt: skip
        if out.returncode != 0:
            raise NetnsError(f"{ns}: cannot read {path}: {out.stderr.strip()}")
        return int(out.stdout)

    def close(self) -> None:
        """Delete both namespaces (and with them the veth pair); never raises."""
        for ns in reversed(self._created):
            _del(["netns", "del", ns], ns)
        self._created.clear()

    def __enter__(self) -> TbfLink:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


#: The subnets of :class:`FarLink`: 10.214.N.0/24, N chosen free (not on any interface
#: of this namespace), so two links never share a route (TbfLink's 10.213.0.0/24 lives
#: only inside its own namespaces).
FAR_SUBNET = "10.214"


def _used_far_subnets() -> set[int]:
    out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True,
                         check=False)  # fmt: skip
    used = set()
    for word in out.stdout.split():
        if word.startswith(FAR_SUBNET + "."):
            used.add(int(word.split(".")[2]))
    return used


class FarLink:
    """A veth pair between this (the root) namespace and one namespace ``<name>f``, the
    "far" side: processes started with :meth:`far_prefix` run there and reach this side
    only through the pair. ``rate_mbit``: tbf on the egress of both ends, as
    :class:`TbfLink`; None: unshaped (a kernel-local link, like loopback). :meth:`tx_bytes`
    counts what both ends sent (IP packets with headers): every byte between the two sides.

    ``dwcp bench live`` and the qemu acceptance put one DC's node behind it (the nodes of
    the other DCs listen on :attr:`near`, that one on :attr:`far`), so every byte of a
    migration to or from that DC, through any route, crosses the pair once."""

    def __init__(self, rate_mbit: int | None = 100, name: str | None = None) -> None:
        self.name = name or f"dwf{os.getpid() % 10**8}"
        self.ns = self.name + "f"
        self.near_if, self.far_if = self.name + "n", self.name + "f"
        self.rate_mbit = rate_mbit
        self.near = self.far = ""
        self._created = False

    def open(self) -> FarLink:
        used = _used_far_subnets()
        n = next((i for i in range(1, 255) if i not in used), None)
        if n is None:
            raise NetnsError(f"no free {FAR_SUBNET}.N.0/24 subnet")
        self.near, self.far = f"{FAR_SUBNET}.{n}.1", f"{FAR_SUBNET}.{n}.2"
        try:
            self._created = True
            _add_netns(self.ns)
            _add_near_veth(self.near_if, self.far_if, self.ns)
            _ip("addr", "add", f"{self.near}/24", "dev", self.near_if)
            _ip("link", "set", self.near_if, "up")
            _ip("-n", self.ns, "addr", "add", f"{self.far}/24", "dev", self.far_if)
            _ip("-n", self.ns, "link", "set", self.far_if, "up")
            _ip("-n", self.ns, "link", "set", "lo", "up")
            if self.rate_mbit is not None:
                shape = ["qdisc", "add", "dev", "IF", "root", "tbf", "rate",
                         f"{self.rate_mbit}mbit", "burst", BURST, "latency", LATENCY]
                out = subprocess.run(["tc", *[self.near_if if w == "IF" else w for w in shape]],
                                     capture_output=True, text=True, check=False)
                if out.returncode != 0:
                    raise NetnsError(f"tc qdisc add dev {self.near_if}: {out.stderr.strip()}")
                _tc(self.ns, *[self.far_if if w == "IF" else w for w in shape])
        except BaseException:
            self.close()
            raise
        return self

    def far_prefix(self) -> list[str]:
        """argv prefix that runs a command on the far side."""
        return ["ip", "netns", "exec", self.ns]

    def tx_bytes(self) -> int:
        """Bytes both ends sent so far (IP packets with headers, both directions)."""
        near = Path("/sys/class/net") / self.near_if / "statistics" / "tx_bytes"
        out = subprocess.run([*self.far_prefix(), "cat",
                              f"/sys/class/net/{self.far_if}/statistics/tx_bytes"],
                             capture_output=True, text=True, check=False)  # fmt: skip
        if out.returncode != 0:
            raise NetnsError(f"{self.far_if}: cannot read tx_bytes: {out.stderr.strip()}")
        return int(near.read_text()) + int(out.stdout)

    def close(self) -> None:
        """Delete the namespace (and with it the veth pair and its qdiscs); never raises."""
        if self._created:
            if self.ns in _HELD:
                _del(["netns", "del", self.ns], self.ns)
            # the near end goes with its peer; delete it too in case it was left alone
            if self.near_if in _HELD:
                _del(["link", "del", self.near_if], self.near_if)
            self._created = False

    def __enter__(self) -> FarLink:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


#: The subnets of :class:`BridgeNet`: 10.215.N.0/24, N chosen free as FarLink's are.
BRIDGE_SUBNET = "10.215"
#: A classic-BPF program for tc's ``bpf`` classifier in direct-action mode: one
#: instruction, ``ret #2`` (TC_ACT_SHOT): every packet through the hook is dropped. This
#: kernel has neither netem nor the gact/police actions nor the matchall classifier, but
#: has cls_bpf: this is how a tc filter drops here.
DROP_ALL_BPF = "1,6 0 0 2,"


class BridgeNet:
    """DCs in namespaces of their own, each joined by a veth pair to one bridge in a hub
    namespace: a star of WAN links on one machine (``make netns-chaos``).

    Namespace ``<name>h`` holds bridge ``br0``; DC ``d`` gets namespace ``<name>-d``
    with interface ``wan`` at ``10.215.N.i`` (``i`` its place in ``dcs``, from 1) whose
    peer ``d`` sits in the hub on the bridge; both ends are shaped with tbf at the DC's
    rate (``rates[d]`` Mbit/s; None: unshaped). The root namespace joins the bridge too,
    unshaped, through ``<name>m`` at ``10.215.N.254`` (:attr:`mgmt`): the harness reaches
    every node's API there; the DCs reach each other only through their shaped links.

    Faults: :meth:`set_link` (``ip link set down|up`` on the hub's end, both directions
    gone), :meth:`set_drop` (a tc filter on one end's egress: one direction gone, the
    other still carries packets). Leaving the ``with`` block deletes every namespace and
    with them every veth pair, qdisc and filter; never raises."""

    def __init__(self, dcs: list[str], rates: dict[str, int | None],
                 name: str | None = None) -> None:
        self.name = name or f"dx{os.getpid() % 10**7}"
        self.hub = self.name + "h"
        self.mgmt_if = self.name + "m"
        self.dcs = list(dcs)
        self.rates = dict(rates)
        self.addresses: dict[str, str] = {}
        self.mgmt = ""
        self._namespaces: list[str] = []
        self._mgmt_made = False

    def ns(self, dc: str) -> str:
        return f"{self.name}-{dc}"

    def prefix(self, dc: str) -> list[str]:
        """argv prefix that runs a command in ``dc``'s namespace."""
        return ["ip", "netns", "exec", self.ns(dc)]

    def open(self) -> BridgeNet:
        used = _used_far_subnets() | _used_subnets(BRIDGE_SUBNET)
        n = next((i for i in range(1, 255) if i not in used), None)
        if n is None:
            raise NetnsError(f"no free {BRIDGE_SUBNET}.N.0/24 subnet")
        net = f"{BRIDGE_SUBNET}.{n}"
        self.mgmt = f"{net}.254"
        try:
            _add_netns(self.hub)
            self._namespaces.append(self.hub)
            _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.hub, "link", "set", "br0", "up")
            _ip("-n", self.hub, "link", "set", "lo", "up")
            for i, dc in enumerate(self.dcs, start=1):
                ns = self.ns(dc)
                _add_netns(ns)
                self._namespaces.append(ns)
                _ip("link", "add", "wan", "netns", ns, "type", "veth",
                    "peer", "name", dc, "netns", self.hub)  # fmt: skip
                self.addresses[dc] = f"{net}.{i}"
                _ip("-n", ns, "addr", "add", f"{net}.{i}/24", "dev", "wan")
                for cmd in (["link", "set", "wan", "up"], ["link", "set", "lo", "up"]):
                    _ip("-n", ns, *cmd)
                _ip("-n", self.hub, "link", "set", dc, "master", "br0")
                _ip("-n", self.hub, "link", "set", dc, "up")
                rate = self.rates.get(dc)
                for where, dev in ((ns, "wan"), (self.hub, dc)):
                    if rate is not None:
                        _tc(where, "qdisc", "add", "dev", dev, "root", "tbf", "rate",
                            f"{rate}mbit", "burst", BURST, "latency", LATENCY)  # fmt: skip
                    _tc(where, "qdisc", "add", "dev", dev, "clsact")
            self._mgmt_made = True
            _add_near_veth(self.mgmt_if, "mgmt", self.hub)
            _ip("addr", "add", f"{self.mgmt}/24", "dev", self.mgmt_if)
            _ip("link", "set", self.mgmt_if, "up")
            _ip("-n", self.hub, "link", "set", "mgmt", "master", "br0")
            _ip("-n", self.hub, "link", "set", "mgmt", "up")
        except BaseException:
            self.close()
            raise
        return self

    def set_link(self, dc: str, up: bool) -> None:
        """``ip link set down`` (or ``up``) on the hub's end of ``dc``'s link."""
        _ip("-n", self.hub, "link", "set", dc, "up" if up else "down")

    def set_drop(self, dc: str, direction: str, drop: bool) -> None:
        """Drop every packet ``dc`` sends (``direction`` "out": a filter on the egress of
        its own end) or every packet sent to it (``"in"``: on the egress of the hub's end),
        or remove that filter (``drop`` false; removing one not there is not an error)."""
        if direction not in ("in", "out"):
            raise ValueError(f"direction {direction!r}: 'in' or 'out'")
        where, dev = (self.ns(dc), "wan") if direction == "out" else (self.hub, dc)
        if drop:
            _tc(where, "filter", "add", "dev", dev, "egress", "bpf", "da", "bytecode",
                DROP_ALL_BPF)
        else:
            subprocess.run(["ip", "netns", "exec", where, "tc", "filter", "del", "dev", dev,
                            "egress"], capture_output=True, check=False)  # fmt: skip

    def close(self) -> None:
        for ns in reversed(self._namespaces):
            _del(["netns", "del", ns], ns)
        self._namespaces.clear()
        if self._mgmt_made and self.mgmt_if in _HELD:
            _del(["link", "del", self.mgmt_if], self.mgmt_if)
        self._mgmt_made = False

    def __enter__(self) -> BridgeNet:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _used_subnets(prefix: str) -> set[int]:
    out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True,
                         check=False)  # fmt: skip
    return {int(w.split(".")[2]) for w in out.stdout.split() if w.startswith(prefix + ".")}


def netns_missing() -> str | None:
    """Why a TbfLink cannot be built here, or None when it can (builds one to check)."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"no `{tool}` (iproute2)"
    try:
        with TbfLink(rate_mbit=100, name=f"dwp{os.getpid() % 10**8}"):
            return None
    except NetnsError as e:
        return f"cannot build namespaces + veth + tbf: {e}"


def time_raw_copy(link: TbfLink, path: Path, port: int = RAW_PORT) -> dict[str, Any]:
    """Send ``path`` over one TCP stream from namespace a to b; seconds and bytes."""
    here = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": here}
    recv = subprocess.Popen(
        [*link.exec_prefix("b"), sys.executable, "-m", "bench.netns", "recv", "--port", str(port)],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert recv.stdout is not None
        ready = recv.stdout.readline()
        if ready.strip() != "ready":
            raise NetnsError(f"raw-copy receiver did not start: {ready!r}")
        send = subprocess.run(
            [*link.exec_prefix("a"), sys.executable, "-m", "bench.netns", "send",
             "--host", ADDRESS_B, "--port", str(port), str(path)],
            capture_output=True, text=True, env=env, check=False,
        )  # fmt: skip
        if send.returncode != 0:
            raise NetnsError(f"raw-copy sender failed: {send.stderr.strip()}")
        result: dict[str, Any] = json.loads(send.stdout)
        recv.wait(timeout=30)
        return result
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()


def _recv(port: int) -> None:
    with socket.create_server(("0.0.0.0", port)) as server:
        print("ready", flush=True)
        conn, _ = server.accept()
        with conn:
            total = 0
            while data := conn.recv(1 << 20):
                total += len(data)
            conn.sendall(struct.pack("!Q", total))


def _send(host: str, port: int, path: Path) -> None:
    size = path.stat().st_size
    started = time.monotonic()
    with socket.create_connection((host, port)) as conn, open(path, "rb") as f:
        conn.sendfile(f)
        conn.shutdown(socket.SHUT_WR)
        ack = b""
        while len(ack) < 8 and (data := conn.recv(8 - len(ack))):
            ack += data
    seconds = time.monotonic() - started
    (received,) = struct.unpack("!Q", ack)
    if received != size:
        raise SystemExit(f"receiver got {received} bytes of {size}")
    print(json.dumps({"bytes": size, "seconds": round(seconds, 3)}))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.netns")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recv", help="count bytes from one TCP connection, acknowledge them")
    r.add_argument("--port", type=int, default=RAW_PORT)
    s = sub.add_parser("send", help="send a file over one TCP connection, print the time")
    s.add_argument("--host", required=True)
    s.add_argument("--port", type=int, default=RAW_PORT)
    s.add_argument("path", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "recv":
        _recv(args.port)
    else:
        _send(args.host, args.port, args.path)


if __name__ == "__main__":
    main()
