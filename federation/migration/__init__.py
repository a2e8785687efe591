"""Live migration of one VM as sans-I/O cores: the vocabulary (states, events,
actions), the source and target sessions, restore after a restart, the rollout
rule, the DC core that runs the sessions beside the ledger replica, and the rounds
core that carries their pre-copy rounds (v1 whole, v3's round control)."""
