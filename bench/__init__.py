"""Benchmarks of the node on this machine: ``python -m bench.run`` writes docs/benchmarks.md."""
