"""Conventions shared by every transform: the dead-letter tag, stable hashing, metrics."""

from __future__ import annotations

import hashlib

import apache_beam as beam
from apache_beam.metrics import Metrics

# Every DoFn that can reject an element emits `beam.pvalue.TaggedOutput(DEAD, DeadLetter)`;
# the main output carries the records that go on.
DEAD = "dead_letter"
METRICS_NAMESPACE = "prep"


def stable_hash(text: str, seed: int | str = 0) -> int:
    """A 64-bit hash that is the same in every process and run (unlike hash())."""
    digest = hashlib.blake2b(f"{seed}:{text}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def counter(stage: str, name: str):
    return Metrics.counter(METRICS_NAMESPACE, f"{stage}.{name}")


def dead(letter) -> beam.pvalue.TaggedOutput:
    return beam.pvalue.TaggedOutput(DEAD, letter)
