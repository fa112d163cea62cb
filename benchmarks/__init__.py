"""Benchmarks of micropatch: one command each, results in benchmarks/results/.

Run one with `python -m benchmarks.NAME` (pause, overhead, peers, soak), or all
with `python -m benchmarks.run`; `--quick` makes a smoke run of a few seconds.
"""
