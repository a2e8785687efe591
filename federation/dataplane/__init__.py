"""The trio side of the pre-copy rounds: the scheduler that hosts the rounds core
(:mod:`federation.migration.rounds`) on a node's runtime and carries out its actions,
and the v3 data plane (HDE over AMST, relays through a third DC) it drives; v1 needs
nothing here beyond the control link and the VM actions' interpreter."""
