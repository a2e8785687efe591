"""Every scenario module; importing this package registers them all (sim.scenario.registry).

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
