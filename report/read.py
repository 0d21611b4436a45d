"""Reading an output folder for the report, in two passes, through Beam's FileSystems (local
paths and gs:// alike).

Pass 1 (`index_output`) visits every shard once and keeps, per sample, only what choosing and
placing the contact sheet needs (`Entry`: shard, domain, identity, ref keys) plus the numbers
the charts plot. Where the writer's parquet sidecar (`NNNNNN.parquet`) is beside a tar it is
read instead of the tar: kilobytes instead of the images. Outputs without sidecars, or with a
sidecar that does not match the manifest, are read from the tars themselves.

Pass 2 (`fetch_samples`) opens only the shards that hold the chosen samples and their
references, and decodes only those samples.

Shards are read with the contract's own reader (`iter_samples` / `decode_sample`: no pickles,
safe member names, bounded sizes). A shard that cannot be read is reported as a problem and the
rest of the output is still read.
"""

from __future__ import annotations

import io
import json
import lzma
import re
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

import pyarrow.parquet as pq
from apache_beam.io.filesystem import BeamIOError, CompressionTypes
from apache_beam.io.filesystems import FileSystems

from prep.schemas import contract
from prep.schemas.records import DOMAINS, SPECIFIC, DeadLetterKind
from prep.transforms.write import PARQUET_SCHEMA, embedding_norm, mask_fraction, parquet_name

_SHARD_NAME = re.compile(rf"^\d{{{contract.SHARD_DIGITS}}}\.tar$")
# What a broken tar stream, a malformed member or an unreadable file can raise while read.
READ_ERRORS = (tarfile.TarError, ValueError, EOFError, OSError, zlib.error, lzma.LZMAError)
_SIDECAR_COLUMNS = ("key", "domain", "identity", "caption", "ref_keys", "mask_fraction", "emb_norm")
_EXAMPLES_PER_REASON = 3


def _open(path: str):
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def read_bytes(path: str) -> bytes:
    with _open(path) as f:
        return f.read()


def list_names(folder: str) -> dict[str, str]:
    """Base name -> full path of the files directly inside `folder` (empty if there is none)."""
    try:
        (result,) = FileSystems.match([FileSystems.join(folder, "*")])
    except BeamIOError:
        return {}
    names = {}
    for meta in result.metadata_list:
        name = meta.path.rstrip("/").rsplit("/", 1)[-1]
        names[name] = meta.path
    return names


def read_manifest(out_dir: str) -> Optional[dict]:
    """OUT/manifest.json as a dict, or None when there is none (or it is not a JSON object)."""
    path = FileSystems.join(out_dir, contract.MANIFEST)
    try:
        data = json.loads(read_bytes(path).decode("utf-8"))
    except (OSError, BeamIOError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


@dataclass
class DeadLetters:
    """The dead-letter files, counted per "stage: reason class", with a few examples of each."""

    total: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    by_stage: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[dict]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def read_dead_letters(out_dir: str, *, examples: int = _EXAMPLES_PER_REASON) -> DeadLetters:
    """Stream OUT/dead_letter/*.jsonl (memory bounded by the number of reason classes)."""
    summary = DeadLetters()
    reasons: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    files = list_names(FileSystems.join(out_dir, contract.DEAD_LETTER_DIR))
    for name in sorted(files):
        if not name.endswith(".jsonl") or name.startswith("."):
            continue
        try:
            with _open(files[name]) as f:
                for lineno, raw in enumerate(f, start=1):
                    if not raw.strip():
                        continue
                    try:
                        letter = json.loads(raw.decode("utf-8"))
                    except (UnicodeDecodeError, json.JSONDecodeError):
                        summary.problems.append(f"{contract.DEAD_LETTER_DIR}/{name}:{lineno}: not valid JSON")
                        continue
                    if not isinstance(letter, dict):
                        summary.problems.append(f"{contract.DEAD_LETTER_DIR}/{name}:{lineno}: not an object")
                        continue
                    stage = str(letter.get("stage") or "?")
                    reason = contract.reason_count_key(stage, DeadLetterKind.of_letter(letter).value)
                    summary.total += 1
                    reasons[reason] += 1
                    stages[stage] += 1
                    shown = summary.examples.setdefault(reason, [])
                    if len(shown) < examples:
                        shown.append(letter)
        except (OSError, BeamIOError) as e:
            summary.problems.append(f"{contract.DEAD_LETTER_DIR}/{name}: cannot be read ({e})")
    summary.by_reason = dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
    summary.by_stage = dict(sorted(stages.items(), key=lambda kv: (-kv[1], kv[0])))
    return summary


TRAIN = "train"
_SPLIT_ORDER = (TRAIN, "val", "test")


@dataclass(frozen=True)
class Shard:
    split: str  # "train" shards live in OUT/<domain>/, other splits in OUT/<split>/<domain>/
    domain: str
    name: str  # "000000.tar"
    path: str
    sidecar: Optional[str]  # path of NNNNNN.parquet when it exists

    @property
    def folder(self) -> str:
        return self.domain if self.split == TRAIN else f"{self.split}/{self.domain}"

    @property
    def rel(self) -> str:
        return f"{self.folder}/{self.name}"


def list_shards(out_dir: str) -> list[Shard]:
    """Every shard: OUT/<domain>/NNNNNN.tar (train) and OUT/<split>/<domain>/NNNNNN.tar (other
    splits), in split, domain and name order; temporary files are left out."""
    folders: dict[tuple[str, str], dict[str, str]] = {}
    for domain in DOMAINS:
        folders[(TRAIN, domain)] = list_names(FileSystems.join(out_dir, domain))
        # One glob finds every split folder (it works on object stores, which have no folders).
        try:
            (result,) = FileSystems.match([FileSystems.join(out_dir, "*", domain, "*")])
            found = [m.path for m in result.metadata_list]
        except BeamIOError:
            found = []
        for path in found:
            parts = path.rstrip("/").split("/")
            if len(parts) >= 3 and parts[-3] not in DOMAINS:
                folders.setdefault((parts[-3], domain), {})[parts[-1]] = path
    rank = {s: i for i, s in enumerate(_SPLIT_ORDER)}
    shards = []
    for split, domain in sorted(folders, key=lambda f: (rank.get(f[0], len(rank)), f[0], DOMAINS.index(f[1]))):
        files = folders[(split, domain)]
        for name in sorted(n for n in files if _SHARD_NAME.match(n)):
            shards.append(Shard(split, domain, name, files[name], files.get(parquet_name(name))))
    return shards


@dataclass(slots=True)
class Entry:
    """One sample as pass 1 remembers it."""

    shard: int  # index into OutputIndex.shards
    domain: str
    identity: Optional[str]
    ref_keys: tuple[str, ...]


@dataclass
class OutputIndex:
    """What pass 1 found: where every sample is, and the numbers the charts plot."""

    shards: list[Shard] = field(default_factory=list)
    entries: dict[str, Entry] = field(default_factory=dict)
    caption_words: dict[str, list[int]] = field(default_factory=lambda: {d: [] for d in DOMAINS})
    mask_fraction: list[float] = field(default_factory=list)  # specific samples
    refs_per_sample: list[int] = field(default_factory=list)  # specific samples
    emb_norm: list[float] = field(default_factory=list)  # specific samples (general ones are 0)
    general_nonzero_emb: int = 0
    from_sidecar: int = 0  # shards read from their parquet sidecar
    problems: list[str] = field(default_factory=list)

    def found(self) -> dict[str, int]:
        counts = Counter(e.domain for e in self.entries.values())
        return {d: counts.get(d, 0) for d in DOMAINS}

    def found_by_folder(self) -> dict[str, int]:
        """Samples per shard folder ("specific", "general", "val/specific", ...)."""
        counts = Counter(self.shards[e.shard].folder for e in self.entries.values())
        return {s.folder: counts.get(s.folder, 0) for s in self.shards}

    def images_per_identity(self) -> dict[str, int]:
        return dict(Counter(e.identity for e in self.entries.values() if e.domain == SPECIFIC and e.identity))

    def add(
        self,
        shard: int,
        *,
        key: str,
        domain: str,
        identity: Optional[str],
        caption: str,
        ref_keys: Iterable[str],
        mask_fraction: Optional[float],
        emb_norm: Optional[float],
    ) -> None:
        if key in self.entries:
            first = self.shards[self.entries[key].shard].rel
            self.problems.append(f"{self.shards[shard].rel}: {key}: duplicate key, also in {first}")
            return
        refs = tuple(ref_keys)
        self.entries[key] = Entry(shard, domain, identity, refs)
        self.caption_words.setdefault(domain, []).append(len(caption.split()))
        if domain == SPECIFIC:
            self.refs_per_sample.append(len(refs))
            if mask_fraction is not None:
                self.mask_fraction.append(mask_fraction)
            if emb_norm is not None:
                self.emb_norm.append(emb_norm)
        elif emb_norm:
            self.general_nonzero_emb += 1


def index_output(out_dir: str, manifest: Optional[dict], *, use_sidecars: bool = True) -> OutputIndex:
    """Pass 1 over every shard of `out_dir`."""
    index = OutputIndex(shards=list_shards(out_dir))
    listed = manifest_shard_counts(manifest)
    for i, shard in enumerate(index.shards):
        if use_sidecars and shard.sidecar is not None and _index_sidecar(index, i, listed.get(shard.rel)):
            index.from_sidecar += 1
        else:
            _index_tar(index, i)
    return index


def manifest_shard_counts(manifest: Optional[dict]) -> dict[str, int]:
    """Shard path relative to OUT -> count, from the manifest's shard list."""
    counts = {}
    for entry in (manifest or {}).get("shards", []) or []:
        if isinstance(entry, dict) and isinstance(entry.get("count"), int):
            split = entry.get("split") or TRAIN
            folder = entry.get("domain") if split == TRAIN else f"{split}/{entry.get('domain')}"
            counts[f"{folder}/{entry.get('name')}"] = entry["count"]
    return counts


def _index_sidecar(index: OutputIndex, i: int, expected: Optional[int]) -> bool:
    """Read shard i's parquet sidecar into `index`; False (nothing added) when it is unusable:
    unreadable, other columns, or a row count that disagrees with the manifest."""
    shard = index.shards[i]
    try:
        table = pq.read_table(io.BytesIO(read_bytes(shard.sidecar)), columns=list(_SIDECAR_COLUMNS))
    except Exception:  # pyarrow raises many types on a malformed or foreign file; all mean "unusable"
        return False
    for name in _SIDECAR_COLUMNS:
        if table.schema.field(name).type != PARQUET_SCHEMA.field(name).type:
            return False
    if expected is not None and table.num_rows != expected:
        return False
    rows = table.to_pylist()
    if len({r["key"] for r in rows}) != len(rows) or any(r["domain"] != shard.domain for r in rows):
        return False
    for r in rows:
        index.add(
            i,
            key=r["key"],
            domain=r["domain"],
            identity=r["identity"],
            caption=r["caption"] or "",
            ref_keys=r["ref_keys"] or (),
            mask_fraction=r["mask_fraction"],
            emb_norm=r["emb_norm"],
        )
    return True


def _index_tar(index: OutputIndex, i: int) -> None:
    shard = index.shards[i]
    for sample in _iter_shard(shard, index.problems):
        meta = sample.get(contract.EXT_JSON)
        meta = meta if isinstance(meta, dict) else {}
        mask = sample.get(contract.EXT_MASK)
        emb = sample.get(contract.EXT_EMB)
        caption = sample.get(contract.EXT_TEXT)
        try:
            fraction = mask_fraction(mask) if isinstance(mask, bytes) else None
        except Exception:  # PIL raises many types on a malformed PNG; the chart just lacks it
            fraction = None
            index.problems.append(f"{shard.rel}: {sample['__key__']}.{contract.EXT_MASK}: does not decode")
        refs = meta.get("ref_keys")
        index.add(
            i,
            key=sample["__key__"],
            domain=shard.domain,
            identity=meta.get("identity") if isinstance(meta.get("identity"), str) else None,
            caption=caption if isinstance(caption, str) else str(meta.get("caption") or ""),
            ref_keys=[r for r in refs if isinstance(r, str)] if isinstance(refs, list) else (),
            mask_fraction=fraction,
            emb_norm=embedding_norm(emb) if emb is not None and getattr(emb, "ndim", 0) == 1 else None,
        )


def _iter_shard(shard: Shard, problems: list[str], wanted: Optional[set[str]] = None) -> Iterator[dict[str, Any]]:
    """Decoded samples of one shard (only `wanted` keys when given). A sample whose members do
    not decode is skipped; a broken tar stream ends the shard. Both go to `problems`."""
    read = 0
    try:
        with _open(shard.path) as f:
            for raw in contract.iter_samples(f):
                read += 1
                if wanted is not None and raw["__key__"] not in wanted:
                    continue
                try:
                    sample = contract.decode_sample(raw)
                except ValueError as e:  # JSON, UTF-8 and .npy errors are all ValueErrors
                    problems.append(f"{shard.rel}: {raw['__key__']}: does not decode ({type(e).__name__}: {e})")
                    continue
                yield sample
    except READ_ERRORS as e:
        problems.append(f"{shard.rel}: unreadable after {read} samples ({type(e).__name__}: {e})")


def fetch_samples(index: OutputIndex, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Pass 2: the decoded samples (`decode_sample` form) of `keys`, reading only their shards."""
    by_shard: dict[int, set[str]] = {}
    for key in keys:
        entry = index.entries.get(key)
        if entry is not None:
            by_shard.setdefault(entry.shard, set()).add(key)
    found: dict[str, dict[str, Any]] = {}
    for i in sorted(by_shard):
        for sample in _iter_shard(index.shards[i], index.problems, by_shard[i]):
            found.setdefault(sample["__key__"], sample)
    return found

