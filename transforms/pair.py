"""Pair stage: cross-reference regularisation needs, per sample, other images of the same
identity. Each sample gets up to K refs (their keys and embeddings), chosen deterministically
from the seed; singletons get none.

Only small records (key, identity, embedding) are grouped by identity; the chosen refs are
joined back to the full samples by key, so image bytes are never gathered per identity.
"""

from __future__ import annotations

import random
from typing import Iterable

import apache_beam as beam
import numpy as np

from prep.schemas.records import Sample
from prep.transforms.common import counter

STAGE = "pair"


def choose_refs(key: str, group_keys: list[str], k: int, seed: int) -> list[str]:
    """Up to k other keys from `group_keys` (never `key`), the same for any order of the group."""
    others = sorted(g for g in group_keys if g != key)
    if len(others) <= k:
        chosen = others
    else:
        chosen = random.Random(f"{seed}:{key}").sample(others, k)
    return chosen


def refs_for_identity(members: Iterable[tuple[str, np.ndarray]], k: int, seed: int, dim: int):
    """All (key, (ref_keys, refs[K, D])) of one identity group."""
    embeddings = dict(members)
    keys = list(embeddings)
    for key in keys:
        ref_keys = choose_refs(key, keys, k, seed)
        refs = np.stack([embeddings[r] for r in ref_keys]).astype(np.float32) if ref_keys else np.zeros((0, dim), np.float32)
        yield key, (tuple(ref_keys), refs)


class _PickRefs(beam.DoFn):
    def __init__(self, k: int, seed: int, dim: int):
        self._k, self._seed, self._dim = k, seed, dim
        self._singletons = counter(STAGE, "singletons")
        self._groups = counter(STAGE, "identities")

    def process(self, element):
        _identity, members = element
        members = list(members)
        self._groups.inc()
        if len(members) == 1:
            self._singletons.inc()
        yield from refs_for_identity(members, self._k, self._seed, self._dim)


def _attach(element):
    key, joined = element
    samples, refs = list(joined["sample"]), list(joined["refs"])
    if len(samples) != 1 or len(refs) != 1:
        raise ValueError(f"pairing join for {key!r} found {len(samples)} samples and {len(refs)} ref sets: keys must be unique")
    ref_keys, ref_array = refs[0]
    return samples[0].with_(ref_keys=ref_keys, refs=ref_array)


class PairByIdentity(beam.PTransform):
    """Samples with embeddings -> the same samples with `ref_keys` and `refs` filled."""

    def __init__(self, refs_per_sample: int, seed: int, dim: int):
        super().__init__()
        if refs_per_sample < 0:
            raise ValueError("refs_per_sample must be >= 0")
        self._k, self._seed, self._dim = refs_per_sample, seed, dim

    def expand(self, samples):
        small = samples | "KeyByIdentity" >> beam.Map(lambda s: (s.identity, (s.key, s.embedding)))
        refs = (
            small
            | "GroupByIdentity" >> beam.GroupByKey()
            | "PickRefs" >> beam.ParDo(_PickRefs(self._k, self._seed, self._dim))
        )
        by_key = samples | "KeyBySample" >> beam.Map(lambda s: (s.key, s))
        return (
            {"sample": by_key, "refs": refs}
            | "JoinRefs" >> beam.CoGroupByKey()
            | "AttachRefs" >> beam.Map(_attach)
        )


def null_refs(sample: Sample, dim: int) -> Sample:
    return sample.with_(ref_keys=(), refs=np.zeros((0, dim), np.float32))
