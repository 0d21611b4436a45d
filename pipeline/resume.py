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

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from prep.atomic import write_json
from prep.transforms.identity import candidate_from_shard
from prep.transforms.pair import Written
from prep.pipeline.config import RunConfig  # noqa: F401 - run_digest's argument
from prep.schemas import contract, output
from prep.schemas.contract import RETRY_PLAN, RUN_STATE
from prep.schemas.records import SPECIFIC, DeadLetter, ShardInfo


@dataclass
class Continuation:
    """What an output folder already holds (verified) and so what a run skips and adds; the
    pipeline asks only this. The empty one is a fresh run. `Resume` and `Retry` fill it.

    shards: complete shards that stay, listed in the manifest beside the new ones.
    specific: their specific samples as pairing needs them (`pair.Written`): candidate refs.
    removed: files deleted while scanning (partial shards, temporary files).
    """

    shards: list[ShardInfo] = field(default_factory=list)
    specific: list = field(default_factory=list)  # list[pair.Written]
    removed: list[str] = field(default_factory=list)
    # Retry: ingest processes only these keys; the dead letters and the manifest add the
    # letters carried over and keep the original input count.
    only_keys: Optional[frozenset[str]] = None
    kept_letters: list[DeadLetter] = field(default_factory=list)
    inputs: Optional[int] = None

    @property
    def done_keys(self) -> frozenset[str]:
        """Keys ingest skips: already in kept shards (a resume)."""
        return frozenset()

    def for_writer(self, split: str, domain: str) -> dict:
        """What one (split, domain) shard writer must know: keys already in kept shards (they
        take part in the shard boundaries), the index its new shards start at, and the indices
        it must never write again."""
        return {"done_keys": (), "first_index": 0, "kept_indices": self.kept_indices().get((split, domain), ())}

    def kept_indices(self) -> dict[tuple[str, str], set[int]]:
        """(split, domain) -> indices of the shards kept (resume) or already listed (retry)."""
        out: dict[tuple[str, str], set[int]] = {}
        for info in self.shards:
            out.setdefault((info.split, info.domain), set()).add(int(info.name.split(".")[0]))
        return out


@dataclass
class Resume(Continuation):
    """A killed run of the same digest: `keys` (per split and domain) are the samples of its
    complete shards; they are not processed again but take part in the shard boundaries, so
    the rest land exactly where an uninterrupted run puts them."""

    keys: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    @property
    def done_keys(self) -> frozenset[str]:
        return frozenset(k for keys in self.keys.values() for k in keys)

    def for_writer(self, split: str, domain: str) -> dict:
        return {**super().for_writer(split, domain), "done_keys": self.keys.get((split, domain), ())}


@dataclass
class Retry(Continuation):
    """--retry-dead-letter on a complete run: only `only_keys` are processed; their shards go
    after the existing ones (`first_index`), the letters that are not retried are carried over,
    and the input count stays the original run's."""

    first_index: dict[tuple[str, str], int] = field(default_factory=dict)

    def for_writer(self, split: str, domain: str) -> dict:
        return {**super().for_writer(split, domain), "first_index": self.first_index.get((split, domain), 0)}


def run_digest(config: "RunConfig", items: list, wds_urls: list[str], fingerprints: dict[str, dict]) -> str:
    """sha256 of what decides the output; a rerun with another digest must not resume.

    The config's part is `RunConfig.digest_json()`: each field says whether it counts."""
    payload = {
        "config": config.digest_json(),
        "items": [[i.key, i.path, i.identity, i.split, i.domain] for i in items],
        "wds": sorted(wds_urls),
        "models": {stage: (f or {}).get("sha256") or (f or {}).get("id") for stage, f in sorted(fingerprints.items())},
    }
    if config.attribute_model:  # the probe's weights and thresholds decide what is written
        from prep.models.attribute_probe import probe_bytes

        payload["attribute_model_sha256"] = hashlib.sha256(probe_bytes(config.attribute_model)).hexdigest()
    if config.exclude:  # the list's content decides what is written, not only its name
        with FileSystems.open(config.exclude, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            payload["exclude_sha256"] = hashlib.sha256(f.read()).hexdigest()
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def read_run_state(out: str) -> Optional[dict]:
    path = f"{out.rstrip('/')}/{RUN_STATE}"
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as f:
        return json.loads(f.read().decode("utf-8"))


def write_run_state(out: str, digest: str, config_json: dict) -> None:
    data = {"schema_version": contract.SCHEMA_VERSION, "digest": digest, "config": config_json}
    write_json(f"{out.rstrip('/')}/{RUN_STATE}", data)


_read = output.read_bytes


def scan_completed(out: str) -> Resume:
    """Keep verified complete shards; delete partial ones and temporary files."""
    out = out.rstrip("/")
    state = Resume()
    for split, domain in contract.split_domains():
        names = output.folder_files(out, split, domain)
        doomed = [path for name, path in names.items() if name.startswith(".")]  # temp files
        for shard in output.shards_in(names, split, domain):
            info = _verify(shard, state)
            if info is None:
                doomed += [p for p in (shard.path, shard.sidecar, shard.stats) if p is not None]
            else:
                state.shards.append(info)
        if doomed:
            FileSystems.delete(doomed)
            state.removed += doomed
    return state


def _shard_records(data: bytes, domain: str) -> tuple[list[str], list[Written]]:
    """A shard's keys, and for specific shards each sample as pairing needs it (key, source,
    identity, embedding, identity candidate): what pairing and shard boundaries need of
    samples that are already written."""
    keys, specific = [], []
    for raw in contract.iter_samples(io.BytesIO(data)):
        keys.append(raw["__key__"])
        if domain == SPECIFIC:
            sample = contract.decode_sample(raw)
            meta = sample[contract.EXT_JSON]
            candidate = candidate_from_shard(meta, sample[contract.EXT_EMB], sample.get(contract.EXT_FACE))
            specific.append(Written(raw["__key__"], meta["source"], meta["identity"], sample[contract.EXT_EMB], candidate))
    return keys, specific


def _verify(shard: output.Shard, state: Resume) -> Optional[ShardInfo]:
    if shard.stats is None or shard.sidecar is None:
        return None
    try:
        stats = json.loads(_read(shard.stats).decode("utf-8"))
        data = _read(shard.path)
    except output.READ_ERRORS:
        return None
    if hashlib.sha256(data).hexdigest() != stats.get("sha256") or len(data) != stats.get("bytes"):
        return None
    try:
        keys, specific = _shard_records(data, shard.domain)
    except Exception:  # noqa: BLE001 - a shard that does not read back is redone
        return None
    if len(keys) != stats.get("count"):
        return None
    state.keys.setdefault((shard.split, shard.domain), []).extend(keys)
    state.specific.extend(specific)
    return ShardInfo(domain=shard.domain, name=shard.name, count=len(keys), sha256=stats["sha256"], bytes=len(data),
                     split=shard.split, caption_flags=dict(stats.get("caption_flags") or {}),
                     caption_contradictions=dict(stats.get("caption_contradictions") or {}),
                     attribute_doubts=dict(stats.get("attribute_doubts") or {}))


def _read_dead_letters(out: str) -> list[DeadLetter]:
    return [
        DeadLetter.from_json(line.letter)
        for name, path in output.dead_letter_files(out).items()
        for line in output.iter_dead_letter_lines(path, f"{contract.DEAD_LETTER_DIR}/{name}")
    ]


def _retry_plan(out: str, shard_keys: set[str]) -> tuple[frozenset[str], list[DeadLetter]]:
    """Which keys a retry redoes, and which dead letters it carries over unchanged.

    Computed once and saved (RETRY_PLAN): the retry rewrites the dead-letter file before its
    manifest, so a killed retry must not compute its plan again from the rewritten file.
    A letter whose key is taken (a duplicate key) is never retried: its key belongs to a sample
    already in a shard.
    """
    path = f"{out}/{RETRY_PLAN}"
    if FileSystems.exists(path):
        saved = json.loads(_read(path).decode("utf-8"))
        return frozenset(saved["only_keys"]), [DeadLetter.from_json(d) for d in saved["kept_letters"]]
    letters = _read_dead_letters(out)
    kept = [d for d in letters if d.kind.key_is_taken or d.key in shard_keys]
    only = frozenset(d.key for d in letters if d not in kept) - shard_keys
    data = {"only_keys": sorted(only), "kept_letters": [d.to_json() for d in kept]}
    write_json(path, data)
    return only, kept


def clear_retry_plan(out: str) -> None:
    path = f"{out.rstrip('/')}/{RETRY_PLAN}"
    if FileSystems.exists(path):
        FileSystems.delete([path])


def scan_for_retry(out: str, manifest: dict) -> Retry:
    """A complete run's shards are kept as they are; its dead-lettered inputs are redone.

    Shards beyond the manifest (left by a killed earlier retry) are removed first.
    """
    out = out.rstrip("/")
    state = Retry(inputs=manifest["counts"]["inputs"])
    shard_keys: set[str] = set()
    listed: dict[tuple[str, str], set[str]] = {}
    for entry in manifest["shards"]:
        split = entry.get("split", contract.TRAIN)
        listed.setdefault((split, entry["domain"]), set()).add(entry["name"])
        state.shards.append(ShardInfo(domain=entry["domain"], name=entry["name"], count=entry["count"],
                                      sha256=entry["sha256"], bytes=entry["bytes"], split=split,
                                      caption_flags=dict(entry.get("caption_flags") or {}),
                                      caption_contradictions=dict(entry.get("caption_contradictions") or {}),
                                      attribute_doubts=dict(entry.get("attribute_doubts") or {})))
    for split, domain in contract.split_domains():
        names = listed.get((split, domain), set())
        state.first_index[(split, domain)] = len(names)
        files = output.folder_files(out, split, domain)
        for name, path in files.items():
            base = name.split(".")[0].split("_")[0]
            if name.startswith(".") or (base.isdigit() and f"{base}{contract.SHARD_SUFFIX}" not in names):
                FileSystems.delete([path])
                state.removed.append(path)
            elif name in names:
                keys, specific = _shard_records(_read(path), domain)
                shard_keys.update(keys)
                state.specific.extend(specific)
    state.only_keys, state.kept_letters = _retry_plan(out, shard_keys)
    return state
