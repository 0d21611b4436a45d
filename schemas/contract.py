"""The shard contract, version 1. Consumers (the trainer, `prep validate`, other readers)
depend on exactly this; change it only with a new SCHEMA_VERSION.

Output directory OUT (this module is the one place that names its files and folders;
`schemas.output` is the one reader of it):
  OUT/<folder>/NNNNNN.tar             WebDataset shards; <folder> = shard_folder(split, domain):
                                      "<domain>" for train, "<split>/<domain>" for val and test
  OUT/<folder>/NNNNNN.parquet         per-sample sidecar (schemas.sidecars.PARQUET_SCHEMA)
  OUT/<folder>/NNNNNN_stats.json      per-shard stats, written last (the shard is complete)
  OUT/<folder>/sizes.json             {"000000.tar": count, ...}
  OUT/<folder>/index.wids.json        wids shard index
  OUT/manifest.json                   MANIFEST_FIELDS: schema_version, config, models, counts, shards
  OUT/dead_letter/000000.jsonl        {"key", "source", "stage", "kind", "reason", "path"}
  OUT/_run.json, OUT/_retry.json, OUT/_plan/   run bookkeeping (resume digest, retry plan, staged inputs)
Exactly these files (and their temporary siblings) are prep's (`is_run_file`): `--overwrite`
removes them and nothing else under OUT.

Per sample, tar members KEY.<ext> (KEY: [A-Za-z0-9_-]+, unique, stable across runs). A key is
`<namespace>_<rest>`: the namespace of its input (transforms/sources/planning.input_namespaces:
the input's NAME from `--input NAME=KIND:LOC`, else its kind, numbered from the second unnamed
input of a kind on: wds, wds1, ...), the rest from the input (celeba: the image stem; folder:
identity and image stem; wds: the member key in its tar). A run with one input of each kind
has the keys v1 always had (celeba_000001, wds_000000000); v1 promised only the character set,
uniqueness and stability, so schema_version stays 1:
  KEY.jpg       RGB image
  KEY.txt       final caption, UTF-8
  KEY.json      metadata (JSON_FIELDS)
  KEY.emb.npy   float32 [D], unit norm (all zeros for general)
  KEY.refs.npy  float32 [K, D], row i == emb of ref_keys[i]
  KEY.mask.png  (specific only) 8-bit single channel, values {0, 255}, image size
  KEY.face.npy  (specific, face identity model, a face chosen) float32 [F]: that face's descriptor

Additions to v1 (readers of v1 ignore JSON fields and members they do not know; every
field below is written by this version, null / [] where it does not apply):
  JSON_IDENTITY_FIELDS  the identity step's evidence: face box/landmarks/share, verdict,
                        distance to the identity's centre, near-duplicates, ref distances, hashes
  "origin"              lineage: {"input": n, "path": file path relative to the input root}
                        or {"input": n, "tar": tar path relative to the pattern's folder,
                        "member": the key inside the tar}; n indexes the manifest's
                        config.inputs (relative paths: shards do not change when data moves)
  "source_meta"         (present where the source has it) the source's own per-sample metadata,
                        verbatim: img2dataset's KEY.json (url, sha256, exif, ...), LSUN's key;
                        at most SOURCE_META_MAX_BYTES (the largest fields dropped, named in "_dropped")
  "ref_kinds"           one per ref_keys[i]: "identity" (another photo of the identity) or
                        "augmented" (a view of the sample's own image, key "<key>#aug<j>",
                        --singleton-refs; transforms/views.py); absent in older outputs: all identity
  KEY.face.npy          optional member (above)
  manifest "beam_options"  the Beam pipeline options given to `prep run`, as given (values of
                        credential options such as --s3_secret_access_key "<redacted>");
                        written only when there were any
  manifest "stage_fingerprints"  {caption, mask, embed: sha256 of what decides that stage's output}
                        (pipeline/reuse.py; --reuse compares them)
  manifest "reused_from"  (--reuse runs) the earlier output, its manifest sha256, per stage the
                        samples reused and computed, notes, unreadable samples, in_place
  manifest "attribute_doubts"  (--attribute-model) attribute -> samples whose label the probe
                        doubts; also per shard entry and in NNNNNN_stats.json
  NNNNNN_stats.json "attributes"  per attributes_source: samples, and true per attribute
  manifest "weights"    (prep weights) the balance, split, cap, groups, shares; the weights are
                        NNNNNN_weights.parquet (key, weight, group) beside each shard
schema_version stays 1: nothing a v1 reader relies on changed meaning, and outputs written
before these additions still validate (the fields are checked when present).

Everything here is plain Python + numpy, so a reader needs nothing from the pipeline.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from typing import Iterator

import numpy as np

SCHEMA_VERSION = 1

SPECIFIC = "specific"
GENERAL = "general"
DOMAINS = (SPECIFIC, GENERAL)
# Identity-disjoint splits: train shards in OUT/<domain>/, the others in OUT/<split>/<domain>/.
TRAIN = "train"
SPLITS = (TRAIN, "val", "test")

MANIFEST = "manifest.json"
# The dataset card: OUT/README.md, whose YAML `configs` tell Hugging Face `datasets` (and the
# hub's viewer) one config per domain and its splits, so `load_dataset(OUT, "specific")` works.
DATASET_CARD = "README.md"
HF_SPLIT_NAMES = {TRAIN: "train", "val": "validation", "test": "test"}  # datasets' own names
SIZES = "sizes.json"
WIDS_INDEX = "index.wids.json"
WIDS_KIND = "wids-shard-index-v1"
DEAD_LETTER_DIR = "dead_letter"
DEAD_LETTER_SUFFIX = ".jsonl"
DEAD_LETTER_FILE = f"{DEAD_LETTER_DIR}/000000{DEAD_LETTER_SUFFIX}"  # the one file the pipeline writes
SHARD_DIGITS = 6
SHARD_SUFFIX = ".tar"
PARQUET_SUFFIX = ".parquet"
STATS_SUFFIX = "_stats.json"
WEIGHTS_SUFFIX = "_weights.parquet"  # `prep weights`: per-sample sampling weights (report/weights.py)
_SHARD_NAME = re.compile(rf"^\d{{{SHARD_DIGITS}}}\.tar$")
# Run bookkeeping beside the outputs (not part of what consumers read).
RUN_STATE = "_run.json"  # resume digest and config, written first
RETRY_PLAN = "_retry.json"  # a retry's plan, kept until its manifest is written
PLAN_DIR = "_plan"  # staged input items of a large run
CHUNKS_DIR = "_chunks"  # a chunked local run's chunks (pipeline/chunks.py), removed once it is complete
# What a run writes directly under OUT: `prep run` refuses or clears an OUT holding any of them.
OUTPUT_ENTRIES = (MANIFEST, DEAD_LETTER_DIR, *DOMAINS, *SPLITS[1:])
RUN_ENTRIES = (*OUTPUT_ENTRIES, DATASET_CARD, RUN_STATE, RETRY_PLAN, PLAN_DIR, CHUNKS_DIR)
# The first line after the card's YAML header: a README.md without it is the user's, never
# prep's to remove.
DATASET_CARD_MARK = "<!-- dataset card written by prep; regenerated by each run -->"
# atomic.write_atomic's temporary sibling of NAME: ".NAME.tmp-<12 hex>".
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-[0-9a-f]{12}$")

# The manifest: top-level fields every manifest has, its counts, the fields of a shard entry.
MANIFEST_FIELDS = ("schema_version", "counts", "shards", "config", "models")
MANIFEST_COUNTS = ("inputs", SPECIFIC, GENERAL, "dead_lettered")
MANIFEST_SHARD_FIELDS = ("domain", "name", "count", "sha256", "bytes")  # and "split" (absent: train)

EXT_IMAGE = "jpg"
EXT_TEXT = "txt"
EXT_JSON = "json"
EXT_EMB = "emb.npy"
EXT_REFS = "refs.npy"
EXT_MASK = "mask.png"
EXT_FACE = "face.npy"
# Order of members inside a sample (deterministic tar layout).
MEMBER_ORDER = (EXT_IMAGE, EXT_JSON, EXT_TEXT, EXT_EMB, EXT_REFS, EXT_MASK, EXT_FACE)
OPTIONAL = {"specific": {EXT_FACE}, "general": set()}  # members that may be present
REQUIRED = {
    "specific": {EXT_IMAGE, EXT_TEXT, EXT_JSON, EXT_EMB, EXT_REFS, EXT_MASK},
    "general": {EXT_IMAGE, EXT_TEXT, EXT_JSON, EXT_EMB, EXT_REFS},
}

JSON_FIELDS = (
    "key",
    "domain",
    "source",
    "identity",
    "attributes",
    "caption_vlm",
    "caption_attributes",
    "caption",
    "width",
    "height",
    "ref_keys",
    "schema_version",
)

# The identity step's fields (transforms/identity.py `identity_json` writes exactly these).
JSON_IDENTITY_FIELDS = (
    "pixel_sha256",  # sha256 of the decoded pixels (exact duplicates)
    "phash",  # 64-bit perceptual hash, 16 hex digits (near-duplicates)
    "identity_model",  # "face", "clip" or null (not verified)
    "faces",  # faces found (face model), else null
    "face_box",  # the chosen face's [x0, y0, x1, y1] in image pixels
    "face_landmarks",  # its 5 landmarks [[x, y], ...] (two corners of each eye, nose base)
    "face_fraction",  # its box area / image area
    "identity_status",  # "verified", "outlier", "unverified", "single" or null
    "identity_distance",  # distance to the identity's centre
    "identity_centre",  # the key of the identity's centre (medoid)
    "near_duplicates",  # keys of the same identity that are the same photo (never refs)
    "ref_distances",  # distance of each ref_keys[i] to the sample
)
# The caption guards (transforms/caption_guards.py): present only on a sample written with
# flagged caption (--caption-on-bad keep), a list of CAPTION_FLAGS.
# `caption_contradictions`: present only when VLM words contradict the sample's attribute
# labels (transforms/caption_labels.py): [{"attribute", "label", "words"}].
JSON_CAPTION_FIELDS = ("caption_flags", "caption_contradictions")
CAPTION_FLAGS = ("empty", "repetition loop", "echo", "refusal", "cut at the token limit")
# `source_meta`: present only where the source has per-sample metadata of its own: img2dataset's
# KEY.json verbatim (url, sha256, original_width, exif, ...), LSUN's {"key"}. Capped at
# SOURCE_META_MAX_BYTES of JSON: over it, the largest fields are left out, largest first, and
# their names listed under SOURCE_META_DROPPED.
JSON_SOURCE_FIELDS = ("source_meta",)
SOURCE_META_MAX_BYTES = 16 * 1024
SOURCE_META_DROPPED = "_dropped"
# `ref_kinds`: one per ref_keys[i]: "identity" (another photo of the identity) or "augmented"
# (an augmented view of the sample's own image, ref key "<key>#aug<j>": transforms/views.py).
REF_KINDS = ("identity", "augmented")
JSON_REF_FIELDS = ("ref_kinds",)
# The attribute probe (--attribute-model; models/attribute_probe.py): `attributes_source`
# ("labels", "predicted", or null without attributes) on every sample; where a probe ran,
# `attribute_probabilities` {name: p}; `attribute_doubts` [{"attribute", "label", "probability"}]
# only where the probe contradicts a label with at least --attribute-doubt confidence.
ATTRIBUTE_SOURCES = ("labels", "predicted")
JSON_ATTRIBUTE_FIELDS = ("attributes_source", "attribute_probabilities", "attribute_doubts")
JSON_ADDED_FIELDS = ("origin", *JSON_IDENTITY_FIELDS, *JSON_CAPTION_FIELDS, *JSON_SOURCE_FIELDS, *JSON_REF_FIELDS,
                     *JSON_ATTRIBUTE_FIELDS)
# identity_status values (transforms/verify.py decides them).
VERIFIED, OUTLIER, UNVERIFIED, SINGLE = "verified", "outlier", "unverified", "single"
IDENTITY_STATUSES = (VERIFIED, OUTLIER, UNVERIFIED, SINGLE)  # v1 additions: checked when present

DEAD_LETTER_FIELDS = ("key", "source", "stage", "reason")
# The one addition to v1 since it was first written: each dead-letter line also carries
# "kind", one of schemas.records.DeadLetterKind's values (what code decides by; "reason" is
# the sentence for people). Lines without it (older runs) are classed by
# DeadLetterKind.of_letter. The manifest's "dead_letter_reasons" counts letters per
# reason_count_key(stage, kind).


def reason_count_key(stage: str, kind: str) -> str:
    """The manifest's dead_letter_reasons key: 'decode: not a decodable image'."""
    return f"{stage}: {kind}"


def stage_of_count_key(count_key: str) -> str:
    return count_key.split(": ", 1)[0]

# Fixed tar header values: same input + config -> byte-identical shards.
TAR_MTIME = 0
TAR_MODE = 0o644

# Reading limits (a shard is data, never code: no pickles, no paths, bounded sizes).
MAX_MEMBER_BYTES = 256 * 1024 * 1024


def shard_folder(split: str, domain: str) -> str:
    """The folder of a (split, domain)'s shards, relative to OUT."""
    return domain if split == TRAIN else f"{split}/{domain}"


def split_domains() -> list[tuple[str, str]]:
    """Every (split, domain) a run can write, in split then domain order."""
    return [(split, domain) for split in SPLITS for domain in DOMAINS]


def shard_name(index: int) -> str:
    return f"{index:0{SHARD_DIGITS}d}{SHARD_SUFFIX}"


def is_shard_name(name: str) -> bool:
    return bool(_SHARD_NAME.match(name))


def parquet_name(shard: str) -> str:
    """'000003.tar' -> '000003.parquet' (the sidecar beside it)."""
    return shard.removesuffix(SHARD_SUFFIX) + PARQUET_SUFFIX


def weights_name(shard: str) -> str:
    """'000003.tar' -> '000003_weights.parquet' (prep weights; read by prep train --weights)."""
    return shard.removesuffix(SHARD_SUFFIX) + WEIGHTS_SUFFIX


def stats_name(shard: str) -> str:
    """'000003.tar' -> '000003_stats.json' (written last: the shard is complete)."""
    return shard.removesuffix(SHARD_SUFFIX) + STATS_SUFFIX


def is_run_file(rel: str) -> bool:
    """Whether `rel`, a '/'-separated path relative to OUT, names a file prep writes: the
    manifest and run bookkeeping (chunks included), shards, their sidecars, stats, sizes and wids index in a
    shard folder, dead-letter files, staged items under _plan/, and the temporary siblings
    of any of them. `prep run --overwrite` removes exactly these, and OUT/README.md when it is
    prep's dataset card (schemas/card.py is_prep_card: decided by its content, not its name);
    every other file under OUT is the user's and stays.

    >>> [is_run_file(p) for p in ("manifest.json", "general/000003.tar", "val/specific/sizes.json",
    ...                           "dead_letter/000000.jsonl", "specific/.000001.parquet.tmp-0123456789ab")]
    [True, True, True, True, True]
    >>> [is_run_file(p) for p in ("notes.txt", "general/README.md", "test/data.csv", "specific/a/000000.tar")]
    [False, False, False, False]
    """
    folder, _, name = rel.strip("/").rpartition("/")
    temp = _TEMP_NAME.match(name)
    if temp:
        name = temp.group("name")
    if folder == "":
        return name in (MANIFEST, RUN_STATE, RETRY_PLAN)
    if folder == DEAD_LETTER_DIR:
        return name.endswith(DEAD_LETTER_SUFFIX)
    for bookkeeping in (PLAN_DIR, CHUNKS_DIR):
        if folder == bookkeeping or folder.startswith(bookkeeping + "/"):
            return True  # run bookkeeping only
    if folder in {shard_folder(split, domain) for split, domain in split_domains()}:
        if name in (SIZES, WIDS_INDEX):
            return True
        for suffix in (SHARD_SUFFIX, WEIGHTS_SUFFIX, PARQUET_SUFFIX, STATS_SUFFIX):
            base = name.removesuffix(suffix)
            if base != name and len(base) == SHARD_DIGITS and base.isdigit():
                return True
    return False


def split_member(name: str) -> tuple[str, str]:
    """'KEY.emb.npy' -> ('KEY', 'emb.npy'), as webdataset does (split at the first dot)."""
    base = name.rsplit("/", 1)[-1]
    key, _, ext = base.partition(".")
    return key, ext


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


class UnsafeMember(ValueError):
    pass


class _EndAwareTarInfo(tarfile.TarInfo):
    """Records which header error ended the archive: tarfile stops silently at a cut between
    members or at a garbage header, just as it does at the real end-of-archive marker."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as exc:
            tar._prep_end = exc
            raise


def iter_tar_members(fileobj, *, max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[tuple[str, bytes]]:
    """Yield (name, bytes) of regular members of a tar stream, refusing unsafe ones.

    Raises UnsafeMember for absolute paths, '..' components, links or devices, and for
    members larger than `max_member_bytes`; raises tarfile.ReadError on a corrupt stream,
    including one that is cut between members (no end-of-archive marker).
    """
    with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_EndAwareTarInfo) as tar:
        for info in tar:
            name = info.name
            if name.startswith("/") or ".." in name.split("/"):
                raise UnsafeMember(f"unsafe member name {name!r}")
            if info.isdir():
                continue
            if not info.isfile():
                raise UnsafeMember(f"member {name!r} is not a regular file")
            if info.size > max_member_bytes:
                raise UnsafeMember(f"member {name!r} is {info.size} bytes (limit {max_member_bytes})")
            f = tar.extractfile(info)
            data = f.read() if f is not None else b""
            if len(data) != info.size:
                raise tarfile.ReadError(f"member {name!r} truncated: {len(data)} of {info.size} bytes")
            yield name, data
        end = getattr(tar, "_prep_end", None)
        if not isinstance(end, tarfile.EOFHeaderError):
            why = "the data stops" if end is None or isinstance(end, (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError)) else "a corrupt header"
            raise tarfile.ReadError(f"tar ends without an end-of-archive marker ({why}): truncated or corrupt")


def iter_samples(fileobj) -> Iterator[dict[str, bytes]]:
    """Group consecutive tar members into samples: {'__key__': key, ext: bytes, ...}."""
    current: dict = {}
    for name, data in iter_tar_members(fileobj):
        key, ext = split_member(name)
        if current and current["__key__"] != key:
            yield current
            current = {}
        if not current:
            current = {"__key__": key}
        if ext in current:
            raise ValueError(f"duplicate member {name!r}")
        current[ext] = data
    if current:
        yield current


def decode_sample(raw: dict[str, bytes]) -> dict:
    """Decode a raw sample's metadata and arrays (the image and mask stay encoded)."""
    out = {"__key__": raw["__key__"]}
    for ext, data in raw.items():
        if ext == "__key__":
            continue
        if ext == EXT_JSON:
            out[ext] = json.loads(data.decode("utf-8"))
        elif ext == EXT_TEXT:
            out[ext] = data.decode("utf-8")
        elif ext.endswith("npy"):
            out[ext] = load_npy(data)
        else:
            out[ext] = data
    return out
