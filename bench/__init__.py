"""Benchmarks of the CoOp core against the reference implementation's compute pattern (see bench/README.md).

Run from the repository root, e.g. ``.venv/bin/python -m bench.step_time --json``.
"""
