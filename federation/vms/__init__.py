"""VM backends: the :class:`~federation.vms.backend.VmBackend` interface, the
``image`` backend, the QMP client, and the one interpreter of a migration's VM
actions (the sessions' and the rounds core's page actions)."""
