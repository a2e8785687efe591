"""DWCP mesh: wire format, identities and secure channels, gossip, link estimation and
modes, routing, HDE, AMST, and the trio runtime of a node."""
