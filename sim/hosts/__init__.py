"""Hosts of real protocol cores in the simulator: the DCs of migration-chaos, PBFT
clusters and Byzantine replicas, the mesh world, and the simulator's own counter cores."""
