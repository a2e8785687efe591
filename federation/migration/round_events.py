"""The vocabulary of the rounds core (:mod:`federation.migration.rounds`): what its host
feeds it and what it asks of its host, beyond :mod:`mesh.core`'s events and actions.

Three parties talk to the core:

- the migration sessions: their :class:`~federation.migration.vocabulary.SendRound` and
  :class:`~federation.migration.vocabulary.CancelRound` come in as events; the core's
  :class:`ToSession` hands a session :class:`~federation.migration.vocabulary.RoundSent`,
  :class:`~federation.migration.vocabulary.TransferProgress` or
  :class:`~federation.migration.vocabulary.ActionFailed`. The host also says when a
  target's incoming images are prepared (:class:`IncomingReady`) and when a migration
  ended here (:class:`MigrationOver`);
- the VM backend, through :class:`federation.vms.actions.VmActions` (node and simulator
  alike): the page actions (:class:`PlanRound`, :class:`ReadChunk`, :class:`WriteChunk`,
  :class:`CountDirty`, :class:`CloseRound`) and their replies;
- the v3 data plane (HDE over AMST; trio in a node, :mod:`federation.dataplane`): the
  ``V3*`` actions say what to do with a round's transfer, its reports say what happened.

Every event and action names its migration; a reply names its round too, so one that
arrives after its round ended is recognised and dropped.
"""

from __future__ import annotations

from typing import Any

import attrs

from federation.migration.vocabulary import RoundSent

__all__ = [
    "SessionView", "IncomingReady", "MigrationOver", "ToSession", "RoundReport",
    "PlanRound", "RoundPlanned", "ReadChunk", "ChunkRead", "WriteChunk", "ChunkWritten",
    "CountDirty", "DirtyCounted", "CloseRound", "RoundIoFailed", "PAGE_ACTIONS",
    "V3Prepare", "V3Preparing", "V3Prepared", "V3Transfer", "V3Moved", "V3Cut", "V3Resume",
    "V3Verified", "V3Failed", "V3Cancel", "V3StreamOpened", "V3RelayFallback", "V3Accept",
    "V3Accepted", "V3ReceiveFailed", "V3ChunkLanded", "V3ImageVerified", "V3Drop", "V3_ACTIONS",
]

Pages = tuple[tuple[str, tuple[int, ...]], ...]


@attrs.frozen
class SessionView:
    """What the rounds core needs to know of a migration session at this DC."""

    vm: str
    source: str
    target: str
    done: bool


# --------------------------------------------------------------------------- sessions


@attrs.frozen
class IncomingReady:
    """Target: the incoming images of ``migration_id`` are prepared (``error``: they could
    not be)."""

    migration_id: str
    error: str = ""


@attrs.frozen
class MigrationOver:
    """The migration ended here (committed, aborted, discarded): drop its round state."""

    migration_id: str


@attrs.frozen
class ToSession:
    """Hand ``event`` to the session of ``migration_id``."""

    migration_id: str
    event: object


@attrs.frozen
class RoundReport:
    """Source: a round ended, delivered (``sent``) or failed (``error``); for the host's
    log and its link-bandwidth estimate. ``figures`` are the data plane's own numbers."""

    migration_id: str
    round: int
    version: int
    target: str
    sent: RoundSent | None
    error: str = ""
    figures: dict[str, Any] = attrs.field(factory=dict)


# --------------------------------------------------------------------------- pages


@attrs.frozen
class PlanRound:
    """Source: open a new dirty generation of ``vm`` and answer :class:`RoundPlanned` with
    the pages the round sends: every page (``since`` None) or those written since the
    generation ``since``; open the images for :class:`ReadChunk`."""

    migration_id: str
    vm: str
    round: int
    since: int | None


@attrs.frozen
class RoundPlanned:
    migration_id: str
    round: int
    mark: int
    #: image name -> sorted page numbers, images in name order
    pages: Pages


@attrs.frozen
class ReadChunk:
    """Source: read ``count`` pages from ``first`` of ``image`` (as opened by PlanRound)."""

    migration_id: str
    round: int
    seq: int
    image: str
    first: int
    count: int


@attrs.frozen
class ChunkRead:
    migration_id: str
    round: int
    seq: int
    data: bytes


@attrs.frozen
class WriteChunk:
    """Target: write ``data`` at ``page`` of the incoming ``image``; answer
    :class:`ChunkWritten` (``error``: why it was refused)."""

    peer: str
    migration_id: str
    round: int
    seq: int
    image: str
    page: int
    data: bytes


@attrs.frozen
class ChunkWritten:
    peer: str
    migration_id: str
    round: int
    seq: int
    nbytes: int
    error: str = ""


@attrs.frozen
class CountDirty:
    """Source: the round is delivered; count the pages written since ``mark`` (what the
    next round must send) and close the round's images."""

    migration_id: str
    vm: str
    round: int
    mark: int


@attrs.frozen
class DirtyCounted:
    migration_id: str
    round: int
    pages: int


@attrs.frozen
class CloseRound:
    """Source: the round ended without :class:`CountDirty`; close its images."""

    migration_id: str


@attrs.frozen
class RoundIoFailed:
    """A page action of a round could not be carried out (the round fails)."""

    migration_id: str
    round: int
    reason: str


PAGE_ACTIONS = (PlanRound, ReadChunk, WriteChunk, CountDirty, CloseRound)


# --------------------------------------------------------------------------- v3 source


@attrs.frozen
class V3Prepare:
    """Refresh the migration's shadow images from the live ones (a new dirty generation
    since ``since``; every page if None), index them, choose the chunk level on the
    first round; answer :class:`V3Prepared`."""

    migration_id: str
    vm: str
    round: int
    target: str
    since: int | None


@attrs.frozen
class V3Prepared:
    migration_id: str
    round: int
    mark: int
    #: logical pages the round covers
    covered: int
    images: tuple[str, ...]


@attrs.frozen
class V3Transfer:
    """The target is ready: run the round's HDE diff and its AMST transfer."""

    migration_id: str
    round: int


@attrs.frozen
class V3Preparing:
    """Reported while a round's preparation runs (round 1: the copy of every image into
    the shadow, its digests and index): pages prepared so far. It is progress: a large
    guest's first preparation on a loaded machine outlasts the sessions' stall bound."""

    migration_id: str
    round: int
    pages: int
    #: a sample of the guest's dirty rate (v3 round 1 of a VM tracked by content, early
    #: in the copy and once it is done): pages written, over their exposure in seconds
    dirtied: int = 0
    dirty_seconds: float = 0.0
    #: with a sample: the seconds the whole copy is expected to take (0: not known)
    preparation_s: float = 0.0


@attrs.frozen
class V3Moved:
    """Reported about once a second while a transfer runs: whether anything moved (a diff
    message, a chunk frame) since the last report, and the chunk bytes so far."""

    migration_id: str
    round: int
    moved: bool
    frame_bytes: int
    #: pages in the chunks encoded so far this round
    pages: int = 0


@attrs.frozen
class V3Cut:
    """Every AMST stream of the round failed; ``acked_bytes`` got through since the
    transfer last (re)started. The data plane waits for :class:`V3Resume` (or a cancel)."""

    migration_id: str
    round: int
    acked_bytes: int
    reason: str


@attrs.frozen
class V3Resume:
    migration_id: str
    round: int


@attrs.frozen
class V3Verified:
    """Every image of the round is verified by the target. ``wire_bytes``: the diff
    messages both ways and the chunk frames written (every copy)."""

    migration_id: str
    round: int
    wire_bytes: int
    figures: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class V3Failed:
    migration_id: str
    round: int
    reason: str


@attrs.frozen
class V3Cancel:
    """Stop the round's transfer of ``migration_id`` (its state stays until V3Drop)."""

    migration_id: str


@attrs.frozen
class V3StreamOpened:
    """A stream of the migration's transfer opened: direct (``via`` None) or relayed."""

    migration_id: str
    via: str | None


@attrs.frozen
class V3RelayFallback:
    """The relay ``via`` refused or could not be reached; the stream goes direct."""

    migration_id: str
    via: str


# --------------------------------------------------------------------------- v3 target


@attrs.frozen
class V3Accept:
    """Target: take round ``round`` from ``peer`` into the prepared incoming images
    (``images`` must be theirs); answer :class:`V3Accepted`."""

    peer: str
    migration_id: str
    round: int
    transfer: bytes
    images: tuple[str, ...]
    vm: str


@attrs.frozen
class V3Accepted:
    peer: str
    migration_id: str
    round: int
    error: str = ""


@attrs.frozen
class V3ReceiveFailed:
    """Target: the round cannot go on (a bad diff message, an image whose root differs)."""

    peer: str
    migration_id: str
    round: int
    reason: str


@attrs.frozen
class V3ChunkLanded:
    """Target: a verified chunk frame of ``nbytes`` arrived (keeps the session's stall
    timer quiet; its pages are counted when the image is verified)."""

    migration_id: str
    round: int
    nbytes: int


@attrs.frozen
class V3ImageVerified:
    """Target: an image's root matched; ``nbytes`` of its pages crossed the link."""

    migration_id: str
    round: int
    nbytes: int


@attrs.frozen
class V3Drop:
    """The migration ended here: drop its v3 state once no task of it runs."""

    migration_id: str


V3_ACTIONS = (V3Prepare, V3Transfer, V3Resume, V3Cancel, V3Accept, V3Drop)
