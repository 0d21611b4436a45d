"""The one reader of an output folder (contract v1): which shards it holds per split and
domain, its manifest, dead-letter lines and sidecars, through Beam's FileSystems (local paths
and gs:// alike). `prep validate`, `prep inspect`, resume/retry and the trainer read through
here; what the names and folders are is `contract`'s to say.

Readers that must go on after a bad file catch `READ_ERRORS`: what a broken tar stream, a
malformed member or an unreadable file can raise.
"""

from __future__ import annotations

import json
import lzma
import tarfile
import zlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from apache_beam.io.filesystem import BeamIOError, CompressionTypes
from apache_beam.io.filesystems import FileSystems

from prep.schemas import contract

READ_ERRORS = (tarfile.TarError, ValueError, EOFError, OSError, zlib.error, lzma.LZMAError, BeamIOError)


def open_read(path: str):
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def read_bytes(path: str) -> bytes:
    with open_read(path) as f:
        return f.read()


def join(out_dir: str, *parts: str) -> str:
    return FileSystems.join(out_dir.rstrip("/"), *parts) if parts else out_dir.rstrip("/")


def list_names(folder: str) -> dict[str, str]:
    """Base name -> full path of the files directly inside `folder` (empty if there is none).
    Raises BeamIOError when the folder cannot be listed."""
    (result,) = FileSystems.match([FileSystems.join(folder, "*")])
    return {meta.path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]: meta.path for meta in result.metadata_list}


def list_names_or_empty(folder: str) -> dict[str, str]:
    try:
        return list_names(folder)
    except BeamIOError:
        return {}


def read_manifest(out_dir: str) -> Optional[dict]:
    """OUT/manifest.json as a dict, or None when there is none (or it is not a JSON object)."""
    try:
        data = json.loads(read_bytes(join(out_dir, contract.MANIFEST)).decode("utf-8"))
    except (OSError, BeamIOError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class Shard:
    split: str
    domain: str
    name: str  # "000000.tar"
    path: str
    sidecar: Optional[str] = None  # path of NNNNNN.parquet when it exists
    stats: Optional[str] = None  # path of NNNNNN_stats.json when it exists

    @property
    def folder(self) -> str:
        return contract.shard_folder(self.split, self.domain)

    @property
    def rel(self) -> str:
        return f"{self.folder}/{self.name}"


def folder_files(out_dir: str, split: str, domain: str) -> dict[str, str]:
    """Every file (shards, sidecars, temporary files) of one (split, domain) folder."""
    return list_names_or_empty(join(out_dir, *contract.shard_folder(split, domain).split("/")))


def shards_in(files: dict[str, str], split: str, domain: str) -> list[Shard]:
    """The shards among one folder's `files` (temporary and foreign names left out), in name order."""
    return [
        Shard(split, domain, name, files[name], files.get(contract.parquet_name(name)), files.get(contract.stats_name(name)))
        for name in sorted(n for n in files if contract.is_shard_name(n))
    ]


def iter_folder_samples(out_dir: str, split: str, domain: str) -> Iterator[tuple[Shard, dict[str, bytes]]]:
    """Every sample of one (split, domain) folder, shard by shard in name order: (its shard, its
    members as contract.iter_samples gives them: "__key__" and ext -> bytes)."""
    for shard in shards_in(folder_files(out_dir, split, domain), split, domain):
        with open_read(shard.path) as f:
            for raw in contract.iter_samples(f):
                yield shard, raw


def list_shards(out_dir: str) -> list[Shard]:
    """Every shard of every (split, domain) folder, in split, domain and name order."""
    return [
        shard
        for split, domain in contract.split_domains()
        for shard in shards_in(folder_files(out_dir, split, domain), split, domain)
    ]


@dataclass(frozen=True)
class DeadLetterLine:
    rel: str  # "dead_letter/000000.jsonl"
    lineno: int
    letter: Any  # the parsed JSON value (a dict when well formed); None when not JSON
    error: Optional[str] = None  # why it is not JSON


def dead_letter_files(out_dir: str) -> dict[str, str]:
    files = list_names_or_empty(join(out_dir, contract.DEAD_LETTER_DIR))
    return {n: p for n, p in sorted(files.items()) if n.endswith(contract.DEAD_LETTER_SUFFIX) and not n.startswith(".")}


def iter_dead_letter_lines(path: str, rel: str) -> Iterator[DeadLetterLine]:
    """The non-blank lines of one dead-letter file, parsed. Raises READ_ERRORS if unreadable."""
    with open_read(path) as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield DeadLetterLine(rel, lineno, json.loads(raw.decode("utf-8")))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                yield DeadLetterLine(rel, lineno, None, str(e))


def manifest_shard_counts(manifest: Optional[dict]) -> dict[str, int]:
    """Shard path relative to OUT -> count, from the manifest's shard list."""
    counts = {}
    for entry in (manifest or {}).get("shards", []) or []:
        if isinstance(entry, dict) and isinstance(entry.get("count"), int):
            folder = contract.shard_folder(entry.get("split") or contract.TRAIN, str(entry.get("domain")))
            counts[f"{folder}/{entry.get('name')}"] = entry["count"]
    return counts


RANDOM_WEIGHTS_HINT = "use --preset small or paper (or your own models) for real ones"


def random_weights_note(manifest: Optional[dict]) -> Optional[str]:
    """One line when the manifest's models were built at random (`random_weights`: the tiny
    preset, or an open_clip model without pretrained weights); None otherwise."""
    models = (manifest or {}).get("models") or {}
    stages = [stage for stage, info in sorted(models.items()) if isinstance(info, dict) and info.get("random_weights")]
    if not stages:
        return None
    return (f"random weights: the {', '.join(stages)} model{'s' if len(stages) > 1 else ''} "
            f"{'were' if len(stages) > 1 else 'was'} built at random, so captions, masks and embeddings say "
            f"nothing about the images; {RANDOM_WEIGHTS_HINT}")

