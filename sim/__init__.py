"""DWCP simulator: deterministic event loop, simulated network and storage, nemesis,
invariant checkers, scenarios, seed sweeps."""
