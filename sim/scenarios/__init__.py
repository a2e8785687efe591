"""The catalogue: every scenario module, registered on import, and the way to run them.

sim.scenario is the framework (the registry, Run, run_scenario); it does not know the
catalogue, so nothing below imports back up. Run scenarios through this package
(``from sim.scenarios import registry, run_scenario``): importing it registers them all.

Add one import line per module (mesh_*, pbft_*, amst_* belong to their engineers), in
any order: the file is exempt from import sorting so appending never breaks the lint.
"""

# ruff: noqa: I001

from sim.scenarios import counter  # noqa: F401
from sim.scenarios import pbft_scenarios  # noqa: F401
from sim.scenarios import mesh_scenarios  # noqa: F401
from sim.scenarios import amst_streams  # noqa: F401
from sim.scenarios import migration_chaos  # noqa: F401
from sim.scenarios import pbft_crashpoints  # noqa: F401
from sim.scenarios import ledger_insider  # noqa: F401

from sim.scenario import registry, run_scenario  # after every module has registered

__all__ = ["registry", "run_scenario"]
