"""The ``geo`` preset: inter-region round-trip times for up to 16 regions.

Source: Microsoft Learn, "Azure network round-trip latency statistics"
(https://learn.microsoft.com/azure/networking/azure-network-latency), the dataset
taken on 2026-07-30: P50 round-trip times in milliseconds over the 30 days ending
that day, measured by Azure's backbone probes at 1-minute intervals. Values below
are copied from the article's CSV table for 16 regions spread over five continents
(row = source region, column = destination; the table is not exactly symmetric).

A directed link ``a -> b`` gets a one-way latency of half the published RTT from
``a`` to ``b``, so a ping's simulated RTT is the mean of the two published directions.
"""

from __future__ import annotations

from collections.abc import Sequence

from sim.network import LinkSpec, Normal

__all__ = ["REGIONS", "RTT_MS", "rtt_ms", "geo_links", "assign_regions"]

REGIONS: tuple[str, ...] = (
    "East US", "West US 2", "Central US", "Canada Central", "Brazil South",
    "North Europe", "West Europe", "UK South", "Germany West Central", "Sweden Central",
    "UAE North", "Central India", "Southeast Asia", "East Asia", "Japan East", "Australia East",
)

# fmt: off
RTT_MS: tuple[tuple[int, ...], ...] = (
    (  0,  71,  28,  18, 117,  71,  83,  78,  94, 100, 174, 198, 224, 202, 162, 201),  # East US
    ( 73,   0,  38,  64, 177, 129, 142, 139, 155, 158, 240, 210, 162, 141, 101, 160),  # West US 2
    ( 29,  39,   0,  29, 149, 101, 110, 109, 119, 126, 192, 223, 198, 176, 136, 176),  # Central US
    ( 18,  64,  29,   0, 129,  76,  90,  81,  97, 109, 175, 201, 222, 201, 160, 202),  # Canada C.
    (118, 177, 149, 129,   0, 172, 185, 181, 198, 201, 277, 304, 331, 307, 262, 295),  # Brazil S.
    ( 73, 130, 101,  77, 172,   0,  17,  13,  27,  35, 128, 147, 176, 215, 225, 263),  # N. Europe
    ( 85, 143, 108,  90, 185,  17,   0,  11,  11,  26, 111, 140, 169, 201, 233, 265),  # W. Europe
    ( 78, 139, 108,  81, 180,  12,  11,   0,  17,  31, 119, 141, 167, 200, 229, 261),  # UK South
    ( 94, 154, 119,  97, 196,  26,  11,  16,   0,  28, 118, 139, 166, 192, 235, 266),  # Germany WC
    (100, 159, 129, 106, 201,  33,  27,  31,  27,   0, 122, 157, 190, 219, 252, 285),  # Sweden C.
    (176, 241, 190, 175, 274, 121, 111, 112, 100, 122,   0,  32,  83, 113, 151, 173),  # UAE North
    (201, 211, 220, 201, 303, 146, 139, 141, 140, 164,  32,   0,  53,  87, 122, 145),  # C. India
    (224, 162, 197, 222, 330, 176, 169, 167, 166, 191,  83,  53,   0,  36,  72,  95),  # SE Asia
    (204, 141, 176, 200, 306, 212, 203, 200, 193, 220, 113,  88,  36,   0,  49, 122),  # East Asia
    (162, 100, 135, 160, 262, 227, 234, 230, 236, 253, 152, 122,  72,  49,   0, 103),  # Japan East
    (202, 161, 176, 202, 295, 263, 264, 261, 267, 286, 172, 144,  95, 121, 104,   0),  # Austral. E
)
# fmt: on

#: Two nodes placed in the same region talk across availability zones: 1.55 ms RTT,
#: the cross-AZ average measured in UK South by S. Painter, "Exploring Azure Network
#: Latency: The Fundamentals" (simonpainter.com, 2025; 40,000 echo samples).
SAME_REGION_RTT_MS = 1.55
#: Standard deviation of the one-way delay as a fraction of it. The Azure table gives
#: medians only, so this is a modelling choice (backbone paths vary little), not a
#: measurement: pass ``jitter`` to geo_links() to study another value.
JITTER_FRACTION = 0.02
#: A dedicated inter-DC circuit of 1 Gbit/s: the threshold of the "datacenter" link
#: mode in DESIGN.md. A modelling choice; pass ``bandwidth`` to change it.
INTER_DC_BANDWIDTH = 1e9


def rtt_ms(src: str, dst: str) -> float:
    """The published RTT from region ``src`` to region ``dst`` in milliseconds."""
    if src == dst:
        return SAME_REGION_RTT_MS
    try:
        return float(RTT_MS[REGIONS.index(src)][REGIONS.index(dst)])
    except ValueError:
        raise KeyError(f"unknown region {src if src not in REGIONS else dst!r}; "
                       f"known: {', '.join(REGIONS)}") from None


def assign_regions(names: Sequence[str]) -> dict[str, str]:
    """Spread nodes over the regions in order, wrapping after 16."""
    return {name: REGIONS[i % len(REGIONS)] for i, name in enumerate(names)}


def geo_links(names: Sequence[str], regions: dict[str, str] | None = None, *,
              jitter: float = JITTER_FRACTION, bandwidth: float | None = INTER_DC_BANDWIDTH,
              loss: float = 0.0) -> dict[tuple[str, str], LinkSpec]:
    """A :class:`LinkSpec` for every directed pair of ``names`` placed in ``regions``."""
    placed = regions if regions is not None else assign_regions(names)
    specs: dict[tuple[str, str], LinkSpec] = {}
    for a in names:
        for b in names:
            if a == b:
                continue
            one_way = rtt_ms(placed[a], placed[b]) / 2000.0
            specs[(a, b)] = LinkSpec(
                latency=Normal(one_way, jitter * one_way, floor=0.9 * one_way),
                bandwidth=bandwidth, loss=loss)
    return specs
