"""Benchmark cases: each module defines its settings, its ``prepare`` (its data, written once) and one
worker per side; run.py registers them in ``CASES``."""
