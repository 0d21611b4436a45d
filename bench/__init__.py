"""Benchmarks: `python -m bench.pairing`, `python -m bench.e2e` (run from the repository root).

Each benchmark runs every variant in a fresh Python process, so that one variant's peak
resident memory is not hidden by another's, and prints one JSON line per variant.
"""
