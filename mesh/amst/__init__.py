"""AMST, the adaptive multi-stream transport: the receiver and sender cores and the
stream-count policy. Sans-I/O cores only; the trio driver is :mod:`mesh.runtime.amst_transfer`."""
