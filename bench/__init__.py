"""Tandem's benchmarks, run by `make bench` or `python -m bench [name ...]`."""
