"""What a request to a node can fail with; the HTTP API maps each to a status code."""

from __future__ import annotations

__all__ = ["NodeError", "LedgerTimeout", "UnknownMigration", "NotTheSource"]


class NodeError(Exception):
    """A request to the node that cannot be done; the message says why (for the API)."""


class LedgerTimeout(NodeError):
    """No f+1 matching replies within the ledger client's timeout."""


class UnknownMigration(NodeError):
    """Neither a session here nor the ledger knows the migration id."""


class NotTheSource(NodeError):
    """Only the migration's source can act on it; ``source`` names that DC."""

    def __init__(self, message: str, source: str) -> None:
        super().__init__(message)
        self.source = source
