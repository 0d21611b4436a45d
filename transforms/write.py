"""Write stage: samples -> WebDataset shards, deterministic and atomic.

Shard assignment: samples are ordered by key; shard i holds keys [boundary[i], boundary[i+1]).
The boundaries (one key per shard) are computed from the keys alone and passed as a side
input, so only keys, never samples, meet on one worker; the samples are then grouped by shard
index and each group is written by one worker.

Each tar has fixed header fields (mtime 0, uid/gid 0, mode 0644, no user names) and members
in key order then in contract order: the same input and config give byte-identical shards.
A shard is written to a temporary name beside its final one and renamed when complete, through
Beam's FileSystems (local paths and gs:// alike), so a killed or retried worker never leaves a
half-written tar under a final name.

Beside each tar, as img2dataset does, go two small sidecars describing it, written the same
way (atomically, byte-identical on a rerun with the same pyarrow version):
  NNNNNN.parquet      one row per sample (`PARQUET_SCHEMA`): key, status, caption and its parts,
                      identity, size, ref keys, mask foreground fraction, embedding norm
  NNNNNN_stats.json   the shard's counts and summary statistics (`shard_stats`)
They are written after the tar, the stats file last: a shard whose stats file exists is
complete. Every value in them is computed from the bytes that went into the tar, so a reader
can trust them instead of reading the tar (`prep inspect` does).
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import tarfile
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from prep.atomic import write_atomic
from prep.schemas import contract
from prep.schemas.contract import parquet_name, stats_name
from prep.schemas.records import SPECIFIC, Sample, ShardInfo
from prep.schemas.sidecars import PARQUET_SCHEMA
from prep.transforms.common import counter, fault_point
from prep.transforms.identity import face_embedding, identity_json
from prep.transforms.pair import Refs, attach_refs
from prep.transforms.views import ref_kinds_of

STAGE = "write"


# KEY.json holds contract.JSON_FIELDS; each is the Sample attribute of that name, except these.
# (A new per-sample field: a Sample field and its name in contract.JSON_FIELDS.)
_JSON_VALUES = {
    "identity": lambda s: s.identity if s.domain == SPECIFIC else None,
    "attributes": lambda s: dict(sorted(s.attributes.items())) if s.attributes else None,
    "caption": lambda s: s.caption or "",
    "ref_keys": lambda s: list(s.ref_keys),
    "schema_version": lambda s: contract.SCHEMA_VERSION,
}


def sample_json(sample: Sample) -> dict:
    meta = {
        name: _JSON_VALUES[name](sample) if name in _JSON_VALUES else getattr(sample, name)
        for name in contract.JSON_FIELDS
    }
    meta["origin"] = dict(sample.origin) if sample.origin else None
    meta["ref_kinds"] = ref_kinds_of(sample.ref_keys, sample.ref_kinds)
    meta.update(identity_json(sample))
    if sample.caption_flags:  # only on a flagged caption that was kept (--caption-on-bad keep)
        meta["caption_flags"] = list(sample.caption_flags)
    if sample.caption_contradictions:  # only where VLM words contradict the labels
        meta["caption_contradictions"] = [dict(c) for c in sample.caption_contradictions]
    if sample.source_meta is not None:  # only where the source has its own metadata
        meta["source_meta"] = sample.source_meta
    meta["attributes_source"] = sample.attributes_source or ("labels" if sample.attributes else None)
    if sample.attribute_probabilities is not None:  # only where an attribute probe ran
        meta["attribute_probabilities"] = dict(sorted(sample.attribute_probabilities.items()))
    if sample.attribute_doubts:  # only where the probe contradicts a label
        meta["attribute_doubts"] = [dict(d) for d in sample.attribute_doubts]
    return meta


def sample_members(sample: Sample) -> list[tuple[str, bytes]]:
    """The tar members of one sample, in contract order."""
    if sample.image_jpeg is None or sample.embedding is None or sample.refs is None:
        raise ValueError(f"sample {sample.key} is incomplete (image, embedding and refs are required)")
    members = {
        contract.EXT_IMAGE: sample.image_jpeg,
        contract.EXT_JSON: json.dumps(sample_json(sample), ensure_ascii=False, sort_keys=True).encode("utf-8"),
        contract.EXT_TEXT: (sample.caption or "").encode("utf-8"),
        contract.EXT_EMB: contract.npy_bytes(sample.embedding.astype("float32")),
        contract.EXT_REFS: contract.npy_bytes(sample.refs.astype("float32")),
    }
    if sample.domain == SPECIFIC:
        if sample.mask_png is None:
            raise ValueError(f"specific sample {sample.key} has no mask")
        members[contract.EXT_MASK] = sample.mask_png
        face = face_embedding(sample)
        if face is not None:
            members[contract.EXT_FACE] = contract.npy_bytes(face)
    return [(f"{sample.key}.{ext}", members[ext]) for ext in contract.MEMBER_ORDER if ext in members]


def tar_bytes(samples: Iterable[Sample]) -> bytes:
    return members_tar_bytes(m for sample in sorted(samples, key=lambda s: s.key) for m in sample_members(sample))


def members_tar_bytes(members: Iterable[tuple[str, bytes]]) -> bytes:
    """(name, bytes) members, in the order given, as a tar with the contract's fixed headers."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = contract.TAR_MTIME
            info.mode = contract.TAR_MODE
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# ----------------------------------------------------------------------------- sidecars

STATUS_SUCCESS = "success"


def mask_fraction(mask_png: bytes) -> float:
    """Foreground fraction of a 0/255 mask PNG: nonzero pixels / all pixels."""
    with Image.open(io.BytesIO(mask_png)) as mask:
        values = np.asarray(mask)
    return float(np.count_nonzero(values)) / values.size if values.size else 0.0


def embedding_norm(embedding: np.ndarray) -> float:
    """L2 norm of the float32 embedding as stored, computed in float64."""
    return float(np.linalg.norm(np.asarray(embedding, dtype=np.float32).astype(np.float64)))


@dataclass(frozen=True)
class ShardRow:
    """What the sidecars record of one sample (a row of the parquet file)."""

    key: str
    domain: str
    source: str
    identity: Optional[str]
    caption: str
    caption_vlm: Optional[str]
    caption_attributes: Optional[str]
    width: int
    height: int
    jpg_bytes: int
    ref_keys: tuple[str, ...]
    mask_fraction: Optional[float]
    emb_norm: float
    identity_status: Optional[str] = None
    identity_distance: Optional[float] = None
    identity_centre: Optional[str] = None
    near_duplicates: tuple[str, ...] = ()
    faces: Optional[int] = None
    face_fraction: Optional[float] = None
    caption_flags: tuple[str, ...] = ()
    contradicted: tuple[str, ...] = ()  # attributes the caption contradicts
    url: Optional[str] = None  # source_meta's url (img2dataset), for takedowns by URL
    doubted: tuple[str, ...] = ()  # attributes whose label the probe doubts
    attributes: tuple[tuple[str, bool], ...] = ()  # (name, value), sorted: the bias view (prep inspect)
    attributes_source: Optional[str] = None  # "labels" / "predicted"

    @property
    def caption_words(self) -> int:
        return len(self.caption.split())

    @classmethod
    def of(cls, sample: Sample) -> "ShardRow":
        """The row for a complete sample, from the same values `sample_members` writes."""
        if sample.image_jpeg is None or sample.embedding is None:
            raise ValueError(f"sample {sample.key} is incomplete (image and embedding are required)")
        return cls.from_members(sample_json(sample), sample.image_jpeg, sample.mask_png, sample.embedding)

    @classmethod
    def from_members(cls, meta: dict, image_jpeg: bytes, mask_png: Optional[bytes], embedding: np.ndarray) -> "ShardRow":
        """The row from a sample's members (its KEY.json, image, mask and embedding): what
        `of` computes, also for a sample read back from a shard (pipeline/chunks.py)."""
        return cls(
            key=meta["key"],
            domain=meta["domain"],
            source=meta["source"],
            identity=meta["identity"],
            caption=meta["caption"],
            caption_vlm=meta["caption_vlm"],
            caption_attributes=meta["caption_attributes"],
            width=int(meta["width"]),
            height=int(meta["height"]),
            jpg_bytes=len(image_jpeg),
            ref_keys=tuple(meta["ref_keys"]),
            mask_fraction=mask_fraction(mask_png) if meta["domain"] == SPECIFIC and mask_png else None,
            emb_norm=embedding_norm(embedding),
            identity_status=meta["identity_status"],
            identity_distance=meta["identity_distance"],
            identity_centre=meta["identity_centre"],
            near_duplicates=tuple(meta["near_duplicates"]),
            faces=meta["faces"],
            face_fraction=meta["face_fraction"],
            caption_flags=tuple(meta.get("caption_flags") or ()),
            contradicted=tuple(c["attribute"] for c in meta.get("caption_contradictions") or ()),
            url=source_url(meta.get("source_meta")),
            doubted=tuple(d["attribute"] for d in meta.get("attribute_doubts") or ()),
            attributes=tuple(sorted((str(k), bool(v)) for k, v in (meta.get("attributes") or {}).items())),
            attributes_source=meta.get("attributes_source") or ("labels" if meta.get("attributes") else None),
        )


def source_url(source_meta) -> Optional[str]:
    url = source_meta.get("url") if isinstance(source_meta, dict) else None
    return url if isinstance(url, str) else None


# Each PARQUET_SCHEMA column is the ShardRow attribute of that name, except these.
# (A new column: a field in schemas/sidecars.py and in ShardRow.)
_PARQUET_VALUES = {
    "status": lambda row: STATUS_SUCCESS,
    "error_message": lambda row: None,
    "ref_keys": lambda row: list(row.ref_keys),
    "ref_count": lambda row: len(row.ref_keys),
    "near_duplicates": lambda row: list(row.near_duplicates),
}


def parquet_bytes(rows: Sequence[ShardRow]) -> bytes:
    """The rows as a parquet file (PARQUET_SCHEMA), in the given order.

    The bytes depend only on the rows and the pyarrow version (which is recorded in the
    file's `created_by`): parquet-cpp writes no timestamps.
    """
    columns: dict[str, list[Any]] = {name: [] for name in PARQUET_SCHEMA.names}
    for row in rows:
        for name, values in columns.items():
            values.append(_PARQUET_VALUES[name](row) if name in _PARQUET_VALUES else getattr(row, name))
    table = pa.Table.from_pydict(columns, schema=PARQUET_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="snappy")
    return buf.getvalue()


def _tally(values) -> dict[str, int]:
    """value -> how many times it occurs, in sorted order."""
    return dict(sorted(Counter(values).items()))


def _status_counts(rows: Sequence[ShardRow]) -> dict[str, int]:
    return _tally(row.identity_status for row in rows if row.identity_status is not None)


def caption_flag_counts(rows: Sequence[ShardRow]) -> dict[str, int]:
    """flag -> rows written with it (the caption guards, --caption-on-bad keep)."""
    return _tally(flag for row in rows for flag in row.caption_flags)


def contradiction_counts(rows: Sequence[ShardRow]) -> dict[str, int]:
    """attribute -> rows whose VLM caption contradicts its label."""
    return _tally(attribute for row in rows for attribute in row.contradicted)


def attribute_counts(rows: Sequence[ShardRow]) -> dict[str, dict]:
    """{source: {"samples": n, "true": {attribute: samples where it is true}}} per attribute
    source ("labels", "predicted"): what the bias view of `prep inspect` adds up per split."""
    found: dict[str, dict] = {}
    for row in rows:
        if not row.attributes or row.attributes_source is None:
            continue
        entry = found.setdefault(row.attributes_source, {"samples": 0, "true": {}})
        entry["samples"] += 1
        for name, value in row.attributes:
            entry["true"][name] = entry["true"].get(name, 0) + int(value)
    return {s: {"samples": e["samples"], "true": dict(sorted(e["true"].items()))} for s, e in sorted(found.items())}


def doubt_counts(rows: Sequence[ShardRow]) -> dict[str, int]:
    """attribute -> rows whose label the attribute probe doubts."""
    return _tally(attribute for row in rows for attribute in row.doubted)


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """{"count", "min", "max", "mean"} of some numbers (min/max/mean null when there are none)."""
    if not values:
        return {"count": 0, "min": None, "max": None, "mean": None}
    return {"count": len(values), "min": min(values), "max": max(values), "mean": sum(values) / len(values)}


def shard_stats(rows: Sequence[ShardRow], *, shard: str, domain: str, tar_size: int, sha256: str) -> dict[str, Any]:
    """The `NNNNNN_stats.json` object of one shard (img2dataset's count/successes/status_dict,
    plus per-domain, per-source and per-field summaries). No timestamps: reruns are identical."""
    sources: dict[str, int] = {}
    for row in rows:
        sources[row.source] = sources.get(row.source, 0) + 1
    masks = [r.mask_fraction for r in rows if r.mask_fraction is not None]
    flags = caption_flag_counts(rows)
    contradicted = contradiction_counts(rows)
    doubted = doubt_counts(rows)
    attributes = attribute_counts(rows)
    return {
        "schema_version": contract.SCHEMA_VERSION,
        "shard": shard,
        "domain": domain,
        "count": len(rows),
        "successes": len(rows),
        "status_dict": {STATUS_SUCCESS: len(rows)} if rows else {},
        "bytes": tar_size,
        "sha256": sha256,
        "first_key": rows[0].key if rows else None,
        "last_key": rows[-1].key if rows else None,
        "domains": {domain: len(rows)},
        "sources": dict(sorted(sources.items())),
        "identities": len({r.identity for r in rows if r.identity is not None}),
        "caption_words": summarize([r.caption_words for r in rows]),
        "caption_chars": summarize([len(r.caption) for r in rows]),
        "with_caption_vlm": sum(1 for r in rows if r.caption_vlm),
        "with_caption_attributes": sum(1 for r in rows if r.caption_attributes),
        "mask_fraction": summarize(masks),
        "refs_per_sample": {**summarize([len(r.ref_keys) for r in rows]), "total": sum(len(r.ref_keys) for r in rows)},
        "emb_norm": summarize([r.emb_norm for r in rows]),
        "identity_status": _status_counts(rows),
        "width": summarize([r.width for r in rows]),
        "height": summarize([r.height for r in rows]),
        "jpg_bytes": {**summarize([r.jpg_bytes for r in rows]), "total": sum(r.jpg_bytes for r in rows)},
        **({"caption_flags": flags} if flags else {}),  # only when a flagged caption was kept
        **({"caption_contradictions": contradicted} if contradicted else {}),
        **({"attribute_doubts": doubted} if doubted else {}),
        **({"attributes": attributes} if attributes else {}),  # per source: samples, and true per attribute
    }


def stats_bytes(stats: dict[str, Any]) -> bytes:
    return json.dumps(stats, indent=1, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n"


def shard_boundaries(keys: list[str], samples_per_shard: int) -> list[str]:
    ordered = sorted(keys)
    return ordered[::samples_per_shard]


class _Boundaries(beam.CombineFn):
    """All keys -> the first key of each shard. Holds keys only (tens of bytes each)."""

    def __init__(self, samples_per_shard: int):
        self._n = samples_per_shard

    def create_accumulator(self):
        return []

    def add_input(self, acc, key):
        acc.append(key)
        return acc

    def merge_accumulators(self, accs):
        merged = []
        for acc in accs:
            merged.extend(acc)
        return merged

    def extract_output(self, acc):
        return shard_boundaries(acc, self._n)


def _shard_index(sample: Sample, boundaries: list[str], first: int = 0) -> tuple[int, Sample]:
    return first + bisect.bisect_right(boundaries, sample.key) - 1, sample


def _refs_shard_index(entry: tuple[str, Refs], boundaries: list[str], first: int = 0) -> tuple[int, tuple[str, Refs]]:
    return first + bisect.bisect_right(boundaries, entry[0]) - 1, entry


class _WriteShard(beam.DoFn):
    def __init__(self, out_dir: str, split: str, domain: str, kept: frozenset[int] = frozenset()):
        self._dir = f"{out_dir.rstrip('/')}/{contract.shard_folder(split, domain)}"
        self._split, self._domain = split, domain
        self._kept = kept
        self._shards = counter(STAGE, f"{domain}_shards")
        self._samples = counter(STAGE, f"{domain}_samples")

    def process(self, element):
        index, grouped = element
        samples = list(grouped["samples"])
        if index in self._kept:
            # Resume keeps complete shards on the promise that the remaining samples fall
            # elsewhere; a sample that failed in the killed run but passes now breaks it.
            raise ValueError(
                f"resume: {samples[0].key} now falls in shard {index}, which the interrupted run already "
                f"completed (its dead letters were not the same as this run's); rerun with --overwrite"
            )
        refs = dict(grouped["refs"])
        if refs:  # specific samples: attach the refs chosen by pairing (joined here, by key)
            missing = [s.key for s in samples if s.key not in refs]
            if missing or len(refs) != len(samples):
                raise ValueError(f"shard {index}: refs missing for {missing[:3]} or refs without samples")
            samples = [attach_refs(s, refs[s.key]) for s in samples]
        samples = sorted(samples, key=lambda s: s.key)
        info = write_shard_files(self._dir, self._split, self._domain, index, tar_bytes(samples),
                                 [ShardRow.of(s) for s in samples])
        self._shards.inc()
        self._samples.inc(len(samples))
        yield info


def write_shard_files(folder: str, split: str, domain: str, index: int, data: bytes, rows: Sequence[ShardRow]) -> ShardInfo:
    """One shard's tar (`data`) and its sidecars, atomically: the tar, then the parquet, then the
    stats (a shard whose stats file exists is complete). The writer and the chunk stitcher
    (pipeline/chunks.py) both write through here."""
    name = contract.shard_name(index)
    sha256 = hashlib.sha256(data).hexdigest()
    stats = shard_stats(rows, shard=name, domain=domain, tar_size=len(data), sha256=sha256)
    write_atomic(f"{folder}/{name}", data)
    fault_point("write.after_tar")
    write_atomic(f"{folder}/{parquet_name(name)}", parquet_bytes(rows))
    write_atomic(f"{folder}/{stats_name(name)}", stats_bytes(stats))
    return ShardInfo(domain=domain, name=name, count=len(rows), sha256=sha256, bytes=len(data), split=split,
                     caption_flags=caption_flag_counts(rows), caption_contradictions=contradiction_counts(rows),
                     attribute_doubts=doubt_counts(rows))


class WriteShards(beam.PTransform):
    """Samples of one (split, domain) -> tars (and their parquet and stats sidecars) in
    OUT/<contract.shard_folder(split, domain)>/; outputs one ShardInfo per shard.

    `refs`: (key, Refs) from PairByIdentity; each sample's refs are attached where its shard is
    written (the samples are grouped by shard here anyway: no extra shuffle of samples).

    `done_keys`: keys already written in complete shards by an interrupted run (resume). They
    take part in the shard boundaries, so the remaining samples land in exactly the shards an
    uninterrupted run would give them, and those complete shards are not written again.
    """

    def __init__(
        self,
        out_dir: str,
        split: str,
        domain: str,
        samples_per_shard: int,
        done_keys: Sequence[str] = (),
        first_index: int = 0,
        refs=None,
        kept_indices: Sequence[int] = (),
    ):
        super().__init__()
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")
        self._out, self._split, self._domain, self._n = out_dir, split, domain, samples_per_shard
        self._done = sorted(done_keys)
        self._first = first_index  # --retry-dead-letter appends shards after the existing ones
        self._refs = refs  # PCollection of (key, Refs) from PairByIdentity, or None (samples carry theirs)
        self._kept = frozenset(kept_indices)  # resume: complete shards that must not be written again

    def expand(self, samples):
        keys = samples | "Keys" >> beam.Map(lambda s: s.key)
        if self._done:
            done = samples.pipeline | "DoneKeys" >> beam.Create(self._done)
            keys = (keys, done) | "AllKeys" >> beam.Flatten()
        boundaries = beam.pvalue.AsSingleton(keys | "ShardBoundaries" >> beam.CombineGlobally(_Boundaries(self._n)))
        by_shard = {
            "samples": samples
            | "AssignShard"
            >> beam.Map(_shard_index, boundaries=boundaries, first=self._first).with_output_types(tuple[int, Sample]),
            "refs": (self._refs if self._refs is not None else samples.pipeline | "NoRefs" >> beam.Create([]))
            | "AssignRefsShard" >> beam.Map(_refs_shard_index, boundaries=boundaries, first=self._first).with_output_types(
                tuple[int, tuple[str, Refs]]
            ),
        }
        return (
            by_shard
            | "GroupByShard" >> beam.CoGroupByKey()
            | "WriteTar" >> beam.ParDo(_WriteShard(self._out, self._split, self._domain, self._kept))
        )
