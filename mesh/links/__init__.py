"""Links between DCs: estimates (RTT, jitter, loss, bandwidth) and their gossip,
link modes with hysteresis, route election, and the mesh control core that hosts them.
Sans-I/O cores only."""
