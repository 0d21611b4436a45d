"""Resuming a killed or failed run.

A run writes `OUT/_run.json` first: the digest of everything that decides its output (the
resolved config, the planned inputs, the models' fingerprints). A shard is complete when its
`NNNNNN_stats.json` (written last, after the tar and the parquet) exists and names the sha256
of the tar's bytes. On a rerun with the same digest, the complete shards are kept, their
samples are not processed again (their keys, identities and embeddings are read back so that
pairing and shard boundaries come out exactly as in an uninterrupted run), and everything
else (partial shards, temporary files) is removed and redone. Outputs are deterministic, so
the result is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from apache_beam.io.filesystems import FileSystems

from prep.schemas import contract
from prep.schemas.records import DOMAINS, SPECIFIC, DeadLetter, ShardInfo
from prep.transforms.write import parquet_name, stats_name, write_atomic

RUN_STATE = "_run.json"
RETRY_PLAN = "_retry.json"  # a retry's plan, kept until its manifest is written (a killed retry reruns it)
# Config fields that do not change what is written. (The padded stages' batch sizes and the
# device do: a model's output for one element depends on the batch size it is run in.)
_NOT_OUTPUT = ("overwrite", "model_cache", "mask_batch_size", "caption_model_copies", "prepare_threads", "extra")


@dataclass
class ResumeState:
    """What an output folder already holds, verified, and what this run must still do.

    Resume (a killed run): `keys` are the samples of complete shards, which take part in the
    shard boundaries and are not processed again. Retry (--retry-dead-letter on a complete
    run): only `only_keys` are processed; their shards go after the existing ones
    (`first_index`), and the input count stays the original run's (`inputs`).
    """

    shards: list[ShardInfo] = field(default_factory=list)
    keys: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # (split, domain) -> keys
    specific: list[tuple[str, str, str, np.ndarray]] = field(default_factory=list)  # (key, source, identity, emb)
    removed: list[str] = field(default_factory=list)
    only_keys: Optional[frozenset[str]] = None
    first_index: dict[tuple[str, str], int] = field(default_factory=dict)
    inputs: Optional[int] = None
    kept_letters: list[DeadLetter] = field(default_factory=list)  # retry: letters carried over as they are

    def kept_indices(self) -> dict[tuple[str, str], set[int]]:
        """(split, domain) -> indices of the shards kept (resume) or already listed (retry)."""
        out: dict[tuple[str, str], set[int]] = {}
        for info in self.shards:
            out.setdefault((info.split, info.domain), set()).add(int(info.name.split(".")[0]))
        return out

    @property
    def done_keys(self) -> frozenset[str]:
        return frozenset(k for keys in self.keys.values() for k in keys)


def run_digest(config_json: dict, items: list, wds_urls: list[str], models: dict) -> str:
    """sha256 of what decides the output; a rerun with another digest must not resume."""
    relevant = {k: v for k, v in sorted(config_json.items()) if k not in _NOT_OUTPUT}
    payload = {
        "config": relevant,
        "items": [[i.key, i.path, i.identity, i.split, i.domain] for i in items],
        "wds": sorted(wds_urls),
        "models": {stage: (m.get("fingerprint") or {}).get("sha256") or (m.get("fingerprint") or {}).get("id")
                   for stage, m in sorted(models.items())},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def read_run_state(out: str) -> Optional[dict]:
    path = f"{out.rstrip('/')}/{RUN_STATE}"
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as f:
        return json.loads(f.read().decode("utf-8"))


def write_run_state(out: str, digest: str, config_json: dict) -> None:
    data = {"schema_version": contract.SCHEMA_VERSION, "digest": digest, "config": config_json}
    write_atomic(f"{out.rstrip('/')}/{RUN_STATE}", json.dumps(data, indent=1, sort_keys=True).encode("utf-8") + b"\n")


def _read(path: str) -> bytes:
    with FileSystems.open(path) as f:
        return f.read()


def scan_completed(out: str) -> ResumeState:
    """Keep verified complete shards; delete partial ones and temporary files."""
    out = out.rstrip("/")
    state = ResumeState()
    for split in contract.SPLITS:
        for domain in DOMAINS:
            folder = f"{out}/{contract.shard_folder(split, domain)}"
            if not FileSystems.exists(folder):
                continue
            (match,) = FileSystems.match([f"{folder}/*"])
            names = {m.path.rsplit("/", 1)[-1]: m.path for m in match.metadata_list}
            doomed = [path for name, path in names.items() if name.startswith(".")]  # temp files
            for name in sorted(n for n in names if n.endswith(".tar") and not n.startswith(".")):
                info = _verify(folder, name, names, split, domain, state)
                if info is None:
                    doomed += [names[n] for n in (name, parquet_name(name), stats_name(name)) if n in names]
                else:
                    state.shards.append(info)
            if doomed:
                FileSystems.delete(doomed)
                state.removed += doomed
    return state


def _shard_records(data: bytes, domain: str) -> tuple[list[str], list[tuple[str, str, str, np.ndarray]]]:
    """A shard's keys, and for specific shards each sample's (key, source, identity, embedding):
    what pairing and shard boundaries need of samples that are already written."""
    keys, specific = [], []
    for raw in contract.iter_samples(io.BytesIO(data)):
        keys.append(raw["__key__"])
        if domain == SPECIFIC:
            sample = contract.decode_sample(raw)
            meta = sample[contract.EXT_JSON]
            specific.append((raw["__key__"], meta["source"], meta["identity"], sample[contract.EXT_EMB]))
    return keys, specific


def _verify(folder, name, names, split, domain, state: ResumeState) -> Optional[ShardInfo]:
    stats_file = stats_name(name)
    if stats_file not in names or parquet_name(name) not in names:
        return None
    try:
        stats = json.loads(_read(names[stats_file]).decode("utf-8"))
        data = _read(names[name])
    except (OSError, ValueError):
        return None
    if hashlib.sha256(data).hexdigest() != stats.get("sha256") or len(data) != stats.get("bytes"):
        return None
    try:
        keys, specific = _shard_records(data, domain)
    except Exception:  # noqa: BLE001 - a shard that does not read back is redone
        return None
    if len(keys) != stats.get("count"):
        return None
    state.keys.setdefault((split, domain), []).extend(keys)
    state.specific.extend(specific)
    return ShardInfo(domain=domain, name=name, count=len(keys), sha256=stats["sha256"], bytes=len(data),
                     keys_first=keys[0] if keys else "", keys_last=keys[-1] if keys else "", split=split)


def _read_dead_letters(out: str) -> list[DeadLetter]:
    letters: list[DeadLetter] = []
    folder = f"{out}/{contract.DEAD_LETTER_DIR}"
    if not FileSystems.exists(folder):
        return letters
    (match,) = FileSystems.match([f"{folder}/*.jsonl"])
    for meta in match.metadata_list:
        for line in _read(meta.path).decode("utf-8").splitlines():
            if line.strip():
                d = json.loads(line)
                letters.append(DeadLetter(key=d["key"], source=d["source"], stage=d["stage"], reason=d["reason"],
                                          path=d.get("path")))
    return letters


def _retry_plan(out: str, shard_keys: set[str]) -> tuple[frozenset[str], list[DeadLetter]]:
    """Which keys a retry redoes, and which dead letters it carries over unchanged.

    Computed once and saved (RETRY_PLAN): the retry rewrites the dead-letter file before its
    manifest, so a killed retry must not compute its plan again from the rewritten file.
    A "duplicate key" letter is never retried: its key belongs to a sample already in a shard.
    """
    path = f"{out}/{RETRY_PLAN}"
    if FileSystems.exists(path):
        saved = json.loads(_read(path).decode("utf-8"))
        return frozenset(saved["only_keys"]), [DeadLetter(**d) for d in saved["kept_letters"]]
    letters = _read_dead_letters(out)
    kept = [d for d in letters if d.reason.startswith("duplicate key") or d.key in shard_keys]
    only = frozenset(d.key for d in letters if d not in kept) - shard_keys
    data = {"only_keys": sorted(only), "kept_letters": [d.to_json() for d in kept]}
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True).encode("utf-8") + b"\n")
    return only, kept


def clear_retry_plan(out: str) -> None:
    path = f"{out.rstrip('/')}/{RETRY_PLAN}"
    if FileSystems.exists(path):
        FileSystems.delete([path])


def scan_for_retry(out: str, manifest: dict) -> ResumeState:
    """A complete run's shards are kept as they are; its dead-lettered inputs are redone.

    Shards beyond the manifest (left by a killed earlier retry) are removed first.
    """
    out = out.rstrip("/")
    state = ResumeState(inputs=manifest["counts"]["inputs"])
    shard_keys: set[str] = set()
    listed: dict[tuple[str, str], set[str]] = {}
    for entry in manifest["shards"]:
        split = entry.get("split", "train")
        listed.setdefault((split, entry["domain"]), set()).add(entry["name"])
        state.shards.append(ShardInfo(domain=entry["domain"], name=entry["name"], count=entry["count"],
                                      sha256=entry["sha256"], bytes=entry["bytes"], split=split))
    for split in contract.SPLITS:
        for domain in DOMAINS:
            folder = f"{out}/{contract.shard_folder(split, domain)}"
            names = listed.get((split, domain), set())
            state.first_index[(split, domain)] = len(names)
            if not FileSystems.exists(folder):
                continue
            (match,) = FileSystems.match([f"{folder}/*"])
            for meta in match.metadata_list:
                name = meta.path.rsplit("/", 1)[-1]
                base = name.split(".")[0].split("_")[0]
                if name.startswith(".") or (base.isdigit() and f"{base}.tar" not in names):
                    FileSystems.delete([meta.path])
                    state.removed.append(meta.path)
                elif name in names:
                    keys, specific = _shard_records(_read(meta.path), domain)
                    shard_keys.update(keys)
                    state.specific.extend(specific)
    state.only_keys, state.kept_letters = _retry_plan(out, shard_keys)
    return state
