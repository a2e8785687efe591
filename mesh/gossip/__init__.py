"""Membership by gossip (SWIM with Lifeguard): the membership core, member states
and their configuration, the piggyback transmit queue. Sans-I/O cores only."""
