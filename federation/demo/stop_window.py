"""The stop window of one migration as both nodes logged it: from the source's QMP
``stop`` to the target's ``cont``, each step's wall-clock offset from the stop (the nodes
of ``dwcp demo-qemu`` and ``dwcp bench live`` share one host, so one clock).

The marks, in the order a migration passes them (docs/qemu.md, "Downtime"):

- ``source fenced``: the source's Fence action ended (stop, device state, the root);
- ``source final round sent``: its final round was delivered (the target's verdict);
- ``target final``: the target heard the final round's end (its Verify starts);
- ``target verified``: its Verify ended (the commit is submitted with its root);
- ``target device loaded``: the device state is in the waiting QEMU (before the commit);
- ``target root announced``: the source's root reached the target through the ledger;
- ``target committed``: the ledger's commit reached the target's session;
- ``target started``: its StartAtTarget ended (``cont``).

Each mark carries the figures its log line had (the Fence's and the final round's split).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = ["stop_timeline"]

_PHASE = re.compile(r"phase='([a-z_]+)'")
_ROLE = re.compile(r"role='([a-z_]+)'")
#: figures of a log line that say where its time went (seconds, counts)
_FIGURES = ("stop_s", "device_s", "stop_and_device_s", "root_s", "rehashed_blocks",
            "verify_s", "start_s", "load_s", "refresh_s", "index_s", "ready_s", "transfer_s",
            "pages", "seconds", "waited_s", "close_s", "note_s")

Event = dict[str, Any]


def _progress(mid: str, role: str, phase: str) -> Callable[[Event], bool]:
    def match(e: Event) -> bool:
        if e.get("event") != "notify" or e.get("kind") != "migration.progress":
            return False
        detail = str(e.get("detail"))  # a Progress record, logged as its repr
        got, who = _PHASE.search(detail), _ROLE.search(detail)
        return (mid in detail and got is not None and got.group(1) == phase
                and who is not None and who.group(1) == role)
    return match


def _notify(mid: str, kind: str) -> Callable[[Event], bool]:
    return lambda e: (e.get("event") == "notify" and e.get("kind") == kind
                      and mid in str(e.get("detail")))


def _action(mid: str, name: str) -> Callable[[Event], bool]:
    return lambda e: (e.get("event") == "vm_action" and e.get("action") == name
                      and e.get("migration_id") == mid)


def _final_round(mid: str) -> Callable[[Event], bool]:
    return lambda e: (e.get("event") == "round_sent" and e.get("migration_id") == mid
                      and bool(e.get("fenced")))


def stop_timeline(src: Iterable[Event], dst: Iterable[Event], mid: str,
                  stopped_at: float) -> list[dict[str, Any]]:
    """Each mark of migration ``mid`` that the logs ``src`` and ``dst`` (JSON log records
    with their ``ts``) hold: its name, its milliseconds after ``stopped_at`` (wall clock),
    and its figures. Marks the logs lack are left out."""
    if stopped_at <= 0:
        return []  # the target reported no stop time: the marks would have no origin
    src, dst = list(src), list(dst)
    marks: Sequence[tuple[str, list[Event], Callable[[Event], bool]]] = (
        ("source fenced", src, _action(mid, "Fence")),
        ("source final round sent", src, _final_round(mid)),
        ("target final", dst, _progress(mid, "target", "final")),
        ("target verified", dst, _action(mid, "Verify")),
        ("target device loaded", dst, _action(mid, "LoadDevice")),
        ("target root announced", dst, _notify(mid, "migration.root-announced")),
        ("target committed", dst, _notify(mid, "migration.done")),
        ("target started", dst, _action(mid, "StartAtTarget")),
    )
    out = []
    for name, events, match in marks:
        e = next((e for e in events if match(e)), None)
        if e is None or "ts" not in e:
            continue
        mark: dict[str, Any] = {"mark": name,
                                "ms": round((float(e["ts"]) - stopped_at) * 1000, 1)}
        mark.update({k: e[k] for k in _FIGURES if k in e})
        out.append(mark)
    return out
