"""What the self-checking guest prints, read back from its serial console log(s).

Lines (:file:`selfcheck.sh`): ``DWCP-T0`` once at boot, ``DWCP-FILL`` once the ballast is
written (with ``dwcp.fill`` > 0), ``DWCP-HB N`` every 0.1 s of
guest time with N counting up from 1, ``DWCP-CHECK R ok`` after each verified round,
``DWCP-ERROR ...`` for any slot that differs. A migrated guest writes to the source's
console until the fence and to the target's after ``cont``: :func:`read_console` joins
both in order, as one serial line would show them, so a line cut by the fence is whole.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs

__all__ = ["Console", "read_console", "wait_console", "ConsoleTimeout"]


class ConsoleTimeout(Exception):
    """The guest did not print what was waited for in time (names what and the tail)."""


@attrs.frozen
class Console:
    heartbeats: tuple[int, ...]
    checks: tuple[int, ...]
    errors: tuple[str, ...]
    boots: int
    text: str
    #: the guest finished writing its ballast (DWCP-FILL), or had none to write
    filled: bool = False

    @property
    def last_heartbeat(self) -> int:
        return self.heartbeats[-1] if self.heartbeats else 0

    def counter_gaps(self) -> list[tuple[int, int]]:
        """Consecutive heartbeats that are not N, N+1: a reboot restarts at 1, a lost
        guest state repeats or skips."""
        hb = self.heartbeats
        return [(a, b) for a, b in zip(hb, hb[1:], strict=False) if b != a + 1]


def read_console(logs: Sequence[Path], offsets: Sequence[int] = (),
                 ends: Sequence[int | None] = ()) -> Console:
    """Parse the concatenation of ``logs`` (each from its byte offset in ``offsets`` to
    its end in ``ends``, None or missing: the end of the file). A guest that comes back
    to a DC appends to the console it wrote there before: each stay is its own range."""
    parts = []
    for i, path in enumerate(logs):
        start = offsets[i] if i < len(offsets) else 0
        end = ends[i] if i < len(ends) else None
        try:
            with open(path, "rb") as f:
                f.seek(start)
                parts.append(f.read() if end is None else f.read(max(0, end - start)))
        except FileNotFoundError:
            parts.append(b"")
    text = b"".join(parts).decode(errors="replace")
    hbs: list[int] = []
    checks: list[int] = []
    errors: list[str] = []
    boots = 0
    filled = False
    # only whole lines: the last one may still be being written
    for line in text[: text.rfind("\n") + 1].splitlines():
        word = line.split()
        if not word:
            continue
        if word[0] == "DWCP-HB" and len(word) == 2 and word[1].isdigit():
            hbs.append(int(word[1]))
        elif word[0] == "DWCP-CHECK" and len(word) == 3 and word[1].isdigit():
            checks.append(int(word[1]))
        elif word[0] == "DWCP-ERROR" or "Kernel panic" in line:
            errors.append(line)
        elif word[0] == "DWCP-T0":
            boots += 1
            filled = "fill=0" in word
        elif word[0] == "DWCP-FILL":
            filled = True
    return Console(tuple(hbs), tuple(checks), tuple(errors), boots, text, filled)


def wait_console(logs: Sequence[Path], until: Callable[[Console], bool], timeout: float,
                 what: str, offsets: Sequence[int] = (),
                 alive: Callable[[], bool] | None = None) -> Console:
    """Re-read the console until ``until`` holds; :class:`ConsoleTimeout` after ``timeout``
    seconds or as soon as ``alive`` says the guest's QEMU is gone."""
    deadline = time.monotonic() + timeout
    while True:
        con = read_console(logs, offsets)
        if until(con):
            return con
        if con.errors or time.monotonic() > deadline or (alive is not None and not alive()):
            tail = con.text[-600:]
            raise ConsoleTimeout(f"guest: no {what} within {timeout} s "
                                 f"(errors {list(con.errors)}); console tail: {tail!r}")
        # The console is a file QEMU appends to: re-read it at the heartbeat's pace.
        time.sleep(0.1)
