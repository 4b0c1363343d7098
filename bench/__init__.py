"""Benchmarks of issue 5 (`make bench`): fetch, input pipeline, training, scale."""
