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
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import tarfile
import uuid
from typing import Iterable

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from prep.schemas import contract
from prep.schemas.records import SPECIFIC, Sample, ShardInfo
from prep.transforms.common import counter

STAGE = "write"


def sample_json(sample: Sample) -> dict:
    return {
        "key": sample.key,
        "domain": sample.domain,
        "source": sample.source,
        "identity": sample.identity if sample.domain == SPECIFIC else None,
        "attributes": dict(sorted(sample.attributes.items())) if sample.attributes else None,
        "caption_vlm": sample.caption_vlm,
        "caption_attributes": sample.caption_attributes,
        "caption": sample.caption or "",
        "width": sample.width,
        "height": sample.height,
        "ref_keys": list(sample.ref_keys),
        "schema_version": contract.SCHEMA_VERSION,
    }


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
    return [(f"{sample.key}.{ext}", members[ext]) for ext in contract.MEMBER_ORDER if ext in members]


def tar_bytes(samples: Iterable[Sample]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in sorted(samples, key=lambda s: s.key):
            for name, data in sample_members(sample):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = contract.TAR_MTIME
                info.mode = contract.TAR_MODE
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_atomic(path: str, data: bytes) -> None:
    """Write `data` to `path` via a temporary sibling and a rename."""
    directory, name = path.rsplit("/", 1)
    tmp = f"{directory}/.{name}.tmp-{uuid.uuid4().hex[:12]}"
    with FileSystems.create(tmp) as f:
        f.write(data)
    FileSystems.rename([tmp], [path])  # os.rename locally (atomic replace); copy+delete on GCS


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


def _shard_index(sample: Sample, boundaries: list[str]) -> tuple[int, Sample]:
    return bisect.bisect_right(boundaries, sample.key) - 1, sample


class _WriteShard(beam.DoFn):
    def __init__(self, out_dir: str, domain: str):
        self._dir = f"{out_dir.rstrip('/')}/{domain}"
        self._domain = domain
        self._shards = counter(STAGE, f"{domain}_shards")
        self._samples = counter(STAGE, f"{domain}_samples")

    def process(self, element):
        index, samples = element
        samples = sorted(samples, key=lambda s: s.key)
        data = tar_bytes(samples)
        name = contract.shard_name(index)
        write_atomic(f"{self._dir}/{name}", data)
        self._shards.inc()
        self._samples.inc(len(samples))
        yield ShardInfo(
            domain=self._domain,
            name=name,
            count=len(samples),
            sha256=hashlib.sha256(data).hexdigest(),
            bytes=len(data),
            keys_first=samples[0].key,
            keys_last=samples[-1].key,
        )


class WriteShards(beam.PTransform):
    """Samples of one domain -> tars under OUT/<domain>/; outputs one ShardInfo per shard."""

    def __init__(self, out_dir: str, domain: str, samples_per_shard: int):
        super().__init__()
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")
        self._out, self._domain, self._n = out_dir, domain, samples_per_shard

    def expand(self, samples):
        boundaries = (
            samples
            | "Keys" >> beam.Map(lambda s: s.key)
            | "ShardBoundaries" >> beam.CombineGlobally(_Boundaries(self._n))
        )
        return (
            samples
            | "AssignShard" >> beam.Map(_shard_index, boundaries=beam.pvalue.AsSingleton(boundaries))
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteTar" >> beam.ParDo(_WriteShard(self._out, self._domain))
        )
