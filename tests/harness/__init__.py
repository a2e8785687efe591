"""Helpers the tests share, one module per concern; no test module imports another.

- ``waiting``: wait for a condition (trio or threads), never for a fixed time;
- ``node``: a federation on loopback, real VM images, in-process nodes and their waits;
- ``processes``: real ``dwcp node`` processes and checks of their data directories;
- ``api``: a node's HTTP API over a real socket;
- ``runtime``: node runtimes of one mesh on loopback;
- ``channels``: secure channel pairs and AMST's channel factories;
- ``amst``: an AMST sender and receiver joined by modelled streams;
- ``data``: real bytes (source text, shared libraries) and AMST chunks of them;
- ``migration_world``: the two-DC migration world and its hypothesis state machine;
- ``migration_session``: a source session driven along its normal path;
- ``wire_strategies``: hypothesis strategies for every wire message;
- ``imports``: the import graph of a source tree (tests/test_layers.py's rules).
"""
