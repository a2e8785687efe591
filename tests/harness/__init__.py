"""Helpers the tests share: node processes, AMST pairs and loopback channels, wire
strategies. No test module imports another test module."""
