"""``dwcp demo``: local node processes, the demo's VM data, its page writer (and the
image backend and node that run it: demo and test tools, not the production node),
and the scenario it checks."""
