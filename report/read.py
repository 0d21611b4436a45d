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
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

import pyarrow.parquet as pq

from prep.schemas import contract, output
from prep.schemas.output import READ_ERRORS, Shard, list_shards, manifest_shard_counts, read_bytes, read_manifest  # noqa: F401
from prep.schemas.records import DOMAINS, SPECIFIC, DeadLetterKind
from prep.schemas.sidecars import PARQUET_SCHEMA
from prep.transforms.write import embedding_norm, mask_fraction

_SIDECAR_COLUMNS = ("key", "domain", "identity", "caption", "ref_keys", "mask_fraction", "emb_norm")
# The identity columns (contract.JSON_IDENTITY_FIELDS in the sidecar), read when the sidecar has them.
_VERDICT_COLUMNS = ("source", "identity_status", "identity_distance", "identity_centre", "near_duplicates", "faces")


def _verdict(values: dict) -> Optional[dict]:
    """The identity fields of one sample for the identity view; None when it was not verified."""
    if values.get("identity_status") is None:
        return None
    return {name: values.get(name) for name in _VERDICT_COLUMNS}
_EXAMPLES_PER_REASON = 3


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
    for name, path in output.dead_letter_files(out_dir).items():
        rel = f"{contract.DEAD_LETTER_DIR}/{name}"
        try:
            for line in output.iter_dead_letter_lines(path, rel):
                if line.error is not None:
                    summary.problems.append(f"{rel}:{line.lineno}: not valid JSON")
                    continue
                letter = line.letter
                if not isinstance(letter, dict):
                    summary.problems.append(f"{rel}:{line.lineno}: not an object")
                    continue
                stage = str(letter.get("stage") or "?")
                try:
                    kind = DeadLetterKind.of_letter(letter).value
                except ValueError:
                    kind = str(letter.get("kind"))
                reason = contract.reason_count_key(stage, kind)
                summary.total += 1
                reasons[reason] += 1
                stages[stage] += 1
                shown = summary.examples.setdefault(reason, [])
                if len(shown) < examples:
                    shown.append(letter)
        except READ_ERRORS as e:
            summary.problems.append(f"{rel}: cannot be read ({e})")
    summary.by_reason = dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
    summary.by_stage = dict(sorted(stages.items(), key=lambda kv: (-kv[1], kv[0])))
    return summary


@dataclass(slots=True)
class Entry:
    """One sample as pass 1 remembers it."""

    shard: int  # index into OutputIndex.shards
    domain: str
    identity: Optional[str]
    ref_keys: tuple[str, ...]
    verdict: Optional[dict] = None  # the identity fields (identity_view reads them), when verified


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
        verdict: Optional[dict] = None,
    ) -> None:
        if key in self.entries:
            first = self.shards[self.entries[key].shard].rel
            self.problems.append(f"{self.shards[shard].rel}: {key}: duplicate key, also in {first}")
            return
        refs = tuple(ref_keys)
        self.entries[key] = Entry(shard, domain, identity, refs, verdict)
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


def _index_sidecar(index: OutputIndex, i: int, expected: Optional[int]) -> bool:
    """Read shard i's parquet sidecar into `index`; False (nothing added) when it is unusable:
    unreadable, other columns, or a row count that disagrees with the manifest."""
    shard = index.shards[i]
    try:
        data = read_bytes(shard.sidecar)
        names = set(pq.read_schema(io.BytesIO(data)).names)
        extra = [c for c in _VERDICT_COLUMNS if c in names]
        table = pq.read_table(io.BytesIO(data), columns=list(_SIDECAR_COLUMNS) + extra)
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
            verdict=_verdict(r),
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
            verdict=_verdict(meta),
        )


def _iter_shard(shard: Shard, problems: list[str], wanted: Optional[set[str]] = None) -> Iterator[dict[str, Any]]:
    """Decoded samples of one shard (only `wanted` keys when given). A sample whose members do
    not decode is skipped; a broken tar stream ends the shard. Both go to `problems`."""
    read = 0
    try:
        with output.open_read(shard.path) as f:
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

