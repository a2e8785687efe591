"""What the data plane of one DC has moved: the counters behind ``/metrics`` and the
per-migration figures of ``/api/status``, in one typed object.

The rounds core (:mod:`federation.migration.rounds`) owns it and is its only writer: it
sees every round end, every chunk a target writes or refuses, and hears from the v3
data plane of every chunk that landed, every image verified and every stream opened.
Readers (the node's status and metrics) take it read-only.
"""

from __future__ import annotations

import attrs

from federation.migration.rollout import KNOWN_VERSIONS
from federation.migration.vocabulary import RoundSent

__all__ = ["TransferCounters", "VersionCounts", "version_label"]


def version_label(version: int) -> str:
    """How status documents and metrics name a transfer version: ``"v1"``, ``"v3"``."""
    return f"v{version}"


@attrs.define
class VersionCounts:
    """Rounds delivered with one transfer version, as the source."""

    rounds: int = 0
    #: logical page bytes the rounds covered
    bytes: int = 0
    #: what crossed the links for them
    wire_bytes: int = 0


@attrs.define
class TransferCounters:
    #: as the source, per transfer version
    sent: dict[int, VersionCounts] = attrs.field(
        factory=lambda: {v: VersionCounts() for v in KNOWN_VERSIONS})
    rounds_failed: int = 0
    #: as the target: v1 chunks written and refused, v3 chunk frames that landed
    chunks_received: int = 0
    chunks_refused: int = 0
    #: page bytes written here as a target (v1: as chunks land; v3: per verified image)
    bytes_received: int = 0
    #: v3 chunk frames' bytes that landed here
    wire_bytes_received: int = 0
    #: v3 streams opened through a relay, and relays that refused (the stream went direct)
    relayed_streams: int = 0
    relay_fallbacks: int = 0
    #: migration id -> rounds delivered from here per version label ("v1", "v3")
    paths: dict[str, dict[str, int]] = attrs.field(factory=dict)
    #: migration id -> v3 streams opened from here, by the DC that relayed them
    #: ("direct" for none)
    streams: dict[str, dict[str, int]] = attrs.field(factory=dict)
    #: migration id -> page bytes written here as its target
    received: dict[str, int] = attrs.field(factory=dict)

    # ------------------------------------------------------------------ reading

    @property
    def rounds_sent(self) -> int:
        return sum(c.rounds for c in self.sent.values())

    @property
    def bytes_sent(self) -> int:
        return sum(c.bytes for c in self.sent.values())

    @property
    def wire_bytes_sent(self) -> int:
        return sum(c.wire_bytes for c in self.sent.values())

    def version(self, version: int) -> VersionCounts:
        return self.sent.get(version, VersionCounts())

    # ------------------------------------------------------------------ writing (the core)

    def round_sent(self, migration_id: str, version: int, sent: RoundSent) -> None:
        counts = self.sent.setdefault(version, VersionCounts())
        counts.rounds += 1
        counts.bytes += sent.bytes
        counts.wire_bytes += sent.wire_bytes
        path = self.paths.setdefault(migration_id, {})
        label = version_label(version)
        path[label] = path.get(label, 0) + 1

    def round_failed(self) -> None:
        self.rounds_failed += 1

    def pages_received(self, migration_id: str, nbytes: int) -> None:
        self.bytes_received += nbytes
        self.received[migration_id] = self.received.get(migration_id, 0) + nbytes

    def chunk_written(self, migration_id: str, nbytes: int) -> None:
        self.chunks_received += 1
        self.pages_received(migration_id, nbytes)

    def chunk_refused(self) -> None:
        self.chunks_refused += 1

    def frame_landed(self, nbytes: int) -> None:
        self.chunks_received += 1
        self.wire_bytes_received += nbytes

    def stream_opened(self, migration_id: str, via: str | None) -> None:
        if via is not None:
            self.relayed_streams += 1
        streams = self.streams.setdefault(migration_id, {})
        key = via if via is not None else "direct"
        streams[key] = streams.get(key, 0) + 1

    def relay_fell_back(self) -> None:
        self.relay_fallbacks += 1

    def forget(self, migration_ids: list[str]) -> None:
        """Drop the per-migration figures of ended migrations the node forgets (their
        totals stay in the counters above)."""
        for mid in migration_ids:
            self.paths.pop(mid, None)
            self.streams.pop(mid, None)
            self.received.pop(mid, None)
