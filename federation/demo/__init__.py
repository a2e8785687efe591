"""``dwcp demo``: local node processes, the demo's VM data, its page writer, and
the scenario it checks."""
