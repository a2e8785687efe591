"""What the simulator takes from an operator's federation file.

``dwcp sim run NAME --federation FILE`` runs a scenario with the DCs of ``FILE``
instead of ``n00 … nNN``: their names (so the number of nodes), their regions
(placed on the ``geo`` preset's RTT table, ``sim/geo.py``) and the ``[modes]``
thresholds the scenario's link-mode classifiers use. Keys and endpoints are
validated (the file must be one ``dwcp node`` would accept) but not used: the
simulator has its own keys and a simulated network.

A DC's ``region`` must name one of the preset's regions (case and spaces are
ignored: ``"West Europe"``, ``"westeurope"``); a DC without one is placed on the
regions in file order, as ``geo.assign_regions`` places ``n00 …``. A region the
preset does not know is an error that names the DC and lists the known ones:
the simulator cannot invent an RTT for it.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from mesh.links.modes import ModeLimits
from sim.geo import REGIONS

__all__ = ["FederationProfile", "ProfileError", "load_profile", "node_count"]


class ProfileError(Exception):
    """A federation file the simulator cannot use; the message names the file and field."""


@attrs.frozen
class FederationProfile:
    path: str
    names: tuple[str, ...]
    regions: dict[str, str]
    modes: ModeLimits


def _region_key(text: str) -> str:
    return "".join(text.lower().split())


_BY_KEY = {_region_key(r): r for r in REGIONS}


def load_profile(path: str) -> FederationProfile:
    """Load ``path`` with the node's own parser and place its DCs on the geo preset."""
    from federation import config

    try:
        fed = config.load(Path(path))
    except config.ConfigError as exc:
        raise ProfileError(str(exc)) from None
    names = tuple(dc.name for dc in fed.dcs)
    regions: dict[str, str] = {}
    for i, dc in enumerate(fed.dcs):
        if not dc.region:
            regions[dc.name] = REGIONS[i % len(REGIONS)]
            continue
        known = _BY_KEY.get(_region_key(dc.region))
        if known is None:
            raise ProfileError(f"{path}: dc[{i}].region: {dc.region!r} ({dc.name}) is not a "
                               f"region of the simulator's geo preset; known: "
                               f"{', '.join(REGIONS)}")
        regions[dc.name] = known
    return FederationProfile(str(path), names, regions, fed.modes)


def node_count(profile: FederationProfile, nodes: int | None) -> int:
    """The run's size: the file's DCs; a ``--nodes`` that disagrees is an error."""
    if nodes is not None and nodes != len(profile.names):
        raise ProfileError(f"--nodes {nodes} contradicts --federation {profile.path}, "
                           f"which has {len(profile.names)} DCs")
    return len(profile.names)
