"""Structured logs of a node: one JSON object per line.

Every line has ``ts`` (Unix time, seconds), ``dc`` (the node's DC name) and
``event``; the other keys depend on the event, e.g.::

    {"ts": 1764238800.123, "dc": "dc1", "event": "peer_up", "peer": "dc2", "version": 3}

Values that JSON cannot carry (bytes, attrs objects) are written with ``repr``.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

__all__ = ["JsonLog"]


class JsonLog:
    def __init__(self, dc: str, stream: TextIO | None = None) -> None:
        self.dc = dc
        self._stream = stream
        self.lines_written = 0

    def event(self, event: str, **fields: Any) -> None:
        record: dict[str, Any] = {"ts": round(time.time(), 6), "dc": self.dc, "event": event}
        record.update(fields)
        line = json.dumps(record, default=repr, separators=(",", ":"))
        stream = self._stream if self._stream is not None else sys.stderr
        try:
            stream.write(line + "\n")
            stream.flush()
        except (OSError, ValueError):
            # stderr closed (the parent went away): a node keeps running without logs.
            return
        self.lines_written += 1
