"""A small synchronous QMP client (QEMU Machine Protocol, docs/interop/qmp-spec.rst)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any


class QMPError(Exception):
    """QEMU answered a command with an error, or the monitor went away."""


class QMPClient:
    """One QMP session on a unix socket: greeting, ``qmp_capabilities``, commands.

    Asynchronous events that arrive between replies are kept in ``events``.
    """

    def __init__(self, path: Path, connect_timeout: float = 30.0) -> None:
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
        self.events: list[dict[str, Any]] = []
        greeting = self._read()
        if "QMP" not in greeting:
            raise QMPError(f"{path}: expected a QMP greeting, got {greeting}")
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise QMPError("QMP monitor closed the connection")
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise QMPError(f"QMP sent a non-object: {line!r}")
        return msg

    def execute(self, command: str, **arguments: Any) -> Any:
        req: dict[str, Any] = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        self._file.write(json.dumps(req).encode() + b"\n")
        self._file.flush()
        while True:
            msg = self._read()
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
            self._sock.settimeout(remaining)
            try:
                msg = self._read()
            except TimeoutError:
                raise QMPError(f"no {name} event with {data} within {timeout} s") from None
            finally:
                self._sock.settimeout(None)
            if "event" in msg:
                self.events.append(msg)

    def close(self) -> None:
        self._file.close()
        self._sock.close()
