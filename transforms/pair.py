"""Pair stage: cross-reference regularisation needs, per sample, other images of the same
identity. Each sample gets up to K refs (their keys and embeddings), chosen deterministically
from the seed; singletons get none.

Shape: one GroupByKey of the samples by identity (a `str` key, so a deterministic coder),
then one DoFn that reads each group twice: a first pass collects only (key, embedding) of the
members, a second pass streams the samples out with their refs attached. The refs (K x D
floats per sample, four times the embedding) are made after the shuffle and never cross one,
and no second, by-key join is needed. At CelebA scale (202,599 samples, D=768, K=4) this
shuffles about 5x fewer bytes than grouping small records by identity and joining the refs
back by key, and runs about 8x faster on the in-memory runner (`python -m bench.pairing`).

Memory per group: on Dataflow (runner v2) a large grouped iterable is state-backed and read
in pages, and reading it a second time reads it again, so a worker holds the group's
(key, embedding) pairs, not its images. The in-memory runners materialise groups; CelebA's
largest identity has 35 images. A single huge identity (e.g. a `folder:` class of millions of
images) is one straggler key here, as it was for the by-identity grouping of small records.

Choosing refs costs O(K) per member after one sort per group (`_GroupRefs`), not a sort of
the whole group per member, and picks exactly what `choose_refs` picks.

Resumed runs: `done` names the members already written to complete shards, as
(key, identity, embedding). They join their identity groups as candidate refs, so every new
sample gets exactly the refs an uninterrupted run gives it, and are not output again.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence as _SequenceABC
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence, Union

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from prep.schemas.records import Sample
from prep.transforms.common import METRICS_NAMESPACE, counter

STAGE = "pair"


def choose_refs(key: str, group_keys: list[str], k: int, seed: int) -> list[str]:
    """Up to k other keys from `group_keys` (never `key`), the same for any order of the group."""
    others = sorted(g for g in group_keys if g != key)
    if len(others) <= k:
        chosen = others
    else:
        chosen = random.Random(f"{seed}:{key}").sample(others, k)
    return chosen


class _AllBut(_SequenceABC):
    """The sorted keys of a group without the one at `skip`, as a view (O(1) per item).

    `random.Random.sample` only takes `len()` and indexes, so sampling this view picks the
    same keys as sampling the list `choose_refs` builds, without building it.
    """

    __slots__ = ("_keys", "_skip")

    def __init__(self, keys: Sequence[str], skip: int):
        self._keys, self._skip = keys, skip

    def __len__(self) -> int:
        return len(self._keys) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        return self._keys[i + (i >= self._skip)]

    def __iter__(self) -> Iterator[str]:
        # `random.sample` copies populations of up to ~21 items with list(): keep that fast.
        return itertools.chain(itertools.islice(self._keys, self._skip), itertools.islice(self._keys, self._skip + 1, None))


class _GroupRefs:
    """Refs within one identity group: `refs(key)` -> (ref_keys, refs[len, D] float32)."""

    def __init__(self, members: Iterable[tuple[str, np.ndarray]], k: int, seed: int, dim: int):
        self._k, self._seed, self._dim = k, seed, dim
        self._embeddings: dict[str, np.ndarray] = {}
        for key, embedding in members:
            if key in self._embeddings:
                raise ValueError(f"pairing found sample key {key!r} twice in one identity group: keys must be unique")
            self._embeddings[key] = embedding
        self._sorted = sorted(self._embeddings)
        self._position = {key: i for i, key in enumerate(self._sorted)}

    def __len__(self) -> int:
        return len(self._sorted)

    def keys(self) -> Iterator[str]:
        return iter(self._embeddings)

    def ref_keys(self, key: str) -> list[str]:
        others = _AllBut(self._sorted, self._position[key])
        if len(others) <= self._k:
            return list(others)
        return random.Random(f"{self._seed}:{key}").sample(others, self._k)

    def refs(self, key: str) -> tuple[tuple[str, ...], np.ndarray]:
        ref_keys = self.ref_keys(key)
        if not ref_keys:
            return (), np.zeros((0, self._dim), np.float32)
        refs = np.stack([self._embeddings[r] for r in ref_keys]).astype(np.float32, copy=False)
        return tuple(ref_keys), refs


def refs_for_identity(members: Iterable[tuple[str, np.ndarray]], k: int, seed: int, dim: int):
    """All (key, (ref_keys, refs[K, D])) of one identity group, in the members' order."""
    group = _GroupRefs(members, k, seed, dim)
    for key in group.keys():
        yield key, group.refs(key)


@dataclass(frozen=True)
class _Written:
    """A member already in a complete shard (resumed run): a candidate ref, not an output."""

    key: str
    embedding: np.ndarray


def _by_identity(sample: Sample) -> tuple[str, Sample]:
    if sample.identity is None:
        raise ValueError(f"sample {sample.key!r} reached pairing without an identity")
    return sample.identity, sample


def _written_by_identity(entry: tuple[str, str, np.ndarray]) -> tuple[str, _Written]:
    key, identity, embedding = entry
    return str(identity), _Written(key, embedding)


class _AttachRefs(beam.DoFn):
    """(identity, samples) -> each sample with its refs; reads the group twice (see module doc)."""

    def __init__(self, k: int, seed: int, dim: int):
        self._k, self._seed, self._dim = k, seed, dim
        self._singletons = counter(STAGE, "singletons")
        self._groups = counter(STAGE, "identities")
        self._group_size = Metrics.distribution(METRICS_NAMESPACE, f"{STAGE}.group_size")

    def process(self, element: tuple[str, Iterable[Union[Sample, _Written]]]) -> Iterator[Sample]:
        _identity, members = element
        group = _GroupRefs(((m.key, m.embedding) for m in members), self._k, self._seed, self._dim)
        self._groups.inc()
        self._group_size.update(len(group))
        if len(group) == 1:
            self._singletons.inc()
        for member in members:
            if isinstance(member, Sample):
                ref_keys, refs = group.refs(member.key)
                yield member.with_(ref_keys=ref_keys, refs=refs)


class PairByIdentity(beam.PTransform):
    """Samples with embeddings -> the same samples with `ref_keys` and `refs` filled.

    `done`: members already written, (key, identity, embedding), as a list (made into a
    `Create`: it lands in the job graph, fine for thousands) or as a PCollection (read on the
    workers, e.g. from the complete shards' sidecars: what a large resumed run needs).
    """

    def __init__(self, refs_per_sample: int, seed: int, dim: int, done=()):
        super().__init__()
        if refs_per_sample < 0:
            raise ValueError("refs_per_sample must be >= 0")
        self._k, self._seed, self._dim = refs_per_sample, seed, dim
        self._done = done if isinstance(done, beam.PCollection) else list(done)

    def expand(self, samples):
        keyed = samples | "KeyByIdentity" >> beam.Map(_by_identity).with_output_types(tuple[str, Sample])
        if isinstance(self._done, beam.PCollection) or self._done:
            done = self._done
            if not isinstance(done, beam.PCollection):
                done = samples.pipeline | "ListWritten" >> beam.Create(done)
            written = done | "KeyWrittenByIdentity" >> beam.Map(_written_by_identity).with_output_types(tuple[str, _Written])
            keyed = (keyed, written) | "WithWritten" >> beam.Flatten().with_output_types(tuple[str, Union[Sample, _Written]])
        return (
            keyed
            | "GroupByIdentity" >> beam.GroupByKey()
            | "AttachRefs" >> beam.ParDo(_AttachRefs(self._k, self._seed, self._dim)).with_output_types(Sample)
        )


def null_refs(sample: Sample, dim: int) -> Sample:
    return sample.with_(ref_keys=(), refs=np.zeros((0, dim), np.float32))
