"""A userspace TCP relay that counts every byte it forwards.

QEMU's migration (main channel plus one TCP connection per multifd channel) goes
source -> relay -> target on loopback, so the bytes QEMU puts on the wire are
counted exactly, at the application level (no TCP/IP headers).
"""

from __future__ import annotations

import socket
import threading

# One recv moves at most 1 MiB: big enough that Python's per-call overhead is small
# next to the copy (the relay moved >1 GB/s on loopback), small enough to stay cheap.
RECV_BYTES = 1 << 20


class CountingRelay:
    """Forward each connection accepted on ``listen`` to ``target``; count both ways.

    ``forward_bytes`` counts client -> target, ``backward_bytes`` target -> client.
    """

    def __init__(self, target: tuple[str, int], listen: tuple[str, int] = ("127.0.0.1", 0)):
        self.target = target
        self._server = socket.create_server(listen)
        self.address: tuple[str, int] = self._server.getsockname()[:2]
        self.forward_bytes = 0
        self.backward_bytes = 0
        self.connections = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._pumps: list[threading.Thread] = []
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # the listening socket was shut down by close()
            try:
                upstream = socket.create_connection(self.target)
            except OSError as e:
                self.errors.append(f"connect {self.target}: {e}")
                client.close()
                continue
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self.connections += 1
                self._sockets += [client, upstream]
                for src, dst, forward in ((client, upstream, True), (upstream, client, False)):
                    t = threading.Thread(target=self._pump, args=(src, dst, forward), daemon=True)
                    self._pumps.append(t)
                    t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, forward: bool) -> None:
        try:
            while data := src.recv(RECV_BYTES):
                # counted before it is passed on: once the far end has a byte, it is counted
                with self._lock:
                    if forward:
                        self.forward_bytes += len(data)
                    else:
                        self.backward_bytes += len(data)
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)  # pass the end of stream on
        except OSError as e:
            if not self._closed:
                self.errors.append(f"{'forward' if forward else 'backward'}: {e}")

    def wait_drained(self, timeout: float) -> bool:
        """Wait until every connection so far has ended both ways; False on timeout."""
        with self._lock:
            pumps = list(self._pumps)
        for t in pumps:
            t.join(timeout)
        return not any(t.is_alive() for t in pumps)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets = list(self._sockets)
        try:
            self._server.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
        except OSError:
            pass  # not connected/listening any more: nothing to wake
        self._server.close()
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # the peer already closed it
            s.close()
        self._acceptor.join(5)
        for t in self._pumps:
            t.join(5)

    def __enter__(self) -> CountingRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
