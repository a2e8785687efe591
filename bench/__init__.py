"""Benchmarks: each prints one JSON object of figures measured on real work."""
