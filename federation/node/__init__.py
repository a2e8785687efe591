"""One DC's node, assembled from the cores and the runtime, with its status and
metrics."""
