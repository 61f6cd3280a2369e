"""Benchmarks behind ``p2pnode bench …``; their figures go into BENCHMARKS.md."""
