"""Benchmark cases: each module defines its settings, its ``prepare`` (model + data, run once) and one
worker per side; run.py registers them in ``CASES``."""
