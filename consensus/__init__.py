"""DWCP consensus: PBFT replica, the ledger state machine, Byzantine evidence, durable log."""
