"""The data plane that carries pre-copy rounds: v1 (one stream over the control
link) and v3 (HDE over AMST), relays through a third DC."""
