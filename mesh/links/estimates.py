"""Link-condition estimates and the versioned, gossiped link-state table.

Every DC sends each peer a :class:`LinkPing` every ``ping_interval``. From them:

* **RTT** (round trip, per pair): a ping echoes the last ping received from its
  destination and how long it was held; the sample feeds RFC 6298 §2 smoothing
  (alpha = 1/8, beta = 1/4) and ``rto()`` = SRTT + max(G, 4 * RTTVAR).
* **Jitter** (per direction, seen by the receiver): RFC 3550 §6.4.1 interarrival
  jitter, J += (|D| - J) / 16, from the sender's timestamps (only differences).
* **Loss** (per direction, seen by the receiver): missing sequence numbers over the
  last ``loss_window`` expected pings (RON, SOSP 2001, averages loss over its last 100
  probes), counting pings overdue by silence. ``down_misses`` consecutive missing pings
  mark the direction down (RON declares an outage after 4 consecutive lost probes;
  see ``down_misses`` for ours); the first ping after that brings it up with a fresh
  window (the outage is reported as ``down``, not as a loss rate).
* **Bandwidth** (per direction, seen by the sender): throughput samples of bulk
  transfers (``record_transfer``, called by the data plane) or of an optional
  packet-train probe (``probe_bandwidth``); the estimate is the maximum of the last
  ``bw_samples`` samples (BBR's windowed-max bottleneck bandwidth filter, Cardwell et
  al., ACM Queue 2016).

Each DC publishes one :class:`LinkEntry` per peer, under a version that only grows (a
lease of version numbers is persisted, so a restart never reuses one). Entries are
republished when they change enough to matter (``significant``) and spread by
gossip (mesh.gossip.membership) and anti-entropy; every DC merges by version, so all
converge to the same table. :meth:`LinkTable.view` reads a directed link from
the entries of both of its ends.

An entry travels signed by its origin (:mod:`mesh.gossip.statements`): the table keeps
each entry with its signature, passes it on unchanged, and takes an entry only from the
DC it describes, with a version at most ``SELF_STEP`` above the one it holds and never
above ``COUNTER_MAX``, so a liar can speak only of its own links.
"""

from __future__ import annotations

import bisect
import math
import random
import struct
from collections import deque
from collections.abc import Callable, Iterable, Sequence

import attrs

from mesh.core import Action, Notify, Persist, Send, SetTimer, Store
from mesh.gossip.control_msgs import (
    BandwidthProbe,
    BandwidthReport,
    LinkEntry,
    LinkPing,
    OriginDigest,
    Signed,
)
from mesh.gossip.statements import COUNTER_MAX, SELF_STEP, Statements

__all__ = ["LinkConfig", "LinkView", "LinkTable", "LinkProber", "LOSS_EDGES"]

#: Loss levels whose crossing is worth a gossip round: the mode thresholds of DESIGN.md
#: (0.1 %, 1 %) and the routing loss limits (5 %, 10 %), then coarse steps.
LOSS_EDGES = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5)


@attrs.frozen
class LinkConfig:
    #: 1.5 s: with down_misses = 3 a cut link is down within ~5 s, leaving half of the
    #: issue's 10 s reroute budget for gossip; at N = 16 that is 10 pings/s per DC
    #: (~3.5 kbit/s). RON probes every 12 s and detects outages in ~18 s on average.
    ping_interval: float = 1.5
    #: Silence is judged every third of a ping interval: a 0.5 s granularity adds at most
    #: a tenth of the issue's 10 s reroute budget.
    check_fraction: float = 1 / 3
    #: A ping is overdue this fraction of an interval after it was due (the latency
    #: jitter of the geo matrix is a few ms; a quarter interval is far above it).
    grace_fraction: float = 0.25
    #: RON's loss estimate uses the last 100 probes.
    loss_window: int = 100
    #: Consecutive missing pings that mark a direction down. At 1 % loss a false outage
    #: has probability 1e-6 per ping (one per ~1.7 h among 240 links); RON uses 4.
    down_misses: int = 3
    #: Two missing pings (3 s of silence, probability 1e-4 per ping at 1 % loss) ask
    #: SWIM to probe the peer now rather than in its turn (mesh.links.control_plane): measured, it
    #: trims the tail of crash detection, where the round-robin reaches a crashed DC late.
    silent_misses: int = 2
    #: RFC 6298 §2: alpha = 1/8, beta = 1/4, K = 4; G is our timer granularity (1 ms).
    alpha: float = 1 / 8
    beta: float = 1 / 4
    rto_k: float = 4.0
    granularity: float = 0.001
    #: RFC 3550 §6.4.1: the jitter estimator's gain is 1/16.
    jitter_gain: float = 1 / 16
    #: Republish RTT when it moves by 10 % and at least 2 ms (above the EWMA's noise on
    #: the geo matrix, where jitter is a few percent of the latency).
    #: A loss estimate must pass an edge of LOSS_EDGES by 20 % of it (1.2 % for the 1 %
    #: edge, 6 % for 5 %) before it is republished: over the 100-ping window a link whose
    #: true loss sits at an edge crosses it back and forth, and each crossing was a
    #: signed entry gossiped to every DC. Measured in flaky-node (5 % loss, seed 1,
    #: 300 s): 1,762 publications without the margin, 1,451 with it.
    loss_margin: float = 0.2
    #: ... and move by at least this many pings of the window. Over 100 pings a loss
    #: estimate has a resolution of 1 % and, at the geo matrix's 1 % loss, a standard
    #: deviation of 1 %: one lost ping more or less (0 <-> 1 %, across the 0.1 % edge)
    #: is noise, yet it was a signed entry gossiped to every DC, the largest share of
    #: link publications (measured in crash-one, seed 1, N = 16: 0.10 publications a
    #: second per DC; at N = 64 each is paid 63 times over). A step of 3 pings is 3
    #: standard deviations at 1 % loss. Down and up are never held back.
    loss_step: int = 3
    rtt_change: float = 0.10
    rtt_change_ms: float = 2.0
    #: BBR's BtlBw filter spans ~10 round trips; we keep the last 10 samples.
    bw_samples: int = 10
    bw_change: float = 0.10
    #: A packet train of 8 packets of 16 KiB (Dovrolis, Ramanathan, Moore, "What do
    #: packet dispersion techniques measure?", INFOCOM 2001: trains beat packet pairs).
    train_packets: int = 8
    train_bytes: int = 16 * 1024
    #: Versions are leased from the store in blocks: one synced write per 1000 updates.
    version_block: int = 1000


@attrs.frozen
class LinkView:
    """The directed link src -> dst as every DC sees it once the table converged."""

    rtt_ms: float
    loss: float
    down: bool
    jitter_ms: float
    bw_mbps: float | None


def _single(x: float) -> float:
    """``x`` rounded to the nearest IEEE 754 single-precision value."""
    return float(struct.unpack("<f", struct.pack("<f", x))[0])


def _loss_bucket(loss: float) -> int:
    return sum(1 for edge in LOSS_EDGES if loss >= edge)


def _loss_bucket_moved(old: float, new: float, margin: float, step: float = 0.0) -> bool:
    """``new`` crossed an edge of LOSS_EDGES away from ``old`` by more than ``margin``
    (relative) and moved by at least ``step`` (absolute): a loss hovering at an edge is
    not a change worth a gossip round."""
    if abs(new - old) < step:
        return False
    if new > old:
        return _loss_bucket(new / (1 + margin)) > _loss_bucket(old)
    return _loss_bucket(new * (1 + margin)) < _loss_bucket(old)


class LinkTable:
    """Every DC's entries, merged by version, each with its origin's signature."""

    def __init__(self, me: str, members: Iterable[str], statements: Statements) -> None:
        self.me = me
        self.members = set(members) | {me}
        self.statements = statements
        self.entries: dict[tuple[str, str], LinkEntry] = {}
        self.signed: dict[tuple[str, str], Signed] = {}
        #: per origin: [count, sum of versions, max version] of the entries held, kept as
        #: entries change (a digest is asked for every few seconds, see digest())
        self._digest: dict[str, list[int]] = {}
        #: the version an entry's key held before its current one (see entries_newer_than)
        self._previous: dict[tuple[str, str], int] = {}
        #: per origin: the keys of its entries held, sorted
        self._keys: dict[str, list[tuple[str, str]]] = {}
        #: Called with (entry, now) for every entry adopted or published (simulator metrics).
        self.on_adopt: Callable[[LinkEntry, float], None] | None = None
        self.refused = 0

    def check(self, e: LinkEntry) -> str | None:
        if e.origin not in self.members or e.peer not in self.members or e.origin == e.peer:
            return f"link entry {e.origin}->{e.peer} names an unknown DC"
        old = self.entries.get((e.origin, e.peer))
        if e.version > min((old.version if old is not None else 0) + SELF_STEP, COUNTER_MAX):
            return f"link entry {e.origin}->{e.peer}: version {e.version} out of range"
        if not 0.0 <= e.loss <= 1.0:
            return f"link entry {e.origin}->{e.peer}: loss {e.loss} outside 0..1"
        if e.rtt_ms < 0 or e.rttvar_ms < 0 or e.jitter_ms < 0:
            return f"link entry {e.origin}->{e.peer}: negative time"
        if e.bw_mbps is not None and e.bw_mbps < 0:
            return f"link entry {e.origin}->{e.peer}: negative bandwidth"
        return None

    def open(
        self, now: float, peer: str, statements: Sequence[Signed]
    ) -> list[tuple[LinkEntry, Signed]]:
        """The entries of ``statements`` (passed on by ``peer``) signed by their origin and
        passing :meth:`check`; the rest are refused and counted."""
        out = []
        for signed in statements:
            e = self.statements.open_link(now, peer, signed)
            if e is None:
                continue
            if self.check(e) is not None:
                self.refused += 1
                self.statements.refuse("out_of_range")
                continue
            out.append((e, signed))
        return out

    def merge(
        self, now: float, opened: Sequence[tuple[LinkEntry, Signed]]
    ) -> list[tuple[LinkEntry, Signed]]:
        """Adopt every entry (from :meth:`open`) newer than ours; return those adopted
        (to pass on)."""
        adopted = []
        for e, signed in opened:
            key = (e.origin, e.peer)
            old = self.entries.get(key)
            if old is not None and old.version >= e.version:
                continue
            if e.origin == self.me:
                continue  # our own entries come from our prober only (see LinkProber.merge)
            self._hold(key, e, old)
            self.signed[key] = signed
            adopted.append((e, signed))
            if self.on_adopt is not None:
                self.on_adopt(e, now)
        return adopted

    def put_own(self, now: float, e: LinkEntry) -> Signed:
        """Publish our own entry: signed, kept, and returned (to pass on)."""
        signed = self.statements.sign_link(e)
        key = (e.origin, e.peer)
        self._hold(key, e, self.entries.get(key))
        self.signed[key] = signed
        if self.on_adopt is not None:
            self.on_adopt(e, now)
        return signed

    def _hold(self, key: tuple[str, str], e: LinkEntry, old: LinkEntry | None) -> None:
        d = self._digest.setdefault(e.origin, [0, 0, 0])
        if old is None:
            d[0] += 1
            bisect.insort(self._keys.setdefault(e.origin, []), key)
        else:
            d[1] -= old.version
            self._previous[key] = old.version
        d[1] += e.version
        d[2] = max(d[2], e.version)
        self.entries[key] = e

    def digest(self) -> tuple[OriginDigest, ...]:
        return tuple(OriginDigest(o, *self._digest[o]) for o in sorted(self._digest))

    def lacks(self, digest: Sequence[OriginDigest]) -> bool:
        """Whether ``digest`` (a peer's) may hold entries we lack: some origin where it
        differs from ours and is not at or behind ours in every figure."""
        for t in digest:
            d = self._digest.get(t.origin)
            if d is None:
                if t.count:
                    return True
                continue
            if (t.count, t.version_sum, t.version_max) == tuple(d):
                continue
            if not (t.count <= d[0] and t.version_sum <= d[1] and t.version_max <= d[2]):
                return True
        return False

    def entries_newer_than(self, digest: Sequence[OriginDigest]) -> list[Signed]:
        """Our entries the holder of ``digest`` lacks, by origin. An origin's versions all
        come from one counter (LinkProber), so the peer lacks every entry of ours above
        its ``version_max``; if our entries at or below it, with the versions they
        replaced above it, add up to its count and sum, those are all it lacks (the
        usual case: it is behind by the latest few publications, which anti-entropy
        every few seconds must carry without the origin's whole row). Otherwise (a gap
        below its maximum) it gets every entry of that origin."""
        theirs = {d.origin: d for d in digest}
        out: list[Signed] = []
        for origin in sorted(self._keys):
            keys = self._keys[origin]
            d = self._digest[origin]
            t = theirs.get(origin)
            if t is not None:
                if (d[0], d[1], d[2]) == (t.count, t.version_sum, t.version_max):
                    continue
                if d[0] <= t.count and d[1] <= t.version_sum and d[2] <= t.version_max:
                    continue  # they are at least as far along
                above = [k for k in keys if self.entries[k].version > t.version_max]
                count = sum_ = 0
                for k in keys:
                    v = self.entries[k].version
                    if v <= t.version_max:
                        count, sum_ = count + 1, sum_ + v
                    elif (p := self._previous.get(k)) is not None and p <= t.version_max:
                        count, sum_ = count + 1, sum_ + p
                if (count, sum_) == (t.count, t.version_sum):
                    keys = above
            out.extend(self.signed[k] for k in keys)
        return out

    def view(self, src: str, dst: str) -> LinkView | None:
        """src -> dst: loss, jitter and down from dst's entry, RTT and bandwidth from
        src's (RTT falls back to dst's). None until both ends have reported."""
        rx = self.entries.get((dst, src))
        tx = self.entries.get((src, dst))
        if rx is None:
            return None
        rtt_src = tx if tx is not None and tx.rtt_ms > 0 else rx
        if rtt_src.rtt_ms <= 0:
            return None
        return LinkView(
            rtt_ms=rtt_src.rtt_ms, loss=rx.loss, down=rx.down, jitter_ms=rx.jitter_ms,
            bw_mbps=tx.bw_mbps if tx is not None else None,
        )


@attrs.define(slots=True)
class _Measured:
    """An entry's figures before it is published (no version, no wire checks): checking
    each peer's figures for a significant change every third of a ping interval must
    not build a message each time."""

    rtt_ms: float
    rttvar_ms: float
    jitter_ms: float
    loss: float
    down: bool
    bw_mbps: float | None


@attrs.define
class _PeerLink:
    """Local measurements of one peer."""

    # sending side
    seq: int = 0
    sent: dict[int, float] = attrs.field(factory=dict)
    srtt: float | None = None
    rttvar: float = 0.0
    bw: deque[float] = attrs.field(factory=deque)
    # receiving side
    session: int | None = None
    hi: int = -1
    first: int = 0
    got: deque[int] = attrs.field(factory=deque)
    last_rx: float = 0.0
    last_transit: float | None = None
    jitter: float = 0.0
    down: bool = False
    silent_reported: float | None = None
    echo: tuple[int, float] | None = None
    train: dict[int, list[float]] = attrs.field(factory=dict)
    # last published
    published: LinkEntry | None = None


class LinkProber:
    """The sans-I/O link prober of DC ``me``: pings, estimates, own table entries."""

    def __init__(
        self,
        me: str,
        peers: Sequence[str],
        rng: random.Random,
        table: LinkTable,
        config: LinkConfig = LinkConfig(),
        store: Store | None = None,
    ) -> None:
        self.me = me
        self.cfg = config
        self.rng = rng
        self.table = table
        self.store = store
        self.session = rng.getrandbits(63)
        self.peers = {p: _PeerLink() for p in sorted(peers)}
        self._version, self._lease = self._load_lease()
        self._train = 0
        #: entries published since the caller last drained this list, each with the
        #: signed statement that carries it
        self.published: list[tuple[LinkEntry, Signed]] = []
        #: peers whose pings just fell silent (``silent_misses`` overdue), to be drained
        self.silent: list[str] = []

    # ------------------------------------------------------------------ versions

    def _load_lease(self) -> tuple[int, int]:
        raw = self.store.get("linkstate/version-lease") if self.store is not None else None
        base = int(raw.decode()) if raw else 0
        return base, base

    def _next_version(self, out: list[Action]) -> int:
        self._version += 1
        if self._version > self._lease:
            self._lease = self._version + self.cfg.version_block
            out.append(Persist("linkstate/version-lease", str(self._lease).encode(), sync=True))
        return self._version

    def adopt_own(self, entries: Sequence[LinkEntry]) -> None:
        """Someone holds an entry of ours newer than we remember (our store was lost):
        continue above it so our next publication wins."""
        for e in entries:
            if e.origin == self.me and e.version >= self._version:
                self._version = e.version
                self._lease = min(self._lease, self._version)

    # ------------------------------------------------------------------ estimates

    def rto(self, peer: str) -> float | None:
        """RFC 6298 §2.3 retransmission timeout to ``peer``; None before any sample."""
        p = self.peers.get(peer)
        if p is None or p.srtt is None:
            return None
        return p.srtt + max(self.cfg.granularity, self.cfg.rto_k * p.rttvar)

    def loss(self, p: _PeerLink, now: float) -> tuple[float, int]:
        """Loss of peer -> me over the window, and how many pings are overdue now."""
        interval = self.cfg.ping_interval
        overdue = max(0, math.floor((now - p.last_rx) / interval - self.cfg.grace_fraction))
        if p.session is None:
            return (1.0 if overdue else 0.0), overdue
        top = p.hi + overdue
        low = max(p.first, top - self.cfg.loss_window + 1)
        expected = top - low + 1
        received = len(p.got) - bisect.bisect_left(p.got, low)  # p.got is sorted
        # Until the window fills (at start, after an outage) the count of missing pings
        # is divided by the full window: 4 losses in the first 37 pings of a 1 % link
        # (seen in partition-heal) must not read as 11 % and push routes off the link.
        return (expected - received) / max(expected, self.cfg.loss_window), overdue

    def record_transfer(self, now: float, peer: str, nbytes: int, seconds: float) -> list[Action]:
        """The data plane moved ``nbytes`` to ``peer`` in ``seconds``: a bandwidth sample."""
        if peer not in self.peers:
            raise ValueError(f"record_transfer: {peer!r} is not a peer of {self.me}")
        if nbytes <= 0 or not seconds > 0:
            raise ValueError(f"record_transfer to {peer}: need bytes > 0 and seconds > 0")
        return self._bw_sample(now, peer, nbytes * 8 / seconds / 1e6)

    def _bw_sample(self, now: float, peer: str, mbps: float) -> list[Action]:
        p = self.peers[peer]
        p.bw.append(mbps)
        while len(p.bw) > self.cfg.bw_samples:
            p.bw.popleft()
        return self._publish_if_changed(now, peer)

    def probe_bandwidth(self, now: float, peer: str) -> list[Action]:
        """Send a packet train to ``peer``; its dispersion comes back as a sample."""
        self._train += 1
        n = self.cfg.train_packets
        pad = bytes(self.cfg.train_bytes)
        return [Send(peer, BandwidthProbe(self._train, i, n, pad)) for i in range(n)]

    # ------------------------------------------------------------------ events

    def start(self, now: float) -> list[Action]:
        out: list[Action] = []
        for name, p in self.peers.items():
            p.last_rx = now
            first = now + self.rng.uniform(0, self.cfg.ping_interval)
            out.append(SetTimer(("link", "ping", name), first))
        out.append(SetTimer(("link", "check"), now + self._check_every()))
        return out

    def ping_due(self, now: float, peer: str) -> list[Action]:
        p = self.peers[peer]
        p.seq += 1
        p.sent[p.seq] = now
        if len(p.sent) > 8:  # an echo older than 8 intervals is useless for RTT
            del p.sent[min(p.sent)]
        echo_seq, hold = (None, 0.0) if p.echo is None else (p.echo[0], now - p.echo[1])
        p.echo = None
        return [
            Send(peer, LinkPing(self.session, p.seq, now, echo_seq, hold)),
            SetTimer(("link", "ping", peer), now + self.cfg.ping_interval),
        ]

    def received_ping(self, now: float, peer: str, msg: LinkPing) -> list[Action]:
        p = self.peers.get(peer)
        if p is None:
            return [Notify("link-refused", {"peer": peer, "why": "not a federation member"})]
        if msg.session != p.session:
            p.session, p.hi, p.first, p.got = msg.session, msg.seq, msg.seq, deque()
            p.last_transit = None
        elif msg.seq <= p.hi and msg.seq in p.got:
            return []  # a duplicate
        was_down = p.down
        if p.down:
            p.down, p.first, p.got = False, msg.seq, deque()  # a fresh window after an outage
        p.hi = max(p.hi, msg.seq)
        if p.got and msg.seq < p.got[-1]:
            bisect.insort(p.got, msg.seq)  # a late ping: the window stays sorted
        else:
            p.got.append(msg.seq)
        while p.got and p.got[0] <= p.hi - self.cfg.loss_window:
            p.got.popleft()
        p.last_rx = now
        transit = now - msg.sent_at
        if p.last_transit is not None:
            p.jitter += (abs(transit - p.last_transit) - p.jitter) * self.cfg.jitter_gain
        p.last_transit = transit
        p.echo = (msg.seq, now)
        if msg.echo_seq is not None and msg.echo_seq in p.sent:
            sample = now - p.sent.pop(msg.echo_seq) - msg.echo_hold
            if sample > 0:
                self._rtt_sample(p, sample)
        return self._publish_if_changed(now, peer, force=was_down)

    def _rtt_sample(self, p: _PeerLink, r: float) -> None:
        if p.srtt is None:  # RFC 6298 §2.2
            p.srtt, p.rttvar = r, r / 2
        else:  # RFC 6298 §2.3
            p.rttvar = (1 - self.cfg.beta) * p.rttvar + self.cfg.beta * abs(p.srtt - r)
            p.srtt = (1 - self.cfg.alpha) * p.srtt + self.cfg.alpha * r

    def _check_every(self) -> float:
        return self.cfg.ping_interval * self.cfg.check_fraction

    def check(self, now: float) -> list[Action]:
        """Judge silence on every link and republish what changed."""
        out: list[Action] = [SetTimer(("link", "check"), now + self._check_every())]
        for name, p in self.peers.items():
            loss, overdue = self.loss(p, now)
            if overdue == self.cfg.silent_misses and p.silent_reported != p.last_rx:
                p.silent_reported = p.last_rx
                self.silent.append(name)
            if overdue >= self.cfg.down_misses and not p.down:
                p.down = True
                out.append(Notify("link-down", {"from": name, "to": self.me}))
            out += self._publish_if_changed(now, name, loss=loss)
        return out

    def received_train(self, now: float, peer: str, msg: BandwidthProbe) -> list[Action]:
        p = self.peers.get(peer)
        if p is None or msg.count < 2 or msg.index >= msg.count:
            return [Notify("link-refused", {"peer": peer, "why": "bad bandwidth probe"})]
        times = p.train.setdefault(msg.train, [])
        times.append(now)
        for old in [t for t in p.train if t < msg.train - 4]:
            del p.train[old]
        if msg.index != msg.count - 1 or len(times) < 2:
            return []
        del p.train[msg.train]
        spread = times[-1] - times[0]
        if spread <= 0:
            return []
        mbps = (len(times) - 1) * (len(msg.padding) + 32) * 8 / spread / 1e6
        return [Send(peer, BandwidthReport(msg.train, mbps))]

    def received_report(self, now: float, peer: str, msg: BandwidthReport) -> list[Action]:
        if peer not in self.peers or not msg.mbps > 0:
            return [Notify("link-refused", {"peer": peer, "why": "bad bandwidth report"})]
        return self._bw_sample(now, peer, msg.mbps)

    # ------------------------------------------------------------------ publishing

    def entry(self, now: float, peer: str, version: int) -> LinkEntry:
        return self._entry(self._measure(self.peers[peer], now), peer, version)

    def _measure(self, p: _PeerLink, now: float, loss: float | None = None) -> _Measured:
        """The figures an entry would publish now (``loss`` if the caller has it). Times
        and bandwidth at single precision: 7 significant digits, far finer than any
        threshold of modes or routes, and canonical CBOR then writes each in 5 bytes
        instead of 9 (an entry is sent many times by gossip, signed). Loss stays exact:
        it is a count over the window, compared with thresholds it can equal (1/100 is
        the 1 % edge)."""
        if loss is None:
            loss, _ = self.loss(p, now)
        return _Measured(
            rtt_ms=_single((p.srtt or 0.0) * 1000), rttvar_ms=_single(p.rttvar * 1000),
            jitter_ms=_single(p.jitter * 1000), loss=loss if not p.down else 1.0,
            down=p.down, bw_mbps=_single(max(p.bw)) if p.bw else None,
        )

    def _entry(self, m: _Measured, peer: str, version: int) -> LinkEntry:
        return LinkEntry(
            origin=self.me, peer=peer, version=version, rtt_ms=m.rtt_ms, rttvar_ms=m.rttvar_ms,
            jitter_ms=m.jitter_ms, loss=m.loss, down=m.down, bw_mbps=m.bw_mbps,
        )

    def significant(self, old: LinkEntry | None, new: LinkEntry | _Measured) -> bool:
        if old is None:
            return new.rtt_ms > 0 or new.down or new.bw_mbps is not None
        if old.down != new.down:
            return True
        step = (self.cfg.loss_step - 0.5) / self.cfg.loss_window  # exact counts, float-safe
        if _loss_bucket_moved(old.loss, new.loss, self.cfg.loss_margin, step):
            return True
        drtt = abs(new.rtt_ms - old.rtt_ms)
        if drtt > max(self.cfg.rtt_change * old.rtt_ms, self.cfg.rtt_change_ms):
            return True
        if (old.bw_mbps is None) != (new.bw_mbps is None):
            return True
        if old.bw_mbps is not None and new.bw_mbps is not None:
            return abs(new.bw_mbps - old.bw_mbps) > self.cfg.bw_change * old.bw_mbps
        return False

    def _publish_if_changed(self, now: float, peer: str, force: bool = False,
                            loss: float | None = None) -> list[Action]:
        p = self.peers[peer]
        measured = self._measure(p, now, loss)
        if not force and not self.significant(p.published, measured):
            return []
        out: list[Action] = []
        entry = self._entry(measured, peer, self._next_version(out))
        p.published = entry
        self.published.append((entry, self.table.put_own(now, entry)))
        return out
