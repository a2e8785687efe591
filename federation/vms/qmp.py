"""A small synchronous QMP client (QEMU Machine Protocol, docs/interop/qmp-spec.rst).

Every command has a timeout: a QEMU that stops answering (a stuck device, a host under
load) fails the command with :class:`QMPError` instead of blocking its caller forever.
After a timeout the session is closed, since a late reply would answer the next command.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

__all__ = ["QMPError", "QMPClient", "COMMAND_TIMEOUT"]

#: The default bound on one command's reply. QMP commands answer at once except the ones
#: that drain I/O: ``stop`` waits for in-flight disk requests (bdrv_drain_all), which took
#: 12 s with the guest's RAM file on a disk (bench.corpus.build.ram_dir); 30 s covers it.
COMMAND_TIMEOUT = 30.0


class QMPError(Exception):
    """QEMU answered a command with an error, or the monitor went away or timed out."""


class QMPClient:
    """One QMP session on a unix socket: greeting, ``qmp_capabilities``, commands.

    Asynchronous events that arrive between replies are kept in ``events``.
    """

    def __init__(self, path: Path, connect_timeout: float = 30.0,
                 timeout: float = COMMAND_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        deadline = time.monotonic() + connect_timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise QMPError(f"{path}: no QMP monitor after {connect_timeout} s") from None
                # QEMU creates the socket a few ms after it starts; poll its appearance.
                time.sleep(0.05)
        self._sock = sock
        self._file = sock.makefile("rwb")
        self.closed = False
        self.events: list[dict[str, Any]] = []
        greeting = self._read(timeout)
        if "QMP" not in greeting:
            raise QMPError(f"{path}: expected a QMP greeting, got {greeting}")
        self.execute("qmp_capabilities")

    def _read(self, timeout: float) -> dict[str, Any]:
        if self.closed:
            raise QMPError(f"{self.path}: the QMP session is closed")
        self._sock.settimeout(timeout)
        try:
            line = self._file.readline()
        except TimeoutError:
            self.close()
            raise QMPError(f"{self.path}: no answer from QEMU within {timeout} s") from None
        except OSError as exc:
            self.close()
            raise QMPError(f"{self.path}: {exc}") from None
        if not line:
            self.close()
            raise QMPError("QMP monitor closed the connection")
        try:
            msg = json.loads(line)
        except ValueError:
            msg = None
        if not isinstance(msg, dict):
            raise QMPError(f"QMP sent a non-object: {line!r}")
        return msg

    def execute(self, command: str, timeout: float | None = None, **arguments: Any) -> Any:
        """Run ``command``; its reply must come within ``timeout`` (default: the client's)."""
        limit = self.timeout if timeout is None else timeout
        req: dict[str, Any] = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        if self.closed:
            raise QMPError(f"{command}: the QMP session to {self.path} is closed")
        try:
            self._file.write(json.dumps(req).encode() + b"\n")
            self._file.flush()
        except OSError as exc:
            self.close()
            raise QMPError(f"{command}: {exc}") from None
        deadline = time.monotonic() + limit
        while True:
            msg = self._read(max(0.001, deadline - time.monotonic()))
            if "event" in msg:
                self.events.append(msg)
                continue
            if "error" in msg:
                raise QMPError(f"{command}: {msg['error'].get('desc', msg['error'])}")
            return msg.get("return")

    def wait_event(self, name: str, timeout: float, **data: Any) -> dict[str, Any]:
        """Block until event ``name`` whose data has the given items arrives."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                got = ev.get("data", {})
                if ev["event"] == name and all(got.get(k) == v for k, v in data.items()):
                    return self.events.pop(i)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QMPError(f"no {name} event with {data} within {timeout} s")
            try:
                msg = self._read(remaining)
            except QMPError:
                if deadline - time.monotonic() <= 0:
                    raise QMPError(f"no {name} event with {data} within {timeout} s") from None
                raise
            if "event" in msg:
                self.events.append(msg)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._file.close()
        except OSError:
            pass  # a broken socket cannot flush: nothing of ours is lost
        self._sock.close()
