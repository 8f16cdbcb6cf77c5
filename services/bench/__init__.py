"""Benchmarks: each prints figures against limits measured in the same run."""
