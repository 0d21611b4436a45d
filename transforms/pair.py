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

Two shuffles, the same groups and refs (tests/test_pair_shuffles.py):
- Beam's (`spill_dir` None; Dataflow): a GroupByKey of one `Member` per image.
- Files (`spill_dir`, local runs, whose workers share one disk): each bundle appends its
  members' records (a small binary head, then the raw float32 embedding) to one file per
  bucket of identities (a stable hash, 64 buckets) and emits only the file names, once its
  files are complete; a GroupByKey of those names, then each bucket's files are read and
  grouped by identity. Beam's in-memory runner holds a grouping several times over (decoded
  in its table, encoded for the next stage, and copied again on the way to the worker): for
  CelebA's 202,599 embeddings of 3 KB (620 MB) that was 3.5 GB peak and most of the time
  (bench/pairing.py); through files it is one bucket at a time.

Memory per group: a group holds its members' (key, embedding) pairs, the embeddings stacked
in one float32 block (`MemberBatch`): CelebA's largest identity has 35 images; a single huge
identity (a `folder:` class of millions of images) is one straggler key holding ~3 KB per
image (D=768), never its images.

Choosing refs costs O(K) per member after one sort per group (`_GroupRefs`), not a sort of
the whole group per member, and picks exactly what `choose_refs` picks.

Resumed and retried runs: `done` names the members already written to complete shards, as
(key, source, identity, embedding). They join their identity groups as candidate refs, so every new
sample gets exactly the refs an uninterrupted run gives it, and get no refs themselves.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import struct
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from prep.schemas.records import DeadLetterKind, Sample
from prep.transforms.common import METRICS_NAMESPACE, counter, stable_hash
from prep.transforms.verify import (
    OUTLIER,
    RANDOM,
    STRATEGIES,
    VERIFIED,
    Candidate,
    Thresholds,
    Verdict,
    choose_refs,  # noqa: F401 - the reference choice, used by tests and bench.pairing from here
    mode_of,  # noqa: F401 - the one rule for a source's identity model, used here and by decode
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
    """Refs within one identity group: `ref_keys(key)` -> up to K other keys of the group,
    exactly `choose_refs(key, keys, k, seed)`, after one sort of the group."""

    def __init__(self, keys: Sequence[str], k: int, seed: int):
        self._k, self._seed = k, seed
        self._sorted = sorted(keys)
        self._position = {key: i for i, key in enumerate(self._sorted)}

    def __len__(self) -> int:
        return len(self._sorted)

    def ref_keys(self, key: str) -> list[str]:
        others = _AllBut(self._sorted, self._position[key])
        if len(others) <= self._k:
            return list(others)
        return random.Random(f"{self._seed}:{key}").sample(others, self._k)


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
    ref_kinds: tuple[str, ...] = ()  # () = every ref is another photo of the identity; else per ref (views.py)


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


def _member(sample: Sample, modes: dict[str, str], verified: frozenset[str] = frozenset()) -> tuple[str, Member]:
    """(identity group, Member); the verification `candidate` only for the modes in `verified`
    (the others never read it)."""
    if sample.identity is None:
        raise ValueError(f"sample {sample.key!r} reached pairing without an identity")
    mode = mode_of(modes, sample.source)
    if mode in verified:
        from prep.transforms.identity import candidate  # (imports the face models' modules)

        return identity_group(sample.source, sample.identity), Member(
            sample.key, sample.embedding, sample.split, candidate=candidate(sample, mode))
    return identity_group(sample.source, sample.identity), Member(sample.key, sample.embedding, sample.split)


def _written_member(entry) -> tuple[str, Member]:
    if not isinstance(entry, Written):  # (key, source, identity, embedding)
        entry = Written(*entry)
    return identity_group(entry.source, str(entry.identity)), Member(
        entry.key, entry.embedding, written=True, candidate=entry.candidate or Candidate(entry.key, written=True)
    )


class MemberBatch:
    """The members of one identity group as `_PickRefs` reads them: parallel lists, and their
    embeddings stacked into one float32 block (row i is `keys[i]`'s), so that a sample's refs
    are one fancy-indexed copy. The order is the order the members came in; nothing depends
    on it (refs are chosen over the sorted keys, verification sees the group sorted by key)."""

    __slots__ = ("keys", "splits", "written", "candidates", "_rows", "_block")

    def __init__(self):
        self.keys: list[str] = []
        self.splits: list[Optional[str]] = []
        self.written: list[bool] = []
        self.candidates: list[Optional[Candidate]] = []
        self._rows: list[np.ndarray] = []
        self._block: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, member: Member) -> None:
        if member.embedding is None:
            raise ValueError(f"sample {member.key!r} reached pairing without an embedding")
        self.add_fields(member.key, member.split, member.written, member.candidate, member.embedding)

    def add_fields(self, key: str, split: Optional[str], written: bool, candidate: Optional[Candidate],
                   embedding: np.ndarray) -> None:
        self.keys.append(key)
        self.splits.append(split)
        self.written.append(written)
        self.candidates.append(candidate)
        self._rows.append(embedding)
        self._block = None

    def embeddings(self) -> np.ndarray:
        """float32 [len, ...]: row i is keys[i]'s embedding."""
        if self._block is None:
            self._block = np.stack(self._rows).astype(np.float32, copy=False)
        return self._block


def batch_members(element: tuple[str, Iterable[Member]]) -> tuple[str, MemberBatch]:
    """(identity, grouped Members) -> (identity, MemberBatch)."""
    identity, members = element
    batch = MemberBatch()
    for member in members:
        batch.add(member)
    return identity, batch


# -- the local shuffle: members spilled to files, only file names through Beam's grouping -----

SPILL_BUCKETS = 64  # files per bundle at most; a reader holds one bucket (~1/64 of the members)
# A member record: the head's length and the arrays' (the embedding's raw float32 bytes, then
# the verification candidate's embeddings, if any); then the head and the arrays. The head is
# written by this run and read back by it, and holds no pickle: fixed fields (flags, string
# lengths, the embedding's rank), the identity, key and split as UTF-8, the candidate's other
# fields as JSON (verified modes only), then the embedding's shape.
_RECORD = struct.Struct("<II")
_HEAD = struct.Struct("<BIIIIB")  # flags, len(identity), len(key), len(split), len(candidate JSON), rank
_WRITTEN, _HAS_SPLIT, _HAS_CANDIDATE = 1, 2, 4


def _encode_candidate(c: Candidate) -> tuple[bytes, list[np.ndarray]]:
    arrays = [np.ascontiguousarray(e) for e in c.embeddings] if c.embeddings is not None else []
    fields = {"key": c.key, "areas": [int(a) for a in c.areas], "sha": c.pixel_sha256, "phash": c.phash,
              "written": bool(c.written), "faces": None if c.face_count is None else int(c.face_count),
              "arrays": None if c.embeddings is None else [[a.dtype.str, list(a.shape)] for a in arrays]}
    return json.dumps(fields, separators=(",", ":")).encode(), arrays


def _decode_candidate(text: bytes, data: bytes, pos: int) -> tuple[Candidate, int]:
    """The candidate and the position after its arrays (copied out of the file's bytes)."""
    fields = json.loads(text)
    embeddings = None
    if fields["arrays"] is not None:
        embeddings = []
        for dtype, shape in fields["arrays"]:
            count = math.prod(shape)
            array = np.frombuffer(data, np.dtype(dtype), count=count, offset=pos).reshape(shape).copy()
            pos += array.nbytes
            embeddings.append(array)
        embeddings = tuple(embeddings)
    return Candidate(fields["key"], embeddings, tuple(fields["areas"]), fields["sha"], fields["phash"],
                     fields["written"], fields["faces"]), pos


def _encode_member(identity: str, member: Member) -> tuple[bytes, list]:
    """(head, arrays) of one member's spill record."""
    vector = np.ascontiguousarray(member.embedding, dtype=np.float32)
    ident, key = identity.encode(), member.key.encode()
    split = member.split.encode() if member.split is not None else b""
    flags = (_WRITTEN if member.written else 0) | (_HAS_SPLIT if member.split is not None else 0)
    candidate, arrays = b"", [vector]
    if member.candidate is not None:
        flags |= _HAS_CANDIDATE
        candidate, extra = _encode_candidate(member.candidate)
        arrays += extra
    head = b"".join((_HEAD.pack(flags, len(ident), len(key), len(split), len(candidate), vector.ndim),
                     ident, key, split, candidate, struct.pack(f"<{vector.ndim}I", *vector.shape)))
    return head, arrays


def _spill_bucket(identity: str, buckets: int) -> int:
    return stable_hash(identity, "pair-spill") % buckets


class _SpillMembers(beam.DoFn):
    """(identity, Member) -> records appended to one file per (bundle, bucket of identities)
    in `folder`; at the end of the bundle, (bucket, path) for each file it wrote.

    Exactly once: a file is written under a `.part` name and renamed when complete, and the
    names leave the bundle only in `finish_bundle`, so the files of a failed or retried
    bundle are never read. Everything in `folder` goes when its owner removes it."""

    def __init__(self, folder: str, buckets: int = SPILL_BUCKETS):
        self._folder, self._buckets = folder, buckets
        self._files: dict = {}

    def start_bundle(self):
        self._close_parts()
        self._bundle = uuid.uuid4().hex

    def _path(self, bucket: int) -> str:
        return os.path.join(self._folder, f"{bucket:03d}-{self._bundle}.members")

    def process(self, element: tuple[str, Member]):
        identity, member = element
        if member.embedding is None:
            raise ValueError(f"sample {member.key!r} reached pairing without an embedding")
        bucket = _spill_bucket(identity, self._buckets)
        f = self._files.get(bucket)
        if f is None:
            f = self._files[bucket] = open(self._path(bucket) + ".part", "wb", buffering=1 << 20)
        head, arrays = _encode_member(identity, member)
        f.write(_RECORD.pack(len(head), sum(a.nbytes for a in arrays)))
        f.write(head)
        for array in arrays:
            f.write(array.data)

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindows

        files, self._files = self._files, {}
        for bucket, f in sorted(files.items()):
            f.close()
            os.replace(f.name, self._path(bucket))
            yield GlobalWindows.windowed_value((bucket, self._path(bucket)))

    def teardown(self):
        self._close_parts()

    def _close_parts(self):
        for f in self._files.values():  # a failed bundle's: left as .part, never read
            f.close()
        self._files = {}


def _spill_records(path: str, data: bytes) -> Iterator[tuple[tuple, np.ndarray]]:
    """The ((identity, key, split, written, candidate), embedding) records of one spill file;
    ValueError if it is cut short."""
    if not data:  # a file is created for its first record
        raise ValueError(f"{path}: truncated pairing spill file (empty)")
    pos, end = 0, len(data)
    while pos < end:
        if pos + _RECORD.size > end:
            raise ValueError(f"{path}: truncated pairing spill file (a record header at byte {pos})")
        head_size, size = _RECORD.unpack_from(data, pos)
        pos += _RECORD.size
        arrays_at = pos + head_size
        if arrays_at + size > end or head_size < _HEAD.size:
            raise ValueError(f"{path}: truncated pairing spill file (the record at byte {pos})")
        try:
            record = _decode_record(data, pos, arrays_at, size)
        except (ValueError, KeyError, TypeError, struct.error) as e:
            raise ValueError(f"{path}: truncated pairing spill file (the record at byte {pos}: {e})") from e
        yield record
        pos = arrays_at + size


def _decode_record(data: bytes, pos: int, arrays_at: int, size: int) -> tuple[tuple, np.ndarray]:
    flags, n_ident, n_key, n_split, n_candidate, rank = _HEAD.unpack_from(data, pos)
    at = pos + _HEAD.size
    fields = []
    for n in (n_ident, n_key, n_split, n_candidate):
        fields.append(data[at : at + n])
        at += n
    if at + 4 * rank != arrays_at:
        raise ValueError("its head does not add up")
    shape = struct.unpack_from(f"<{rank}I", data, at)
    identity, key = fields[0].decode(), fields[1].decode()
    split = fields[2].decode() if flags & _HAS_SPLIT else None
    count = math.prod(shape)
    if 4 * count > size:
        raise ValueError(f"the embedding of {key!r} is cut short")
    embedding = np.frombuffer(data, np.float32, count=count, offset=arrays_at).reshape(shape)
    candidate, after = None, arrays_at + 4 * count
    if flags & _HAS_CANDIDATE:
        candidate, after = _decode_candidate(fields[3], data, after)
    if after != arrays_at + size:
        raise ValueError(f"the arrays of {key!r} do not add up")
    return (identity, key, split, bool(flags & _WRITTEN), candidate), embedding


def read_spilled(element: tuple[int, Iterable[str]]) -> Iterator[tuple[str, MemberBatch]]:
    """(bucket, paths) -> (identity, MemberBatch) for every identity in the bucket's files."""
    _bucket, paths = element
    groups: dict[str, MemberBatch] = {}
    for path in sorted(paths):
        with open(path, "rb") as f:
            data = f.read()
        for (identity, key, split, written, candidate), embedding in _spill_records(path, data):
            batch = groups.get(identity)
            if batch is None:
                batch = groups[identity] = MemberBatch()
            batch.add_fields(key, split, written, candidate, embedding)
    for identity in list(groups):
        batch = groups.pop(identity)
        batch.embeddings()  # one copy into the group's block: the batch no longer needs the files' bytes
        yield identity, batch


def _duplicate_key(keys: Sequence[str]) -> Optional[str]:
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            return key
        seen.add(key)
    return None


class _PickRefs(beam.DoFn):
    """(identity, MemberBatch) -> (key, Refs) for each member that is not already written.

    Without an identity model the refs are `_GroupRefs`' seeded random choice among all
    others (O(K) per member). With one, `verify_group` decides the verdicts, near-duplicates
    and refs of the whole group (see transforms/verify.py), over the group sorted by key."""

    def __init__(self, k: int, seed: int, dim: int, modes: dict[str, str], thresholds: dict[str, Thresholds],
                 strategy: str = RANDOM):
        self._k, self._seed, self._dim = k, seed, dim
        self._modes, self._thresholds, self._strategy = modes, thresholds, strategy
        self._singletons = counter(STAGE, "singletons")
        self._groups = counter(STAGE, "identities")
        self._outliers = counter(STAGE, "outliers")
        self._group_size = Metrics.distribution(METRICS_NAMESPACE, f"{STAGE}.group_size")

    def _gather(self, embeddings: np.ndarray, row: dict[str, int], ref_keys: Sequence[str]) -> np.ndarray:
        if not ref_keys:
            return np.zeros((0, self._dim), np.float32)
        return embeddings[[row[r] for r in ref_keys]]  # a copy: a Refs never holds the whole group

    def process(self, element: tuple[str, MemberBatch]):
        identity, batch = element
        keys = batch.keys
        row = {key: i for i, key in enumerate(keys)}
        if len(row) != len(keys):
            raise ValueError(f"pairing found sample key {_duplicate_key(keys)!r} twice in one identity group: "
                             f"keys must be unique")
        embeddings = batch.embeddings()
        self._groups.inc()
        self._group_size.update(len(keys))
        if len(keys) == 1:
            self._singletons.inc()
        thresholds = self._thresholds.get(mode_of(self._modes, identity.split(":", 1)[0]))
        if thresholds is None:
            group = _GroupRefs(keys, self._k, self._seed)
            for key, split, written in zip(keys, batch.splits, batch.written):
                if not written:
                    ref_keys = group.ref_keys(key)
                    yield key, Refs(tuple(ref_keys), self._gather(embeddings, row, ref_keys), split)
            return
        order = sorted(range(len(keys)), key=keys.__getitem__)
        verdicts = verify_group([batch.candidates[i] for i in order], k=self._k, seed=self._seed,
                                thresholds=thresholds, strategy=self._strategy)
        yield beam.pvalue.TaggedOutput(GROUPS, group_summary(verdicts))
        for i, verdict in zip(order, verdicts):
            if batch.written[i]:
                continue
            reason = None
            if verdict.status == OUTLIER:
                self._outliers.inc()
                reason = outlier_reason(verdict, thresholds.same)
            refs = self._gather(embeddings, row, verdict.ref_keys)
            yield keys[i], Refs(verdict.ref_keys, refs, batch.splits[i], verdict, reason)


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

    `spill_dir`: an existing folder on a disk every worker shares (a local run): the members
    are shuffled through files there instead of Beam's grouping (see the module's docstring);
    its owner removes it after the run. The output is the same either way.
    """

    def __init__(
        self, refs_per_sample: int, seed: int, dim: int, done: Sequence = (), *, mode="none",
        thresholds=None, strategy: str = RANDOM, spill_dir: Optional[str] = None,
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
        self._spill_dir = spill_dir

    def expand(self, samples):
        verified = frozenset(self._thresholds)
        members = samples | "KeyByIdentity" >> beam.Map(_member, modes=self._modes, verified=verified).with_output_types(
            tuple[str, Member])
        written = None
        if self._done:
            written = (
                samples.pipeline
                | "ListWritten" >> beam.Create(self._done)
                | "KeyWrittenByIdentity" >> beam.Map(_written_member).with_output_types(tuple[str, Member])
            )
        if self._spill_dir is None:
            if written is not None:
                members = (members, written) | "WithWritten" >> beam.Flatten().with_output_types(tuple[str, Member])
            batches = (
                members
                | "GroupByIdentity" >> beam.GroupByKey()
                | "BatchMembers" >> beam.Map(batch_members).with_output_types(tuple[str, MemberBatch])
            )
        else:
            files = members | "SpillMembers" >> beam.ParDo(_SpillMembers(self._spill_dir)).with_output_types(tuple[int, str])
            if written is not None:
                files = (
                    files,
                    written | "SpillWritten" >> beam.ParDo(_SpillMembers(self._spill_dir)).with_output_types(tuple[int, str]),
                ) | "SpilledFiles" >> beam.Flatten().with_output_types(tuple[int, str])
            batches = (
                files
                | "GroupSpilledFiles" >> beam.GroupByKey()
                | "ReadSpilled" >> beam.FlatMap(read_spilled).with_output_types(tuple[str, MemberBatch])
            )
        picked = batches | "PickRefs" >> beam.ParDo(
            _PickRefs(self._k, self._seed, self._dim, self._modes, self._thresholds, self._strategy)
        ).with_outputs(GROUPS, main="refs")
        self.groups = picked[GROUPS]  # GroupSummary per identity (only with an identity model)
        return picked.refs


def attach_refs(sample: Sample, refs: Refs) -> Sample:
    return sample.with_(ref_keys=refs.ref_keys, refs=refs.refs, verdict=refs.verdict, ref_kinds=refs.ref_kinds)


def null_refs(sample: Sample, dim: int) -> Sample:
    return sample.with_(ref_keys=(), refs=np.zeros((0, dim), np.float32))
