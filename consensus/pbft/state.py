"""What a PBFT replica knows, as the phases see it: :class:`ReplicaState`.

The phases (:mod:`~consensus.pbft.agreement`, :mod:`~consensus.pbft.execution`,
:mod:`~consensus.pbft.transfer`, :mod:`~consensus.pbft.ordering`,
:mod:`~consensus.pbft.viewchange`, :mod:`~consensus.pbft.status`,
:mod:`~consensus.pbft.recovery`) are functions over this state and an
:class:`~consensus.pbft.outbox.Outbox`; none of them imports the replica. The
state holds data and the bookkeeping that needs no output (pending requests,
slots, metrics); everything a phase says to the world goes through the outbox.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import attrs

from consensus.authz import OperatorTable
from consensus.ledger import Ledger
from consensus.pbft.client import LedgerClient
from consensus.pbft.durable import ReplicaLog
from consensus.pbft.evidence import EvidenceBook
from consensus.pbft.messages import (
    MAX_BATCH,
    NULL_BATCH,
    NULL_DIGEST,
    Batch,
    Envelope,
    PreparedCert,
    Signed,
    Verifier,
)
from consensus.pbft.quorum import Quorum, ValidViewChange
from consensus.snapshot_chunks import ChunkAssembly

__all__ = [
    "PbftConfig",
    "ReplicaState",
    "Slot",
    "ChunkTransfer",
    "PendingRestore",
    "Decided",
    "CHECKPOINT_INTERVAL",
    "WATERMARK_WINDOW",
    "REQUEST_TIMER",
    "NEW_VIEW_TIMER",
    "BATCH_TIMER",
    "STATUS_TIMER",
]

#: K: checkpoint period. TOCS'02 §8.1 runs with "checkpoint period K = 128".
CHECKPOINT_INTERVAL = 128
#: L: log size, the distance between low and high watermark. TOCS'02 §8.1: L = 256 (2K).
WATERMARK_WINDOW = 256

REQUEST_TIMER = ("pbft", "request")
NEW_VIEW_TIMER = ("pbft", "new-view")
BATCH_TIMER = ("pbft", "batch")
STATUS_TIMER = ("pbft", "status")


@attrs.frozen
class PbftConfig:
    #: Base view-change timeout. BFT-SMaRt's system.totalordermulticast.timeout
    #: default is 2000 ms; it doubles at every view change that fails to
    #: complete (OSDI'99 §4.5.2) and resets once requests execute again.
    view_timeout: float = 2.0
    #: Doublings are capped at 2^6 = 64 x the base (128 s by default), so a long
    #: partition does not leave the federation idle for minutes after it heals.
    max_backoff: int = 6
    #: B: requests per batch (BFT-SMaRt's maxBatchSize default, 100).
    batch_max: int = MAX_BATCH
    #: T: how long the primary holds a partial batch while instances are in
    #: flight. BFT-SMaRt's batchtimeout default is -1 (never wait); we wait at
    #: most 1 ms, a third of the 3 ms unbatched latency target of issue 5.
    batch_wait: float = 0.001
    #: Batches in flight before the primary batches. TOCS'02 §5.1.4: the
    #: primary batches requests that arrive while a bounded window of protocol
    #: instances is running; BFT-SMaRt runs one at a time, and so do we: on the
    #: 2-core test machine (bench, n = 4, 16 commands in flight per node, three
    #: alternating runs each) one instance at a time took 1,000-1,065 us of CPU
    #: per command and committed 970-1,045/s, two took 1,190-1,245 us and
    #: 844-872/s at the same p99: with twice the batches in flight each is half
    #: as large, and the votes, frames and reply signatures are paid per batch.
    #: The batch then holds what arrived while the previous instance ran, so its
    #: size follows the load (up to ``batch_max``).
    pipeline: int = 1
    #: Status period (TOCS'02 §5.2: replicas multicast status periodically so
    #: lost messages are retransmitted); a quarter of the view timeout, so a
    #: lost message is repaired before a backup suspects the primary.
    status_interval: float = 0.5
    checkpoint_interval: int = CHECKPOINT_INTERVAL
    window: int = WATERMARK_WINDOW
    #: How long a client waits for f+1 matching replies (see consensus.pbft.client).
    client_timeout: float = 30.0
    #: Rebuild a transferred checkpoint's ledger away from event handling: the replica
    #: hands the decode and check of the snapshot to its driver as an ``Offload``
    #: (a worker thread in the node) and installs the ledger when the outcome comes
    #: back (consensus.pbft.transfer). Off: the restore runs in the step that received
    #: the snapshot (the simulator's default; 16 s for 100,000 VMs under load, longer
    #: than a link's keepalive, when the node did that on its event loop).
    offload_restore: bool = False


class Slot:
    """Agreement state of one sequence number in the current view."""

    __slots__ = ("seq", "pp", "digest", "batch", "time_us", "prepares", "commits", "prepared",
                 "sent_commit")

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.pp: Signed | None = None
        self.digest: bytes | None = None
        self.batch: bytes | None = None
        #: the time stamped on the batch (consensus.pbft.batch_time), 0 until it is held
        self.time_us = 0
        self.prepares: dict[str, tuple[bytes, Signed]] = {}
        self.commits: dict[str, tuple[bytes, Signed]] = {}
        self.prepared = False
        self.sent_commit = False


@attrs.define
class ChunkTransfer:
    """A snapshot larger than one chunk being fetched: the checkpoint that proves it, the
    chunks held so far, and the peer asked last."""

    seq: int
    proof: tuple[Signed, ...]
    chunks: ChunkAssembly
    source: str


@attrs.frozen(eq=False)
class PendingRestore:
    """A proven checkpoint whose ledger is being rebuilt off the replica's steps
    (``PbftConfig.offload_restore``): its proof and snapshot, installed when the rebuilt
    ledger comes back; with the STATE-REPLY's sender (None: fetched in chunks) and the
    chunks' hashes (None: it came in one piece)."""

    seq: int
    proof: tuple[Signed, ...]
    snapshot: bytes
    sender: str | None
    hashes: tuple[bytes, ...] | None = None


@attrs.frozen
class Decided:
    """A committed sequence number: its digest, commit certificate and batch (if held)."""

    digest: bytes
    commits: tuple[Signed, ...]
    batch: bytes | None


class ReplicaState:
    """One replica's view, log, certificates, checkpoints, requests and keys."""

    def __init__(self, name: str, quorum: Quorum, verifier: Verifier, log: ReplicaLog,
                 client: LedgerClient, rng: random.Random, config: PbftConfig,
                 operators: OperatorTable | None = None,
                 wall: Callable[[float], float] | None = None) -> None:
        # who we are and what we check against
        self.name = name
        #: the driver's ``now`` -> wall-clock seconds since the epoch, for batch times
        #: (consensus.pbft.batch_time); the identity where ``now`` is wall time
        self.wall: Callable[[float], float] = wall if wall is not None else _same
        self.q = quorum
        #: who may sign operator requests, for the ledger's checks (the federation file)
        self.operators = operators
        self.verifier = verifier
        self.cfg = config
        self.rng = rng
        self.log = log
        self.client = client
        self.evidence = EvidenceBook()
        self.genesis = Ledger(quorum.members).state_digest()
        self.metrics: dict[str, int] = {}
        # the view
        self.view = 0
        self.active = True
        self.backoff = 0
        self.nv_timer = False
        self.view_changes: dict[str, ValidViewChange] = {}
        #: the NEW-VIEW that brought this replica into its view (None in view 0)
        self.new_view_msg: Envelope | None = None
        # the log and its certificates
        self.low = 0  # h, the stable checkpoint
        self.stable_proof: tuple[Signed, ...] = ()
        self.ledger = Ledger(quorum.members, operators)
        self.stable_snapshot = self.ledger.snapshot()
        self.last_exec = 0
        self.next_seq = 1
        self.slots: dict[int, Slot] = {}
        self.decided: dict[int, Decided] = {}
        self.prepared_certs: dict[int, tuple[int, PreparedCert]] = {}
        self.batches: dict[bytes, bytes] = {NULL_DIGEST: NULL_BATCH}
        #: digest -> a batch checked at pre-prepare (decoded), until it executes
        self.decoded: dict[bytes, Batch] = {}
        self.snapshots: dict[int, tuple[bytes, bytes]] = {}
        self.checkpoint_votes: dict[int, dict[str, tuple[bytes, Signed]]] = {}
        #: when a batch last executed here (see the STATUS timer's relays)
        self.progress_at = 0.0
        #: a batch executed during the current step (the replica then proposes again)
        self.progressed = False
        # requests
        #: (client, request id) -> (signed request, arrival time): received, not executed
        self.pending: dict[tuple[str, int], tuple[Signed, float]] = {}
        self.pending_of: dict[str, int] = {}
        self.proposed: dict[tuple[str, int], int] = {}
        self.request_timer = False
        #: our own pending requests already relayed to every replica (once each; the
        #: client's retransmission repeats them, see ordering.relay_own_pending)
        self.relayed: dict[tuple[str, int], None] = {}
        #: pending requests handed to the primary, and in which view (once per view)
        self.forwarded: dict[tuple[str, int], int] = {}
        # peers, retransmission and state transfer
        #: peers whose link the driver reported down (PeerDown, no PeerUp since)
        self.unreachable: dict[str, None] = {}
        self.fetching: dict[bytes, float] = {}
        self.transfer_until = 0.0
        self.idle_status_at = 0.0
        #: peer -> the height its last STATUS claimed
        self.ahead: dict[str, int] = {}
        self.served: dict[str, float] = {}
        #: a chunked snapshot being fetched (consensus.pbft.transfer), or None
        self.chunked: ChunkTransfer | None = None
        #: a proven checkpoint whose ledger the driver is rebuilding (offload_restore)
        self.restoring: PendingRestore | None = None
        #: peer -> (start of its current status interval, chunks served to it in it)
        self.chunks_served: dict[str, tuple[float, int]] = {}
        #: the stable checkpoint before the current one and its snapshot: a peer half way
        #: through fetching its chunks when the checkpoint moved on finishes from it
        self.prev_stable: tuple[int, bytes] = (-1, b"")
        #: (seq, chunk hashes) of the stable snapshot, computed when first served
        self.stable_hashes: tuple[int, tuple[bytes, ...]] = (-1, ())

    @property
    def primary(self) -> str:
        return self.q.primary(self.view)

    @property
    def is_primary(self) -> bool:
        return self.primary == self.name

    @property
    def timeout(self) -> float:
        return self.cfg.view_timeout * (2 ** min(self.backoff, self.cfg.max_backoff))

    def count(self, metric: str, by: int = 1) -> None:
        self.metrics[metric] = self.metrics.get(metric, 0) + by

    def others(self) -> list[str]:
        return [m for m in self.q.members if m != self.name]

    def in_window(self, seq: int) -> bool:
        return self.low < seq <= self.low + self.cfg.window

    def in_flight(self) -> int:
        return max(0, self.next_seq - 1 - self.last_exec)

    def slot(self, seq: int) -> Slot:
        slot = self.slots.get(seq)
        if slot is None:
            slot = self.slots[seq] = Slot(seq)
        return slot

    def add_pending(self, key: tuple[str, int], signed: Signed, now: float) -> None:
        self.pending[key] = (signed, now)
        self.pending_of[key[0]] = self.pending_of.get(key[0], 0) + 1

    def drop_pending(self, key: tuple[str, int]) -> None:
        self.relayed.pop(key, None)
        self.forwarded.pop(key, None)
        if self.pending.pop(key, None) is not None:
            left = self.pending_of[key[0]] - 1
            if left:
                self.pending_of[key[0]] = left
            else:
                del self.pending_of[key[0]]


def _same(now: float) -> float:
    return now
