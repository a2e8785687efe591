"""DWCP federation: config files, rollout, migration orchestrator, VM backends, node assembly,
HTTP API, and the `dwcp` CLI."""
