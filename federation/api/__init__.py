"""The node's HTTP API and its dashboard page."""
