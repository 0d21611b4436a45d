"""Pair stage: cross-reference regularisation needs, per sample, other images of the same
identity. Each sample gets up to K refs (their keys and embeddings), chosen deterministically
from the seed; singletons get none.

Shape: small records (key, embedding, split) are grouped by identity (a `str` key, so a
deterministic coder) and each group yields the chosen refs per key; image bytes are never
grouped by identity. The refs are not joined back to the samples here: they travel to the
shard writer, which groups samples by shard index anyway and attaches each sample's refs there
(`WriteShards(refs=...)`). So the samples cross one shuffle in all (the writer's), the K x D
ref arrays one, and the small records one. Two earlier shapes each shuffled the samples twice:
joining the refs back by key (plus the write), and grouping whole samples by identity (which
also puts every image of a huge identity through one worker).

Memory per group: a group holds its members' (key, embedding) pairs: CelebA's largest identity
has 35 images; a single huge identity (a `folder:` class of millions of images) is one
straggler key holding ~3 KB per image (D=768), never its images.

Choosing refs costs O(K) per member after one sort per group (`_GroupRefs`), not a sort of
the whole group per member, and picks exactly what `choose_refs` picks.

Resumed and retried runs: `done` names the members already written to complete shards, as
(key, source, identity, embedding). They join their identity groups as candidate refs, so every new
sample gets exactly the refs an uninterrupted run gives it, and get no refs themselves.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from prep.schemas.records import DeadLetterKind, Sample
from prep.transforms.common import METRICS_NAMESPACE, counter
from prep.transforms.verify import (
    OUTLIER,
    RANDOM,
    STRATEGIES,
    VERIFIED,
    Candidate,
    Thresholds,
    Verdict,
    choose_refs,  # noqa: F401 - the reference choice, used by tests and bench.pairing from here
    verify_group,
)

STAGE = "pair"


class _AllBut(Sequence):
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

    def members(self) -> Iterator[str]:
        """The keys in the order they were given."""
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


@dataclass(frozen=True)
class Member:
    """What pairing groups by identity: a key, its embedding, its split and what verification
    needs (`candidate`: identity embeddings, hashes), never image bytes.
    `written`: already in a complete shard (resume / retry): a candidate ref, not an output."""

    key: str
    embedding: np.ndarray
    split: Optional[str] = None
    written: bool = False
    candidate: Optional[Candidate] = None


@dataclass(frozen=True)
class Refs:
    """The refs chosen for one sample, and its identity verdict: joined to it by key where
    its shard is written."""

    ref_keys: tuple[str, ...]
    refs: np.ndarray  # float32 [K, D]
    split: Optional[str] = None
    verdict: Optional[Verdict] = None
    outlier_reason: Optional[str] = None  # set for outliers (--identity-outliers drop dead-letters them)


@dataclass(frozen=True)
class Written:
    """A sample already in a complete shard (resume, retry), as pairing needs it."""

    key: str
    source: str
    identity: str
    embedding: np.ndarray
    candidate: Optional[Candidate] = None


def identity_group(source: str, identity: str) -> str:
    """Identities are named per source: CelebA's "12" and a folder named "12" are two people."""
    return f"{source}:{identity}"


def _member(sample: Sample, modes: dict[str, str]) -> tuple[str, Member]:
    from prep.transforms.identity import candidate

    if sample.identity is None:
        raise ValueError(f"sample {sample.key!r} reached pairing without an identity")
    return identity_group(sample.source, sample.identity), Member(
        sample.key, sample.embedding, sample.split, candidate=candidate(sample, mode_of(modes, sample.source))
    )


def mode_of(modes: dict[str, str], source: str) -> str:
    """The identity model of a source ("*": every source)."""
    return modes.get(source, modes.get("*", "none"))


def _written_member(entry) -> tuple[str, Member]:
    if not isinstance(entry, Written):  # (key, source, identity, embedding)
        entry = Written(*entry)
    return identity_group(entry.source, str(entry.identity)), Member(
        entry.key, entry.embedding, written=True, candidate=entry.candidate or Candidate(entry.key, written=True)
    )


class _PickRefs(beam.DoFn):
    """(identity, members) -> (key, Refs) for each member that is not already written.

    Without an identity model the refs are `_GroupRefs`' seeded random choice among all
    others (O(K) per member). With one, `verify_group` decides the verdicts, near-duplicates
    and refs of the whole group (see transforms/verify.py)."""

    def __init__(self, k: int, seed: int, dim: int, modes: dict[str, str], thresholds: dict[str, Thresholds],
                 strategy: str = RANDOM):
        self._k, self._seed, self._dim = k, seed, dim
        self._modes, self._thresholds, self._strategy = modes, thresholds, strategy
        self._singletons = counter(STAGE, "singletons")
        self._groups = counter(STAGE, "identities")
        self._outliers = counter(STAGE, "outliers")
        self._group_size = Metrics.distribution(METRICS_NAMESPACE, f"{STAGE}.group_size")

    def process(self, element: tuple[str, Iterable[Member]]):
        identity, members = element
        members = list(members)  # small records: keys and embeddings only
        self._groups.inc()
        self._group_size.update(len(members))
        if len(members) == 1:
            self._singletons.inc()
        thresholds = self._thresholds.get(mode_of(self._modes, identity.split(":", 1)[0]))
        if thresholds is None:
            group = _GroupRefs(((m.key, m.embedding) for m in members), self._k, self._seed, self._dim)
            for member in members:
                if not member.written:
                    ref_keys, refs = group.refs(member.key)
                    yield member.key, Refs(ref_keys, refs, member.split)
            return
        verdicts = verify_group([m.candidate for m in members], k=self._k, seed=self._seed,
                                thresholds=thresholds, strategy=self._strategy)
        yield beam.pvalue.TaggedOutput(GROUPS, group_summary(verdicts))
        embeddings = {m.key: m.embedding for m in members}
        for member, verdict in zip(members, verdicts):
            if member.written:
                continue
            reason = None
            if verdict.status == OUTLIER:
                self._outliers.inc()
                reason = outlier_reason(verdict, thresholds.same)
            if verdict.ref_keys:
                refs = np.stack([embeddings[r] for r in verdict.ref_keys]).astype(np.float32, copy=False)
            else:
                refs = np.zeros((0, self._dim), np.float32)
            yield member.key, Refs(verdict.ref_keys, refs, member.split, verdict, reason)


def is_outlier(entry: tuple[str, Refs]) -> bool:
    return entry[1].verdict is not None and entry[1].verdict.status == OUTLIER


def outlier_letter(entry: tuple[str, Refs]) -> tuple[str, DeadLetterKind, str]:
    return entry[0], DeadLetterKind.IDENTITY_OUTLIER, entry[1].outlier_reason


GROUPS = "groups"  # per identity group: a GroupSummary (every member, written ones included)


@dataclass(frozen=True)
class GroupSummary:
    members: int
    by_status: tuple[tuple[str, int], ...]
    duplicate_pairs: int

    @property
    def verified(self) -> bool:
        return dict(self.by_status).get(VERIFIED, 0) >= 2


def group_summary(verdicts: Sequence[Verdict]) -> GroupSummary:
    counts: dict[str, int] = {}
    for v in verdicts:
        counts[v.status or "none"] = counts.get(v.status or "none", 0) + 1
    pairs = sum(len(v.near_duplicates) for v in verdicts) // 2
    return GroupSummary(len(verdicts), tuple(sorted(counts.items())), pairs)


class IdentityTotals(beam.CombineFn):
    """GroupSummary records -> the run's identity totals (the manifest's "identity" counts)."""

    def create_accumulator(self):
        return {"identities": 0, "identities_verified": 0, "duplicate_pairs": 0, "samples": {}}

    def add_input(self, acc, summary: GroupSummary):
        acc["identities"] += 1
        acc["identities_verified"] += int(summary.verified)
        acc["duplicate_pairs"] += summary.duplicate_pairs
        for status, n in summary.by_status:
            acc["samples"][status] = acc["samples"].get(status, 0) + n
        return acc

    def merge_accumulators(self, accs):
        out = self.create_accumulator()
        for acc in accs:
            for name in ("identities", "identities_verified", "duplicate_pairs"):
                out[name] += acc[name]
            for status, n in acc["samples"].items():
                out["samples"][status] = out["samples"].get(status, 0) + n
        return out

    def extract_output(self, acc):
        return {**acc, "samples": dict(sorted(acc["samples"].items()))}


def outlier_reason(verdict: Verdict, threshold: float) -> str:
    return (f"{DeadLetterKind.IDENTITY_OUTLIER.value}: {verdict.distance:.3f} from the identity's centre ({verdict.centre}), "
            f"above the same-identity threshold {threshold}")


class PairByIdentity(beam.PTransform):
    """Samples with embeddings -> (key, Refs) for every sample: up to K same-identity refs.

    Only small records (key, embedding, split) are grouped by identity; image bytes never
    are, so a huge identity costs one worker its embeddings, not its images. The Refs are
    joined to their samples by key in the shard writer's own grouping (`WriteShards(refs=)`),
    so the samples cross one shuffle in all, and the K x D ref arrays one.

    `done`: `Written` records (or (key, source, identity, embedding) tuples) of samples already
    in complete shards (resume, retry): they count as candidate refs exactly as in one
    uninterrupted run, and get no Refs.

    `mode` ("none", "clip", "face", or a dict source kind -> one of them) and `thresholds`
    (Thresholds, or a dict mode -> Thresholds): with an identity model, each group is
    verified (`transforms/verify.py`) and each Refs carries the member's `Verdict`; `strategy`
    is "random" (seeded, the paper's) or "diverse" (farthest-first). After application,
    `.groups` is the PCollection of one GroupSummary per identity (every member, written ones
    included, so a resumed run counts as an uninterrupted one does), for `IdentityTotals`.
    """

    def __init__(
        self, refs_per_sample: int, seed: int, dim: int, done: Sequence = (), *, mode="none",
        thresholds=None, strategy: str = RANDOM,
    ):
        super().__init__()
        if refs_per_sample < 0:
            raise ValueError("refs_per_sample must be >= 0")
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown ref strategy {strategy!r}; choose one of {STRATEGIES}")
        self._k, self._seed, self._dim = refs_per_sample, seed, dim
        self._done = list(done)
        self._modes = mode if isinstance(mode, dict) else {"*": mode}
        if isinstance(thresholds, Thresholds):
            thresholds = {m: thresholds for m in set(self._modes.values())}
        self._thresholds = {m: t for m, t in (thresholds or {}).items() if m != "none"}
        self._strategy = strategy

    def expand(self, samples):
        members = samples | "KeyByIdentity" >> beam.Map(_member, modes=self._modes).with_output_types(tuple[str, Member])
        if self._done:
            written = (
                samples.pipeline
                | "ListWritten" >> beam.Create(self._done)
                | "KeyWrittenByIdentity" >> beam.Map(_written_member).with_output_types(tuple[str, Member])
            )
            members = (members, written) | "WithWritten" >> beam.Flatten().with_output_types(tuple[str, Member])
        picked = (
            members
            | "GroupByIdentity" >> beam.GroupByKey()
            | "PickRefs" >> beam.ParDo(_PickRefs(self._k, self._seed, self._dim, self._modes, self._thresholds, self._strategy))
            .with_outputs(GROUPS, main="refs")
        )
        self.groups = picked[GROUPS]  # GroupSummary per identity (only with an identity model)
        return picked.refs


def attach_refs(sample: Sample, refs: Refs) -> Sample:
    return sample.with_(ref_keys=refs.ref_keys, refs=refs.refs, verdict=refs.verdict)


def null_refs(sample: Sample, dim: int) -> Sample:
    return sample.with_(ref_keys=(), refs=np.zeros((0, dim), np.float32))
