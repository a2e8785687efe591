"""The vocabulary of SWIM membership (mesh.gossip.membership is the state machine): member
states, the configuration, whose every constant names its source (SWIM, Lifeguard,
HashiCorp memberlist's ``DefaultLANConfig``/``DefaultWANConfig``), a member's record, and
the link-state table that rides on the membership's dissemination.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Protocol

import attrs

from mesh.gossip.control_msgs import LinkEntry, OriginDigest, Signed

__all__ = ["State", "SwimConfig", "Member", "LinkSync", "MembershipError"]


class MembershipError(Exception):
    """A message that breaks the protocol (names the peer and what it did)."""


class State(enum.IntEnum):
    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


@attrs.frozen
class SwimConfig:
    #: memberlist DefaultLANConfig ProbeInterval = 1 s (WAN: 5 s). The WAN value gives
    #: the ~40 s detection issue 4 calls too slow; 1 s periods cost ~100 bytes/s per DC.
    probe_interval: float = 1.0
    #: RFC 6298 §2.1: before any RTT sample the retransmission timeout is 1 s.
    probe_timeout_initial: float = 1.0
    #: Linux TCP_RTO_MIN (200 ms): the floor of an RTT-derived timeout.
    probe_timeout_min: float = 0.2
    #: memberlist WAN ProbeTimeout = 3 s: the ceiling of an RTT-derived timeout.
    probe_timeout_max: float = 3.0
    #: memberlist IndirectChecks = 3 (LAN and WAN); SWIM's k.
    indirect_checks: int = 3
    #: memberlist SuspicionMult = 4 (LAN; WAN 6): min timeout = mult * log10(N) * period.
    suspicion_mult: int = 4
    #: memberlist SuspicionMaxTimeoutMult = 6 (LAN and WAN); Lifeguard's beta.
    suspicion_max_mult: int = 6
    #: memberlist RetransmitMult = 4 (LAN; WAN 3): lambda in lambda * log(N+1).
    retransmit_mult: int = 4
    #: Floor of the retransmit limit. Measured: with memberlist's 4 sends per node at
    #: N = 6, ~0.5 % of (update, node) pairs waited for anti-entropy (a 15 s tail in
    #: link-cut); with 8 (the formula's value at N = 16) one pair in ~20,000 still did
    #: in crash-one (seed 11: 10 s, over the issue's 3 s bound); 12 closes that tail for
    #: ~3 kbit/s more per DC.
    min_transmits: int = 12
    #: Peers a starting DC asks for their whole state (members and link table); the
    #: others get only its own statement. memberlist's Join pushes/pulls with every
    #: address it is given; here every peer's reply carried the whole link table, and a
    #: restart at N = 64 cost 63 copies of 4,032 signed entries (~25 MB). Three answers
    #: survive two of them being down; anti-entropy and gossip fill in the rest.
    join_syncs: int = 3
    #: Lambda of the link entries' retransmit limit, link_transmit_mult *
    #: ceil(log10(N + 1)): 4 sends per DC at N = 16 and 64, 6 at N = 128. A DC passes a
    #: link entry on only to peers not known to hold it, and link-state anti-entropy
    #: (link_sync_interval) repairs the pairs gossip misses within seconds, so links do
    #: not need the member updates' floor of 12: each send of a signed entry (~100 bytes)
    #: is paid by every DC that passes it on (at N = 64, with 12 sends per DC and entry,
    #: 576 kbit/s of control traffic per DC, docs/BENCHMARKS.md).
    link_transmit_mult: int = 2
    #: Link entries a DC keeps queued for gossip, per member of the federation: beyond
    #: link_queue_mult * N the oldest leave the queue (Serf prunes memberlist's
    #: broadcast queue the same way, past MaxQueueDepth) and reach the DCs that lack
    #: them by link-state anti-entropy. When a federation starts, every DC publishes an
    #: entry per peer (4,032 at N = 64) and passes each on link_transmits times: measured
    #: at N = 64 (crash-one seed 1), that backlog was still draining 25 s after the
    #: warm-up, ~180 kbit/s per DC. A crash or a cut publishes ~N entries, well inside.
    link_queue_mult: int = 4
    #: memberlist DefaultLANConfig GossipInterval = 200 ms, GossipNodes = 3.
    gossip_interval: float = 0.2
    gossip_nodes: int = 3
    #: memberlist GossipToTheDeadTime = 30 s (LAN): the dead still get gossip this long.
    gossip_to_dead: float = 30.0
    #: memberlist PushPullInterval = 30 s (LAN; WAN 60 s).
    push_pull_interval: float = 30.0
    #: Link-state anti-entropy (not in memberlist, whose push/pull carries only the
    #: membership): every this often a DC sends a random member its link-table digest
    #: alone and gets back only the entries it lacks (mesh.links.estimates). Gossip
    #: spreads a link entry a bounded number of times (see link_transmits), so the
    #: (entry, DC) pairs it misses wait for this round, not for the push/pull: issue 18
    #: bounds update convergence p99.9 at 5 s at N = 64. A digest is ~18 bytes an origin
    #: (1,170 bytes for 64 origins), so at N = 64 this costs ~5 kbit/s per DC.
    link_sync_interval: float = 2.0
    #: memberlist AwarenessMaxMultiplier = 8 (Lifeguard's local health multiplier cap).
    awareness_max: int = 8
    #: Direct evidence outranks stale gossip this long: a little over two periods of the
    #: link probes (mesh.links.estimates.LinkConfig.ping_interval = 1.5 s), so one lost probe
    #: does not void it.
    evidence_window: float = 4.0
    #: At most one reconnect sync to the same dead member this often (Serf's
    #: ReconnectInterval is 30 s; a direct message is evidence, so we act sooner).
    reconnect_interval: float = 5.0


@attrs.define
class Member:
    name: str
    incarnation: int = 0
    state: State = State.ALIVE
    since: float = 0.0
    #: Lifeguard suspicion: who independently suspected this incarnation, and when it began
    confirmations: list[str] = attrs.field(factory=list)
    suspected_at: float = 0.0
    probed_in_suspicion: bool = False
    #: the member's own latest statement (ALIVE or LEFT at its incarnation), signed by it
    said: Signed | None = None
    #: the accusation behind a SUSPECT or DEAD state, signed by its accuser
    charge: Signed | None = None

    def statements(self) -> tuple[Signed, ...]:
        """What an anti-entropy sync says of this member: its own latest statement, then
        the accusation it stands under (if any), each as its speaker signed it."""
        out: list[Signed] = [] if self.said is None else [self.said]
        if self.charge is not None and self.state in (State.SUSPECT, State.DEAD):
            out.append(self.charge)
        return tuple(out)


class LinkSync(Protocol):
    """The link-state table that rides on membership dissemination (mesh.links.estimates)."""

    def digest(self) -> tuple[OriginDigest, ...]: ...

    def entries_newer_than(self, digest: Sequence[OriginDigest]) -> list[Signed]: ...

    def lacks(self, digest: Sequence[OriginDigest]) -> bool:
        """Whether the holder of ``digest`` may hold entries this table lacks."""
        ...

    def merge(
        self, now: float, peer: str, statements: Sequence[Signed]
    ) -> list[tuple[LinkEntry, Signed]]:
        """Check and adopt the signed link entries ``peer`` passed on; returns those
        adopted (to pass on in turn)."""
        ...
