"""Live migration of one VM: the sans-I/O session, its vocabulary and its limits.

DESIGN.md, "The ledger and a migration"::

    PLANNED -> BEGUN (ledger) -> PRECOPY rounds -> FENCED -> FINAL round
            -> VERIFYING/VERIFIED -> COMMITTED (ledger, epoch+1) | ABORTED (ledger)

Two sessions run one migration: the *source* (:mod:`federation.migration.source`)
drives it — begin in the ledger on an operator's signed request, pre-copy rounds,
fence, the fenced root announced in the ledger, final round — and the *target*
(:mod:`federation.migration.target`) prepares the incoming copy, checks after the
final round that what it wrote has the root the source announced, and commits.
Both obey one rule: **only the ledger decides**. Each side acts on what the
ledger recorded (:class:`LedgerBegun`, :class:`LedgerRootAnnounced`,
:class:`LedgerCommitted`, :class:`LedgerAborted`, fed by the node from its
ledger replica), never on what the other side said. So the source un-fences
only after an abort is in the ledger, and the target starts the VM only after
the commit is, with the new epoch. Who may write what is the ledger's rule
(consensus.ledger): the source begins, announces and aborts; the target
commits, and gives up by asking the source to abort (:class:`MigrationDecline`)
— its own abort counts only once the migration's deadline has passed.

Like every core here, a session is ``handle(now, event) -> list[action]``.
Its inputs are this module's events plus :mod:`mesh.core`'s ``Received``,
``TimerFired``, ``PeerUp`` and ``PeerDown``; its outputs are this module's
actions plus ``Send``, ``SetTimer``, ``CancelTimer``, ``Persist`` and ``Notify``
(``"migration.progress"`` with a :class:`Progress`, ``"migration.done"`` with an
:class:`Outcome`). A session persists a :class:`SessionRecord` (synced) before
every action that the record must explain after a crash; :func:`restore`
rebuilds a session from that record and the ledger's word on the migration,
and the rebuilt session resumes or aborts — it never loses a migration.
"""

from __future__ import annotations

import datetime
import enum
from typing import Any

import attrs

from consensus.authz import Authorization
from consensus.ledger import (
    AbortMigration,
    AnnounceRoot,
    BeginMigration,
    CommitMigration,
    SetPolicy,
)
from mesh import core, wire
from mesh.links.modes import Mode
from mesh.wire import U64, Bool, Bytes, Float, ListOf, Optional, Struct, Text, field

__all__ = [
    "MigrationError",
    "Phase",
    "Role",
    "TERMINAL",
    "PrecopyLimits",
    "LIMITS",
    "limits_for",
    "RETRANSMIT",
    "PEER_DOWN_GRACE",
    "STALL_TIMEOUT",
    "LEDGER_RESUBMIT",
    "VERIFY_RATE",
    "FENCE_SLACK",
    "LedgerBegun",
    "LedgerRootAnnounced",
    "LedgerCommitted",
    "LedgerAborted",
    "LedgerRefused",
    "PolicyChanged",
    "CancelRequested",
    "CANCEL_REASON",
    "abort_cause",
    "clock_text",
    "RoundSent",
    "TransferProgress",
    "SourceFenced",
    "TargetVerified",
    "ActionFailed",
    "SubmitLedger",
    "SendRound",
    "CancelRound",
    "Fence",
    "Throttle",
    "Throttled",
    "Unfence",
    "Retire",
    "PrepareIncoming",
    "Verify",
    "StartAtTarget",
    "LoadDevice",
    "DiscardIncoming",
    "MigrationAction",
    "Progress",
    "Outcome",
    "ImageSize",
    "MAX_MACHINE_SPEC",
    "MigrationOffer",
    "MigrationReady",
    "MigrationRoundDone",
    "MigrationDecline",
    "SessionRecord",
    "record_key",
    "timer_key",
]


class MigrationError(Exception):
    """A session was driven against its rules (a driver bug), or a record cannot be used."""


class Phase(enum.Enum):
    PLANNED = "planned"  # source: begin submitted, not yet in the ledger
    BEGUN = "begun"  # in the ledger; the target is being prepared
    PRECOPY = "precopy"  # rounds while the VM runs at the source
    FENCED = "fenced"  # source: fence requested; the final round waits for it
    FINAL = "final"  # source: final round in flight; target: verifying the root
    VERIFYING = "verifying"  # source: final round delivered, waiting for the ledger
    VERIFIED = "verified"  # target: root matched, commit submitted
    COMMITTED = "committed"
    ABORTING = "aborting"  # abort submitted, waiting for the ledger
    ABORTED = "aborted"
    REFUSED = "refused"  # source: the ledger refused the begin; nothing happened


TERMINAL = frozenset({Phase.COMMITTED, Phase.ABORTED, Phase.REFUSED})


class Role(enum.Enum):
    SOURCE = "source"
    TARGET = "target"


# --------------------------------------------------------------------------- limits


@attrs.frozen
class PrecopyLimits:
    """Pre-copy stops when the final round's estimated time is under ``downtime`` or when
    the final round would be round ``max_rounds`` (DESIGN.md, "The ledger and a migration")."""

    max_rounds: int
    downtime: float  # seconds


#: DESIGN.md's targets per link mode. The datacenter target is of the order of QEMU's
#: default ``downtime-limit`` (300 ms, migration/options.c), raised to 500 ms for the
#: root check and the ledger commit a DWCP cut-over adds. QEMU iterates without a round
#: limit (it throttles the guest instead, "auto-converge"); Xen's pre-copy (Clark et al.,
#: "Live Migration of Virtual Machines", NSDI 2005, §5) stops after a bounded number of
#: iterations (29 in xc_domain_save) when the writable working set will not shrink. Our
#: bounds are smaller because every round crosses a WAN: slower links get more rounds
#: and a downtime a user of that link already tolerates.
LIMITS: dict[Mode, PrecopyLimits] = {
    Mode.DATACENTER: PrecopyLimits(max_rounds=5, downtime=0.5),
    Mode.HYBRID: PrecopyLimits(max_rounds=7, downtime=5.0),
    Mode.INTERNET: PrecopyLimits(max_rounds=10, downtime=90.0),
}


def limits_for(mode: Mode | None) -> PrecopyLimits:
    """Limits of the bulk route's mode; an unclassified link is treated as internet."""
    return LIMITS[mode if mode is not None else Mode.INTERNET]


#: Control messages (offer, final round done) are re-sent this often until answered:
#: BFT-SMaRt's request timeout (2 s), as for ledger requests (consensus.pbft.client.RETRANSMIT).
RETRANSMIT = 2.0
#: A peer down this long aborts the migration: libvirt declares a migration peer dead
#: after keepalive_interval (5 s) x keepalive_count (5) unanswered probes (libvirtd.conf).
PEER_DOWN_GRACE = 30.0
#: No byte of progress for this long aborts the migration; same basis as PEER_DOWN_GRACE:
#: a healthy transfer acknowledges chunks every round trip, even on an internet link.
STALL_TIMEOUT = 30.0
#: A ledger command with no recorded outcome after this long is submitted again (a new
#: request; a begin is idempotent by its operator request id, an announcement by its
#: root, commit and abort by the migration's state). Five times the
#: ledger client's own retransmission period (consensus.pbft.client.RETRANSMIT, 2 s).
LEDGER_RESUBMIT = 10.0
#: Bytes per second the target hashes while verifying the root: SHA-256 over 1 MiB blocks
#: on one thread of the reference machine (mesh/hde/image.py, measured 1.4 GB/s).
VERIFY_RATE = 1.4e9
#: A fenced VM waits at most FENCE_SLACK x (estimated final round + verification) +
#: PEER_DOWN_GRACE for the commit, then the source aborts and resumes it. The estimate
#: uses the last round's throughput; 4x rides out a link that drops to a quarter.
FENCE_SLACK = 4.0


# --------------------------------------------------------------------------- events


@attrs.frozen
class LedgerBegun:
    """The ledger recorded the begin of ``migration_id`` at VM epoch ``epoch``."""

    migration_id: str
    epoch: int


@attrs.frozen
class LedgerRootAnnounced:
    """The ledger recorded the source's announcement: its fenced images have ``root``.
    The target commits only with this root (consensus.ledger)."""

    migration_id: str
    root: bytes


@attrs.frozen
class LedgerCommitted:
    """The ledger recorded the commit: the target owns the VM at ``epoch`` (old + 1)."""

    migration_id: str
    epoch: int
    root: bytes


@attrs.frozen
class LedgerAborted:
    migration_id: str


@attrs.frozen
class LedgerRefused:
    """The ledger rejected ``command`` (a reply to a :class:`SubmitLedger` of this session)."""

    command: Any
    reason: str


@attrs.frozen
class PolicyChanged:
    """The ledger's rollout policy changed (a v3 rollback applies to the next round)."""

    policy: SetPolicy


#: The abort reason of an operator's cancel (``dwcp cancel``, ``POST
#: /api/migrations/ID/cancel``), as the ledger-abort outcome and the runbook name it.
CANCEL_REASON = "cancelled by operator"


#: The kinds of cause an abort reason names (consensus.ledger_commands.ABORT_CAUSES), by
#: the words that open or mark each reason of docs/runbook-migration-abort.md; the first
#: match wins. The rollout's automatic rollback counts "verification" and every cause but
#: "operator".
_CAUSE_MARKS = (
    ("operator", (CANCEL_REASON,)),
    ("verification", ("does not match the root", "root differs", "HDE image",
                      "sent a bad HDE message")),
    ("restart", ("restarted in",)),
    ("peer", ("unreachable since", "was down for", "link to", "AMST to", "control link")),
    ("stall", ("no progress", "no acknowledgement", "did not get ready", "stayed fenced")),
    ("vm", ("failed: VM", "Fence failed", "Verify failed", "PrepareIncoming failed",
            "refused a chunk", "refused round")),
)


def abort_cause(reason: str) -> str:
    """The kind of cause of an abort ``reason`` (see _CAUSE_MARKS), "other" if none."""
    for cause, marks in _CAUSE_MARKS:
        if any(mark in reason for mark in marks):
            return cause
    return "other"


def clock_text(t: float) -> str:
    """``t`` (seconds since the epoch; the simulator's start is 0) as UTC HH:MM:SS, the
    way an operator compares it with logs and dashboards."""
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%H:%M:%S")


@attrs.frozen
class CancelRequested:
    """Source: an operator asked to abort this migration. It takes the ordinary abort path
    (an abort submitted to the ledger; the VM resumes at the source once the ledger has
    it). Before the ledger recorded the begin, the wish is kept and acted on when it does;
    once the final round is delivered, the target's commit may still win the race, which
    the ledger settles. Only the source session takes it (the node forwards a cancel
    asked of any other DC to the source)."""

    reason: str = CANCEL_REASON


@attrs.frozen
class RoundSent:
    """Source: round ``round`` is acknowledged by the target. ``bytes`` is the logical page
    bytes the round covered, ``wire_bytes`` what crossed the link; ``dirty_pages`` were
    written while it ran (what the next round must send)."""

    round: int
    pages: int
    bytes: int
    wire_bytes: int
    seconds: float
    dirty_pages: int
    #: of ``seconds``, the time the pages took to move once the round was prepared (v3:
    #: from the target's word to its verdict), where the data plane measured it: what a
    #: final round of a stopped guest costs per page (it prepares nothing but a scan),
    #: so what pre-copy's estimate of the final round goes by (None: ``seconds``)
    move_seconds: float | None = None


@attrs.frozen
class TransferProgress:
    """What moved so far in the current round (either side); keeps the stall timer quiet.
    ``bytes`` and ``pages``: page content (logical); ``wire_bytes``: on the wire."""

    round: int
    bytes: int
    pages: int = 0
    wire_bytes: int = 0
    #: pages the round's preparation went over so far (v3 round 1: the shadow's copy,
    #: digests and index), before anything moves
    prepared: int = 0
    #: a sample of the guest's dirty rate taken during the preparation (v3 round 1 of a
    #: VM tracked by content): pages written meanwhile, over the seconds they had
    dirtied: int = 0
    dirty_seconds: float = 0.0
    #: with a sample: the seconds the whole preparation is expected to take (0: unknown)
    preparation_s: float = 0.0


@attrs.frozen
class SourceFenced:
    """Source: the VM is stopped and durable; ``root`` covers its images as fenced."""

    root: bytes


@attrs.frozen
class TargetVerified:
    """Target: the root recomputed over what the target wrote."""

    root: bytes


@attrs.frozen
class ActionFailed:
    """The driver could not carry out an action of this session (names which and why)."""

    action: str
    reason: str


# --------------------------------------------------------------------------- actions


@attrs.frozen
class SubmitLedger:
    """Submit ``command`` (a consensus.ledger command) through the node's ledger client."""

    command: BeginMigration | AnnounceRoot | CommitMigration | AbortMigration


@attrs.frozen
class SendRound:
    """Source: send a round over the bulk route. Round 1 (``dirty=False``) sends the diff
    against the target's store (v3) or every page (v1); round k sends the pages dirtied
    since round k-1 started. The driver opens a new dirty generation as it starts."""

    migration_id: str
    vm: str
    round: int
    dirty: bool
    final: bool
    version: int


@attrs.frozen
class CancelRound:
    migration_id: str


@attrs.frozen
class Fence:
    vm: str
    migration_id: str


@attrs.frozen
class Throttle:
    """Source: run the VM's guest only ``100 - percent`` % of the time until its fence, an
    abort or the commit (auto-converge, federation.migration.precopy); 0 lifts it. Answered
    with :class:`Throttled`."""

    vm: str
    migration_id: str
    percent: int


@attrs.frozen
class Throttled:
    """Source: the throttle the backend put on the VM after a :class:`Throttle` (0 where
    it cannot throttle one: an image VM, a guest not running)."""

    percent: int


@attrs.frozen
class Unfence:
    """Source: the ledger aborted; lift this migration's fence (if any) and run the VM."""

    vm: str
    migration_id: str


@attrs.frozen
class Retire:
    """Source: the ledger committed; this copy never runs again here."""

    vm: str
    migration_id: str


@attrs.frozen
class PrepareIncoming:
    vm: str
    migration_id: str
    layout: tuple[tuple[str, int], ...]
    version: int
    #: the source's machine spec (VmBackend.machine_spec; b"": the images are the VM)
    machine: bytes = b""


@attrs.frozen
class Verify:
    """Target: recompute the root of the incoming images; answer with TargetVerified."""

    vm: str
    migration_id: str


@attrs.frozen
class StartAtTarget:
    vm: str
    migration_id: str
    epoch: int


@attrs.frozen
class LoadDevice:
    """Target: the root matched and the commit is on its way through the ledger; load what
    the hypervisor needs besides the images (qemu: the device state into the waiting
    ``-incoming`` QEMU) now, so only ``cont`` waits for the commit. The guest does not run
    before StartAtTarget; an abort discards the loaded copy like any incoming one."""

    vm: str
    migration_id: str


@attrs.frozen
class DiscardIncoming:
    vm: str
    migration_id: str


@attrs.frozen
class Progress:
    migration_id: str
    vm: str
    role: str
    phase: str
    round: int
    bytes_sent: int
    wire_bytes: int
    dirty_rate: float  # pages per second during the last round
    throughput: float  # logical bytes per second of the last round (or of this one so far)
    eta: float  # seconds until the cut-over, estimated (inf: not measured yet)
    pages: int = 0  # pages sent so far (bytes_sent / 4 KiB), this round's included
    prepared: int = 0  # pages the current round's preparation went over (v3 round 1)


@attrs.frozen
class Outcome:
    migration_id: str
    vm: str
    role: str
    outcome: str  # "committed" | "aborted" | "refused"
    reason: str
    rounds: int
    bytes_sent: int
    wire_bytes: int
    fenced_seconds: float  # source: from the fence to the ledger's word


#: Everything a migration session may return: its own actions and mesh.core's.
MigrationAction = (
    core.Action | SubmitLedger | SendRound | CancelRound | Fence | Throttle | Unfence | Retire
    | PrepareIncoming | Verify | StartAtTarget | LoadDevice | DiscardIncoming
)

# --------------------------------------------------------------------------- wire

_ID = Text(128)
#: A machine spec rides in the offer: a qemu VmSpec is a few hundred bytes of JSON.
MAX_MACHINE_SPEC = 8192
_VM = Text(128)
_DC = Text(64)


@wire.struct_type
class ImageSize:
    name: str = field(Text(16))
    pages: int = field(U64())


@wire.message("migration.offer")
class MigrationOffer:
    """Source -> target, re-sent until answered: what is coming and in which version."""

    migration_id: str = field(_ID)
    vm: str = field(_VM)
    source: str = field(_DC)
    target: str = field(_DC)
    epoch: int = field(U64())
    layout: tuple[ImageSize, ...] = field(ListOf(Struct(ImageSize), 64))
    version: int = field(U64(255))
    #: what the target needs besides the images to run the VM (the qemu backend's spec;
    #: b"" for the image backend); the target's backend checks it against its own policy
    machine: bytes = field(Bytes(MAX_MACHINE_SPEC), default=b"")


@wire.message("migration.ready")
class MigrationReady:
    migration_id: str = field(_ID)


@wire.message("migration.round-done")
class MigrationRoundDone:
    """Source -> target: round ``round`` is fully delivered; the final one carries the
    root of the fenced source (re-sent until the ledger decides)."""

    migration_id: str = field(_ID)
    round: int = field(U64(1000))
    final: bool = field(Bool())
    root: bytes = field(Bytes(64))


@wire.message("migration.decline")
class MigrationDecline:
    """Target -> source, re-sent until the ledger decides: the target gives up on the
    migration and asks the source to abort it (the ledger takes a target's own abort
    only after the migration's deadline, consensus.ledger.MIGRATION_DEADLINE)."""

    migration_id: str = field(_ID)
    reason: str = field(Text(256))


@wire.message("migration.record", max_size=16 * 1024)
class SessionRecord:
    """What a session persists; with the ledger's word it rebuilds the session."""

    migration_id: str = field(_ID)
    role: str = field(Text(8))
    me: str = field(_DC)
    vm: str = field(_VM)
    source: str = field(_DC)
    target: str = field(_DC)
    epoch: int = field(U64())
    phase: str = field(Text(16))
    round: int = field(U64(1000))
    version: int = field(U64(255))
    common: tuple[int, ...] = field(ListOf(U64(255), 16))
    layout: tuple[ImageSize, ...] = field(ListOf(Struct(ImageSize), 64))
    fenced: bool = field(Bool())
    final_sent: bool = field(Bool())
    root: bytes = field(Bytes(64))
    max_rounds: int = field(U64(1000))
    downtime: float = field(Float())
    reason: str = field(Text(256))
    bytes_sent: int = field(U64())
    wire_bytes: int = field(U64())
    #: source: the operator's signed request for this migration (the begin carries it)
    authorization: Authorization | None = field(Optional(Struct(Authorization)), default=None)


def record_key(migration_id: str) -> str:
    return f"migration/{migration_id}"


def timer_key(migration_id: str, what: str) -> tuple[str, str, str]:
    return ("migration", migration_id, what)
