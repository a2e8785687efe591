"""A frame path through a real link, for ``dwcp bench live``'s DWCP contender.

:class:`FramePipe` holds the two ends ``a`` and ``b`` of one TCP connection that crosses
the link under test; ``carry(frames, a_to_b)`` writes each frame (a 4-byte length, then
the bytes) at one end as it comes and returns the frames as the other end read them. A
reader thread per end drains its socket all the time, so a writer never waits on its own
reader. It is a :data:`mesh.hde.loopback.Carry`: a
:class:`~federation.vms.live_migration.LiveMigration` given one sends every diff message,
chunk frame, device state and root over it, and its target uses only what arrived.

Two paths, the ones QEMU's contenders take in ``bench.live``:

- :func:`loopback`: through :class:`bench.corpus.relay.CountingRelay` on 127.0.0.1, which
  counts the bytes (application level, both ways);
- :func:`over_tbf`: a veth pair between two namespaces shaped by tbf
  (:class:`bench.netns.TbfLink`); this process stays in its own namespace and reaches
  each end through a forwarder (``python -m bench.frame_pipe LISTEN TARGET``) run inside
  the namespace, over a unix socket; bytes are the veth ends' tx counters (IP packets with
  headers, both ways), as for QEMU.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from bench.corpus.relay import CountingRelay
from bench.netns import ADDRESS_B, TbfLink

__all__ = ["FramePipe", "loopback", "over_tbf", "PipeError"]

Frame = bytes | bytearray
#: A frame that does not arrive within this long means the path is broken (a 256 MiB
#: guest's whole first round fits in one batch: at 100 Mbit/s that is ~20 s).
ARRIVAL_TIMEOUT_S = 300.0
#: The largest frame: a chunk (1 MiB of pages) or QEMU's device state (< 1 MiB here).
MAX_FRAME = 64 << 20
#: tcp port of the forwarder in namespace b (iperf3's default + 1: RAW_PORT is 5201)
TBF_PORT = 5202


class PipeError(Exception):
    """The path broke, a frame was too large, or a frame did not arrive."""


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            if got:
                raise PipeError(f"stream ended inside a frame ({got} of {n} bytes)")
            return None
        got += k
    return bytes(buf)


class FramePipe:
    """Ends ``a`` and ``b`` of one connection across the link; ``counted()`` is the bytes
    the link carried so far (both ways), ``close()`` ends everything this pipe started."""

    def __init__(self, a: socket.socket, b: socket.socket, counted: Callable[[], int],
                 closers: Iterable[Callable[[], None]] = ()) -> None:  # fmt: skip
        self.ends = {"a": a, "b": b}
        self.counted = counted
        self._closers = list(closers)
        self._arrived: dict[str, queue.SimpleQueue[bytes | PipeError]] = {
            "a": queue.SimpleQueue(), "b": queue.SimpleQueue()}  # fmt: skip
        self._readers = [threading.Thread(target=self._read, args=(end,), daemon=True)
                         for end in ("a", "b")]  # fmt: skip
        for t in self._readers:
            t.start()

    def _read(self, end: str) -> None:
        sock, out = self.ends[end], self._arrived[end]
        try:
            while (head := _recv_exactly(sock, 4)) is not None:
                n = int.from_bytes(head, "big")
                if n > MAX_FRAME:
                    raise PipeError(f"frame of {n} bytes at end {end}, at most {MAX_FRAME}")
                body = _recv_exactly(sock, n)
                if body is None:
                    raise PipeError(f"stream ended after a frame header at end {end}")
                out.put(body)
        except (OSError, PipeError) as exc:
            out.put(exc if isinstance(exc, PipeError) else PipeError(f"end {end}: {exc}"))

    def carry(self, frames: Iterable[Frame], a_to_b: bool) -> list[Frame]:
        """Send ``frames`` from a to b (or b to a), each as it comes; return them as read
        at the other end."""
        src, dst = ("a", "b") if a_to_b else ("b", "a")
        sock = self.ends[src]
        sent = 0
        for frame in frames:
            if len(frame) > MAX_FRAME:
                raise PipeError(f"frame of {len(frame)} bytes, at most {MAX_FRAME}")
            sock.sendall(len(frame).to_bytes(4, "big"))
            sock.sendall(frame)
            sent += 1
        out: list[Frame] = []
        for _ in range(sent):
            try:
                got = self._arrived[dst].get(timeout=ARRIVAL_TIMEOUT_S)
            except queue.Empty:
                raise PipeError(f"a frame sent at {src} did not arrive in "
                                f"{ARRIVAL_TIMEOUT_S:.0f} s") from None  # fmt: skip
            if isinstance(got, PipeError):
                raise got
            out.append(got)
        return out

    def reversed(self) -> Callable[[Iterable[Frame], bool], list[Frame]]:
        """The same pipe with b as the source end (a migration back)."""
        return lambda frames, to_target: self.carry(frames, not to_target)

    def measure(self, nbytes: int = 16 << 20, frame: int = 1 << 20) -> tuple[float, float]:
        """(bytes per second a -> b, round-trip seconds) measured over the pipe now."""
        payload = os.urandom(frame)
        t = time.monotonic()
        self.carry([b"r"], True)
        self.carry([b"r"], False)
        rtt = time.monotonic() - t
        t = time.monotonic()
        self.carry((payload for _ in range(max(1, nbytes // frame))), True)
        return max(1, nbytes // frame) * frame / (time.monotonic() - t), rtt

    def close(self) -> None:
        for sock in self.ends.values():
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for t in self._readers:
            t.join(timeout=5)
        for closer in reversed(self._closers):
            closer()


def loopback() -> FramePipe:
    """The pipe through a byte-counting relay on 127.0.0.1."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        relay = CountingRelay(server.getsockname()[:2])
        try:
            a = socket.create_connection(relay.address)
            b, _ = server.accept()
        except BaseException:
            relay.close()
            raise
    return FramePipe(a, b, lambda: relay.forward_bytes + relay.backward_bytes, [relay.close])


def over_tbf(link: TbfLink, work: Path) -> FramePipe:
    """The pipe across ``link``'s veth pair: this process -> unix socket -> forwarder in
    namespace a -> TCP over the shaped veth -> forwarder in namespace b -> unix socket."""
    work.mkdir(parents=True, exist_ok=True)
    path_a, path_b = work / "pipe-a.sock", work / "pipe-b.sock"
    procs: list[subprocess.Popen[str]] = []

    def stop() -> None:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()

    here = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": here}
    listen_b = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listen_b.bind(str(path_b))
        listen_b.listen(1)
        for argv in ([*link.exec_prefix("b"), sys.executable, "-m", "bench.frame_pipe",
                      f"tcp:{ADDRESS_B}:{TBF_PORT}", f"unix:{path_b}"],
                     [*link.exec_prefix("a"), sys.executable, "-m", "bench.frame_pipe",
                      f"unix:{path_a}", f"tcp:{ADDRESS_B}:{TBF_PORT}"]):  # fmt: skip
            p = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
            procs.append(p)
            assert p.stdout is not None
            if p.stdout.readline().strip() != "ready":
                raise PipeError(f"forwarder {argv[-2]} -> {argv[-1]} did not start")
        a = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        a.connect(str(path_a))
        listen_b.settimeout(30)
        b, _ = listen_b.accept()
        b.settimeout(None)
    except BaseException:
        stop()
        raise
    finally:
        listen_b.close()

    def counted() -> int:
        return link.tx_bytes("a") + link.tx_bytes("b")

    return FramePipe(a, b, counted, [stop])


# --------------------------------------------------------------------------- the forwarder


def _endpoint(spec: str) -> tuple[int, object]:
    kind, _, rest = spec.partition(":")
    if kind == "unix":
        return socket.AF_UNIX, rest
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        return socket.AF_INET, (host, int(port))
    raise SystemExit(f"endpoint {spec!r}: expected unix:PATH or tcp:HOST:PORT")


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(1 << 20):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def forward(listen: str, target: str) -> None:
    """Accept one connection on ``listen``, connect to ``target``, pump both ways."""
    family, address = _endpoint(listen)
    server = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(address)
    server.listen(1)
    print("ready", flush=True)
    client, _ = server.accept()
    server.close()
    tfamily, taddress = _endpoint(target)
    upstream = socket.socket(tfamily, socket.SOCK_STREAM)
    upstream.connect(taddress)
    pumps = [threading.Thread(target=_pump, args=pair)
             for pair in ((client, upstream), (upstream, client))]  # fmt: skip
    for t in pumps:
        t.start()
    for t in pumps:
        t.join()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m bench.frame_pipe LISTEN TARGET "
                         "(unix:PATH or tcp:HOST:PORT; run by dwcp bench live)")  # fmt: skip
    forward(sys.argv[1], sys.argv[2])
