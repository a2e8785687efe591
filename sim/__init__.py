"""DWCP simulator: deterministic event loop, simulated network and storage, nemesis,
invariant checkers, scenarios, seed sweeps.

The host API for protocol cores is documented in :mod:`sim.world`; scenarios in
:mod:`sim.scenario`; faults in :mod:`sim.nemesis`; the inter-region latency preset
in :mod:`sim.geo`.
"""

from sim.network import Constant, LinkSpec, LogNormal, Normal, Uniform
from sim.store import SimStore
from sim.world import HostedCore, NotifyRecord, SimError, SimNode, Violation, World

__all__ = [
    "World", "SimNode", "HostedCore", "NotifyRecord", "Violation", "SimError", "SimStore",
    "LinkSpec", "Constant", "Uniform", "Normal", "LogNormal",
]
