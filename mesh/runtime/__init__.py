"""The trio runtime of a node: control links over trio-websocket, peer bookkeeping,
core hosting, the SQLite store, JSON logs, and the AMST stream drivers. The only
modules of :mod:`mesh` that import trio."""
