"""What a node's memory is made of, on demand: ``kill -USR2 PID`` logs a ``heap_report``.

For an operator (or ``dwcp bench soak --heap-report``) who sees a node's RSS grow and
wants to know by what. Each report is one JSON log line with:

- ``smaps``: the kernel's view (``/proc/self/smaps_rollup``, kB: Rss, Anonymous,
  Private_Dirty, Swap);
- ``malloc``: glibc's view (``mallinfo2``: bytes in use, free bytes held in the arenas,
  mmapped bytes; and from ``malloc_info``, per arena — one per thread that allocated,
  up to eight per core — its bytes taken from the system and its free bytes; absent
  without glibc);
- ``objects``: the Python object counts by type that grew most since the previous report
  (``gc.get_objects``, so containers only, and the total);
- ``caches``: each bounded cache the node keeps, and the ledger's migration records
  (the one structure kept for good): ``[entries, cap, bytes]``, the bytes the objects
  reachable from its entries take (:func:`sampled_size`: the newest entries walked,
  scaled to all; an object two caches share is counted in both), so that
  ``bytes / entries * cap`` is its size once full (:func:`node_caches`);
- ``traced``: when the node was started with ``DWCP_TRACEMALLOC=FRAMES`` (tracemalloc
  from the start, FRAMES frames per traceback), the tracebacks whose allocated bytes grew
  most since the previous report, and the traced total. tracemalloc costs CPU and memory
  (about a third more of each), so it is off unless asked for.

A report takes a snapshot of every object (tens of milliseconds for a node of a few
hundred thousand objects) on the node's thread; nothing is done until the signal comes.
"""

from __future__ import annotations

import collections
import ctypes
import gc
import itertools
import os
import sys
import tempfile
import tracemalloc
import types
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from xml.etree import ElementTree

from consensus import ledger as ledger_module
from consensus.ledger_commands import CLIENT_WINDOW, MAX_REMEMBERED
from consensus.pbft import messages as pbft_messages

if TYPE_CHECKING:
    from federation.node.assembly import Node

__all__ = ["HeapReporter", "ENV", "tracemalloc_frames", "smaps_rollup", "malloc_info",
           "malloc_arenas", "deep_size", "sampled_size", "node_caches"]

ENV = "DWCP_TRACEMALLOC"
#: How many of the most grown types and tracebacks a report lists.
TOP = 15


def tracemalloc_frames(environ: dict[str, str] | None = None) -> int:
    """The frames per traceback ``$DWCP_TRACEMALLOC`` asks for (0: tracing off);
    ValueError naming the variable when it is not a whole number from 0 to 100."""
    raw = (os.environ if environ is None else environ).get(ENV, "").strip()
    if not raw:
        return 0
    frames = int(raw) if raw.isdigit() else -1
    if not 0 <= frames <= 100:
        raise ValueError(f"{ENV}={raw!r}: expected the frames per traceback, 0 to 100")
    return frames


def smaps_rollup(path: str = "/proc/self/smaps_rollup") -> dict[str, int]:
    """The kB figures of ``smaps_rollup`` that say where RSS is ({} off Linux)."""
    wanted = {"Rss", "Anonymous", "Private_Dirty", "Private_Clean", "Shared_Clean", "Swap"}
    out: dict[str, int] = {}
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in wanted:
                    out[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return {}
    return out


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _mallinfo2() -> Any:
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    fn.argtypes = []
    return fn


_MALLINFO2 = _mallinfo2()


def malloc_info() -> dict[str, int]:
    """glibc's heap in bytes: ``in_use`` (uordblks + hblkhd), ``free`` (fordblks, held
    in the arenas), ``mmapped`` (hblkhd), ``arena`` (sbrk'd and arena bytes); {} without
    glibc 2.33+. The counters are size_t, so they are right past 4 GiB."""
    if _MALLINFO2 is None:
        return {}
    m = _MALLINFO2()
    return {"in_use": int(m.uordblks + m.hblkhd), "free": int(m.fordblks),
            "mmapped": int(m.hblkhd), "arena": int(m.arena)}


def _libc_malloc_info() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        fopen, info, fclose = libc.fopen, libc.malloc_info, libc.fclose
    except (OSError, AttributeError):
        return None
    fopen.restype, fopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_char_p]
    info.restype, info.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.c_void_p]
    fclose.restype, fclose.argtypes = ctypes.c_int, [ctypes.c_void_p]
    return fopen, info, fclose


_MALLOC_INFO = _libc_malloc_info()


def malloc_arenas() -> list[list[int]]:
    """[bytes taken from the system, free bytes] of each glibc arena (``malloc_info``'s
    XML; [] without glibc)."""
    if _MALLOC_INFO is None:
        return []
    fopen, info, fclose = _MALLOC_INFO
    with tempfile.NamedTemporaryFile(prefix="dwcp-malloc-") as tmp:
        fp = fopen(tmp.name.encode(), b"w")
        if not fp:
            return []
        try:
            info(0, fp)
        finally:
            fclose(fp)
        try:
            root = ElementTree.parse(tmp.name).getroot()
        except ElementTree.ParseError:
            return []
    out = []
    for heap in root.findall("heap"):
        system = heap.find("system[@type='current']")
        free = sum(int(t.get("size", 0)) for t in heap.findall("total")
                   if t.get("type") in ("fast", "rest"))
        out.append([int(system.get("size", 0)) if system is not None else 0, free])
    return out


#: What :func:`deep_size` does not follow: code, classes and modules are shared by
#: everything, not part of a cache's entries.
_NOT_DATA = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType,
             types.MethodType, types.CodeType, types.FrameType)


def deep_size(roots: Iterable[object], limit: int = 2_000_000,
              seen: set[int] | None = None) -> int:
    """Bytes (``sys.getsizeof``) of ``roots`` and every object reachable from them
    through ``gc.get_referents``, each counted once, not following code, classes and
    modules; at most ``limit`` objects are visited (a cache whose entries reached the
    whole heap would otherwise take seconds: then the figure is a lower bound).
    ``seen``: ids of objects already counted (by an earlier call), not counted again."""
    seen = set() if seen is None else seen
    stack = list(roots)
    total = 0
    while stack and len(seen) < limit:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _NOT_DATA):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        stack.extend(gc.get_referents(obj))
    return total


#: Entries of a cache whose bytes :func:`sampled_size` walks (the newest), then scales.
SAMPLE = 256


def sampled_size(containers: Iterable[Any], sample: int = SAMPLE) -> int:
    """Bytes of ``containers`` (dicts and lists, each a cache's entries) and what their
    entries hold: each container's own size, plus :func:`deep_size` of its newest
    ``sample`` entries (a dict's keys and values, a list's items) times its entries /
    ``sample``. A walk of every entry of full caches (tens of thousands) would allocate
    megabytes for a moment in the node it measures; the newest entries are what the
    cache holds now, of the same kinds as the rest. Containers that hold the same
    records side by side (a mapping and its index, in insertion order) are walked with
    one memory of what was counted, so a record two of them hold is counted once."""
    total = 0
    seen: set[int] = set()
    for c in containers:
        total += sys.getsizeof(c)
        n = len(c)
        if not n:
            continue
        if isinstance(c, dict):
            pairs = list(itertools.islice(reversed(c.items()), sample))
            some: list[object] = [x for kv in pairs for x in kv]
            taken = len(pairs)
        else:
            some = list(c[-sample:])
            taken = len(some)
        total += deep_size(some, seen=seen) * n // taken
    return total


def node_caches(node: Node) -> dict[str, list[int | None]]:
    """``name -> [entries, cap, bytes]`` of the node's bounded caches and of the ledger's
    migration records (cap None: kept for good), measured now (:func:`sampled_size`):

    - ``signature_memo``: signatures known to verify, this process's
      (``consensus.pbft.messages``; the node sets 8,192, ``run_node.SIGNATURE_MEMO``);
    - ``verifier``: the replica's opened signed messages (``Verifier.CAPACITY``);
    - ``statements``: verified gossip statements (``statement_cache_size``);
    - ``request_book``: the ledger's operator request outcomes, with their encodings
      kept for the snapshot (``MAX_REMEMBERED``; they also go after 24 h);
    - ``client_replies``: the ledger's last results per PBFT client (``CLIENT_WINDOW``
      per client; the clients are the DCs);
    - ``result_memo``: encoded ledger results by value (``consensus.ledger``);
    - ``ended_sessions``: the node's ended migration sessions, their last progress and
      outcome (``ENDED_KEEP_MAX``; they also go after ``ENDED_KEEP_SECONDS``);
    - ``ledger_migrations``: the ledger's migration records with their encodings, one
      per migration ever begun, no cap.
    """
    from federation.node.assembly import ENDED_KEEP_MAX  # the assembly imports this module

    core = node.core
    out: dict[str, list[int | None]] = {}
    good = pbft_messages._GOOD
    out["signature_memo"] = [len(good), pbft_messages._GOOD_CAPACITY, sampled_size([good])]
    statements = node.control.statements
    out["statements"] = [len(statements._cache), statements.cache_max,
                         sampled_size([statements._cache])]
    memo = ledger_module._RESULT_BYTES
    out["result_memo"] = [len(memo), ledger_module._RESULT_MEMO, sampled_size([memo])]
    if core is None:
        return out
    verifier = core.replica.state.verifier
    out["verifier"] = [len(verifier._seen), verifier.CAPACITY, sampled_size([verifier._seen])]
    ledger = core.replica.ledger
    encoder = ledger._encoder
    book = ledger.requests
    out["request_book"] = [len(book), MAX_REMEMBERED, sampled_size(
        [book.records, book._order, encoder._requests._enc, encoder._requests._keys])]
    clients = ledger._clients
    out["client_replies"] = [sum(len(r) for _, r in clients.values()),
                             CLIENT_WINDOW * len(core.replica.state.q.members),
                             sampled_size(
                                 [r for _, r in clients.values()] + list(ledger._ids.values()))]
    ended = list(core._ended)
    out["ended_sessions"] = [len(ended), ENDED_KEEP_MAX, _ended_size(core, ended)]
    out["ledger_migrations"] = [len(ledger.migrations), None, sampled_size(
        [ledger.migrations, encoder._migrations._enc, encoder._migrations._keys])]
    return out


def _ended_size(core: Any, ended: list[str]) -> int:
    """Bytes of the ended sessions ``ended`` (ids): the index of them, and per session
    (its session object, last progress and outcome, the three dicts' slots) the newest
    SAMPLE's walked and scaled."""
    if not ended:
        return sys.getsizeof(core._ended)
    some = ended[-SAMPLE:]
    held = deep_size([x for mid in some for x in (
        mid, core.sessions.get(mid), core.progress.get(mid), core.outcomes.get(mid))
        if x is not None])
    slots = sum(sys.getsizeof(d) / max(len(d), 1)
                for d in (core.sessions, core.progress, core.outcomes))
    return int(sys.getsizeof(core._ended) + len(ended) * (held / len(some) + slots))


class HeapReporter:
    """Reports growth between two calls of :meth:`report` (the first against nothing)."""

    def __init__(self, frames: int = 0) -> None:
        self.frames = frames
        if frames and not tracemalloc.is_tracing():
            tracemalloc.start(frames)
        self._types: collections.Counter[str] = collections.Counter()
        self._snapshot: tracemalloc.Snapshot | None = None
        self.reports = 0

    def report(self, caches: dict[str, list[int | None]] | None = None) -> dict[str, Any]:
        """The report; ``caches``: :func:`node_caches` of the node, added as is."""
        gc.collect()
        types = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
        grown = types.copy()
        grown.subtract(self._types)
        self._types = types
        doc: dict[str, Any] = {
            "n": self.reports,
            "smaps": smaps_rollup(),
            "malloc": {**malloc_info(), "arenas": malloc_arenas()},
            "objects": {"total": sum(types.values()),
                        "grown": [[name, types[name], d] for name, d in grown.most_common(TOP)
                                  if d > 0]},
        }
        if caches is not None:
            doc["caches"] = caches
        if tracemalloc.is_tracing():
            snap = tracemalloc.take_snapshot().filter_traces(
                (tracemalloc.Filter(False, tracemalloc.__file__),))
            stats = (snap.compare_to(self._snapshot, "traceback") if self._snapshot
                     else snap.statistics("traceback"))
            self._snapshot = snap
            total, peak = tracemalloc.get_traced_memory()
            doc["traced"] = {
                "total": total, "peak": peak,
                "grown": [_stat(s) for s in sorted(stats, key=_growth, reverse=True)[:TOP]],
            }
        self.reports += 1
        return doc


def _growth(stat: Any) -> int:
    return int(getattr(stat, "size_diff", stat.size))


def _stat(stat: Any) -> dict[str, Any]:
    return {"grew": _growth(stat), "size": int(stat.size), "count": int(stat.count),
            "at": [f"{'/'.join(f.filename.split('/')[-2:])}:{f.lineno}"
                   for f in stat.traceback]}
