"""Benchmarks, run from the repository root:

    python -m bench.pairing   the pairing step alone at CelebA scale: Beam vs plain numpy
    python -m bench.e2e       a whole `prep run --preset tiny`: images/s and peak RSS, 1x vs 10x data
    python -m bench.stages    each model stage: a plain batched loop vs the same stage in Beam

Each prints one JSON line per variant. pairing and e2e run every variant in a fresh Python
process, so that one variant's peak resident memory is not hidden by another's.
"""
