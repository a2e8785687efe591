"""Which transfer protocol version a migration uses (DESIGN.md, "Protocol versions and
rollout").

v1 is the baseline transfer: one stream, no delta, no compression. v3 is HDE
over AMST (the versions and their sets: :mod:`mesh.versions`). A transfer uses the
highest version that both DCs offered in their channel handshake *and* the rollout
policy allows. The policy lives in the
ledger (``SetPolicy``), so every DC computes the same answer for a VM:

- the kill switch forbids v3 everywhere, and an excluded DC (node-level exclusion)
  never sends or receives v3, whatever the targets say;
- a VM on the target list, or a source or target DC on the DC list or in a region on
  the region list, gets v3;
- otherwise a stable hash of the VM id modulo 100 is compared with the v3
  percentage, so raising the percentage only ever adds VMs to v3 and a VM never
  flips back and forth as the percentage grows.

The rule itself is :func:`consensus.ledger.v3_allowed` — one definition, next to
the state it reads. The ledger also rolls back on its own: a policy names thresholds
(the abort rate of v3 migrations, verification failures) and the commit or abort that
crosses one turns the kill switch on, with the reason, at every replica at the same
entry (:func:`consensus.ledger_commands.rollout_after_end`). Rolling back is a policy
change: a migration that learns of it mid-way sends its remaining rounds with v1
(:func:`round_version`); rounds already sent stay valid, since every round's pages
are absolute content.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

from consensus.ledger import SetPolicy, v3_allowed
from mesh import versions
from mesh.versions import KNOWN as KNOWN_VERSIONS
from mesh.versions import V1, V3

__all__ = [
    "V1",
    "V3",
    "KNOWN_VERSIONS",
    "RolloutError",
    "rollout_bucket",
    "choose_version",
    "round_version",
    "DEFAULT_POLICY",
]

#: The ledger's policy before any SetPolicy: v3 for nobody, no kill switch. A new
#: federation opts in explicitly (a percentage or target lists).
DEFAULT_POLICY = SetPolicy(0, (), (), False)


class RolloutError(Exception):
    """No transfer version both DCs support."""


def rollout_bucket(vm: str) -> int:
    """The VM's stable bucket in 0..99 (the same hash :func:`v3_allowed` uses)."""
    return int.from_bytes(hashlib.sha256(vm.encode()).digest()[:8], "big") % 100


def choose_version(
    policy: SetPolicy,
    vm: str,
    source: str,
    target: str,
    local: Iterable[int],
    peer: Iterable[int],
    regions: Mapping[str, str] | None = None,
) -> int:
    """The version for a new transfer of ``vm`` from ``source`` to ``target``, given the
    versions this DC and its peer offered and the DCs' regions (the federation file's).
    Raises :class:`RolloutError` if none is common."""
    common = versions.common(local, peer)
    if not common:
        raise RolloutError(
            f"VM {vm!r}: {source} offers {sorted(set(local))}, {target} offers "
            f"{sorted(set(peer))}: no common transfer version"
        )
    if V3 in common and v3_allowed(policy, vm, source, target, regions):
        return V3
    if V1 in common:
        return V1
    raise RolloutError(f"VM {vm!r}: only v3 is common and the rollout policy forbids it")


def round_version(
    current: int, common: Iterable[int], policy: SetPolicy, vm: str, source: str, target: str,
    regions: Mapping[str, str] | None = None,
) -> int:
    """The version for the next round of a transfer that used ``current`` so far. A v3
    transfer falls back to v1 when the policy withdrew v3 and both DCs speak v1; else it
    finishes with v3 (DESIGN.md: in-flight v3 transfers "finish or fall back"). It never
    upgrades mid-way: the target prepared for what was chosen at the start."""
    if current == V3 and V1 in set(common) and not v3_allowed(policy, vm, source, target,
                                                               regions):
        return V1
    return current
