"""VM backends: the :class:`~federation.vms.backend.VmBackend` interface, the
``image`` backend, the QMP client, and the interpreter of a session's VM actions."""
