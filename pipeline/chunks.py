"""Chunked local runs: memory bounded by `--chunk-inputs`, not by the data.

Beam's in-memory runner keeps every collection that crosses a grouping in memory (~50 KB per
image on the tiny preset), so one local job over a whole dataset needs memory in proportion to
it. The work is independent per identity, so a large local run is cut into chunks of whole
identities (`plan_chunks`: identity-disjoint, deterministic, about N inputs each; general-domain
tars whole, by tar) and each chunk runs as one ordinary pipeline into `OUT/_chunks/NNNNN/`:
one after the other, or with `--workers N`, N at a time in N long-lived processes (each a
one-process in-memory runner with 1/N of the cores' threads, keeping its models loaded from
chunk to chunk: one model load per process, not per chunk). Pairing and verification are
exact inside a chunk: every image of an identity is in it.

Then `stitch` merges the chunks' shards per (split, domain) in key order (a k-way merge of
sorted streams: one sample per chunk in memory, and one shard) into the shards one job would
have written: shard i holds the i-th `samples_per_shard` keys of all the written samples, so
the numbering is continuous and only each folder's last shard is short, as in one job. The
sidecars are recomputed from the members (`ShardRow.from_members`, the same values the writer
uses), the dead letters are merged and sorted as the writer sorts them, the manifest counts
and identity totals are the chunks' sums, and the exact duplicates are found again across
chunks from each chunk's (pixel digest, key) list. The result is byte-identical to one job for
any chunk size (tests/test_chunks.py). `OUT/_chunks` is removed once the manifest is written.

Resume: `OUT/_chunks/plan.json` (the chunks, written first) fixes the chunks of a run, whatever
`--chunk-inputs` a rerun passes. A chunk is done when its `_done` marker exists (written after
its pipeline finished); a chunk killed midway resumes like a one-job run (pipeline/resume.py),
in its own folder; a killed stitch is redone from the chunks.

Not chunked (one job): Dataflow (it spills to disk itself), `--retry-dead-letter` (it redoes a
few inputs), `--drop-duplicates` (which copy of an exact duplicate is dropped is decided over
all identities, and it changes the pairing of the dropping identity), resumes of a run that
started as one job, and inputs of at most `--chunk-inputs`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import json
import logging
import multiprocessing
import os
import tarfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Optional

from apache_beam.io.filesystems import FileSystems

from prep.atomic import write_atomic
from prep.pipeline.build import RunPlan, _exact_duplicates_section
from prep.pipeline.items import stage_items
from prep.pipeline.local import SAMPLES_PER_TAR_GUESS, thread_environment
from prep.pipeline.outputs import build_manifest, dead_letter_lines, write_run_outputs
from prep.pipeline.quiet import chunk_worker_init
from prep.schemas import contract, output
from prep.schemas.records import SPECIFIC, DeadLetter, ShardInfo, SourceItem
from prep.transforms.inference import keep_models
from prep.transforms.pair import IdentityTotals, identity_group
from prep.transforms.write import ShardRow, members_tar_bytes, write_shard_files

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
DONE_MARKER = "_done"
DIGESTS_FILE = "_digests.txt"


@dataclass(frozen=True)
class Chunk:
    """The planned items (by key) and the input tars of one chunk; the first chunk also
    carries the dead letters found while planning."""

    keys: tuple[str, ...] = ()
    wds: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {"keys": list(self.keys), "wds": list(self.wds)}

    @classmethod
    def from_json(cls, data: dict) -> "Chunk":
        return cls(tuple(data["keys"]), tuple(data["wds"]))


def count_tar_samples(url: str) -> int:
    """Samples in a local tar, from its headers only (tarfile seeks over the data); a tar that
    is not a local file, or does not read, counts as SAMPLES_PER_TAR_GUESS."""
    if not os.path.isfile(url):
        return SAMPLES_PER_TAR_GUESS
    try:
        with tarfile.open(url, mode="r:") as tar:
            return len({contract.split_member(m.name)[0] for m in tar if m.isfile()})
    except (tarfile.TarError, OSError, ValueError):
        return SAMPLES_PER_TAR_GUESS


def plan_chunks(items: Sequence[SourceItem], wds_urls: Sequence[str], max_inputs: int,
                tar_samples: Optional[Callable[[str], int]] = None) -> list[Chunk]:
    """Whole identities (every specific item of one source's identity together), then general
    items, then tars, each in a fixed order (identity name, key, url), packed greedily into
    chunks of at most `max_inputs` inputs (a larger identity or tar is a chunk of its own).
    Depends only on the inputs and `max_inputs`."""
    if max_inputs < 1:
        raise ValueError("max_inputs must be >= 1")
    tar_samples = tar_samples or count_tar_samples
    groups: dict[str, list[str]] = {}
    general: list[str] = []
    for item in items:
        if item.domain == SPECIFIC:
            groups.setdefault(identity_group(item.source, str(item.identity)), []).append(item.key)
        else:
            general.append(item.key)
    units: list[tuple[int, tuple[str, ...], tuple[str, ...]]] = [
        (len(keys), tuple(sorted(keys)), ()) for _, keys in sorted(groups.items())
    ]
    units += [(1, (key,), ()) for key in sorted(general)]
    units += [(max(tar_samples(url), 1), (), (url,)) for url in sorted(wds_urls)]
    chunks: list[Chunk] = []
    keys: list[str] = []
    urls: list[str] = []
    size = 0
    for n, unit_keys, unit_urls in units:
        if size and size + n > max_inputs:
            chunks.append(Chunk(tuple(keys), tuple(urls)))
            keys, urls, size = [], [], 0
        keys += unit_keys
        urls += unit_urls
        size += n
    if size or not chunks:
        chunks.append(Chunk(tuple(keys), tuple(urls)))
    return chunks


def chunks_root(out: str) -> str:
    return f"{out.rstrip('/')}/{contract.CHUNKS_DIR}"


def chunk_dir(out: str, index: int) -> str:
    return f"{chunks_root(out)}/{index:05d}"


def read_chunk_plan(out: str) -> Optional[list[Chunk]]:
    path = f"{chunks_root(out)}/{PLAN_FILE}"
    if not FileSystems.exists(path):
        return None
    data = json.loads(output.read_bytes(path).decode("utf-8"))
    return [Chunk.from_json(c) for c in data["chunks"]]


def chunks_for(out: str, plan: RunPlan, local: bool) -> Optional[list[Chunk]]:
    """The chunks of this run (saved first, so a rerun keeps them), or None: one job."""
    saved = read_chunk_plan(out)
    if saved is not None:
        return saved
    cfg = plan.config
    if not local or cfg.chunk_inputs == 0 or cfg.drop_duplicates:
        return None
    tars = {url: count_tar_samples(url) for url in plan.wds_urls}
    if len(plan.items) + sum(tars.values()) <= cfg.chunk_inputs:
        return None
    chunks = plan_chunks(plan.items, plan.wds_urls, cfg.chunk_inputs, tar_samples=tars.__getitem__)
    if len(chunks) < 2:
        return None
    data = {"schema_version": contract.SCHEMA_VERSION, "chunk_inputs": cfg.chunk_inputs,
            "chunks": [c.to_json() for c in chunks]}
    write_atomic(f"{chunks_root(out)}/{PLAN_FILE}", json.dumps(data, sort_keys=True).encode("utf-8") + b"\n")
    return chunks


def chunk_plan(plan: RunPlan, chunk: Chunk, index: int, by_key: dict[str, SourceItem], out: str) -> RunPlan:
    """The run plan of one chunk: its items and tars, its own output folder."""
    folder = chunk_dir(out, index)
    return dataclasses.replace(
        plan,
        config=dataclasses.replace(plan.config, out=folder, overwrite=False),
        items=[by_key[k] for k in chunk.keys],
        ingest_dead=list(plan.ingest_dead) if index == 0 else [],
        wds_urls=list(chunk.wds),
        items_pattern=None,
        digests_out=f"{folder}/{DIGESTS_FILE}",
    )


def run_chunks(out: str, plan: RunPlan, chunks: list[Chunk], run_pipeline: Callable[[RunPlan, object], dict],
               workers: int = 1) -> tuple[dict, dict[str, int]]:
    """Each chunk not yet done through `run_pipeline(chunk_plan, resume)` (which returns the
    chunk's stage counters), then `stitch`; returns (manifest, the stage counters summed).

    `workers` > 1: that many chunks at a time, each in one of `workers` long-lived processes
    (`run_pipeline` must then pickle: a top-level function or a partial of one). Each process
    keeps its models from one chunk to the next (transforms/inference.py: keep_models), and so
    does this process when it runs the chunks itself. The output does not depend on the order
    in which chunks finish: `stitch` merges them by key."""
    from prep.pipeline.out_folder import output_exists
    from prep.pipeline.resume import scan_completed

    by_key = {item.key: item for item in plan.items}
    todo: list[tuple[int, RunPlan, object]] = []
    for index, chunk in enumerate(chunks):
        folder = chunk_dir(out, index)
        if FileSystems.exists(f"{folder}/{DONE_MARKER}"):
            continue
        resume = scan_completed(folder) if output_exists(folder) else None
        sub = chunk_plan(plan, chunk, index, by_key, out)
        sub.items_pattern = stage_items(sub.items, folder)
        todo.append((index, sub, resume))
    counters: dict[str, int] = {}

    def done(index: int, chunk_counters: dict[str, int]) -> None:
        write_atomic(f"{chunk_dir(out, index)}/{DONE_MARKER}", b"")
        for name, n in chunk_counters.items():
            counters[name] = counters.get(name, 0) + n

    def started(index: int, resume) -> None:
        log.info("chunk %d of %d: %d inputs, %d tar(s)%s", index + 1, len(chunks), len(chunks[index].keys),
                 len(chunks[index].wds), " (resumed)" if resume is not None else "")

    if workers <= 1 or len(todo) <= 1:
        with keep_models():
            for index, sub, resume in todo:
                started(index, resume)
                done(index, run_pipeline(sub, resume))
    else:
        with chunk_pool(min(workers, len(todo))) as pool:
            futures = {}
            for index, sub, resume in todo:
                started(index, resume)
                futures[pool.submit(run_pipeline, sub, resume)] = index
            for future in as_completed(futures):
                done(futures[future], future.result())
    return stitch(out, plan, len(chunks)), dict(sorted(counters.items()))


@contextlib.contextmanager
def chunk_pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """`workers` fresh processes (spawned: no inherited threads or torch state), each with the
    thread counts of one of `workers` (pipeline/local.py: thread_environment). On an error, or
    when interrupted, the workers still running are stopped before it propagates: a chunk that
    did not finish has no done marker and is redone (resumed) by the next run."""
    with thread_environment(workers):
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=chunk_worker_init)
        try:
            yield pool
        except BaseException:
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)


# ----------------------------------------------------------------------------- stitching


def _chunk_samples(folder: str, split: str, domain: str) -> Iterator[dict]:
    """A chunk's samples of one (split, domain), in key order (its shards are)."""
    for shard in output.shards_in(output.folder_files(folder, split, domain), split, domain):
        with FileSystems.open(shard.path) as f:
            yield from contract.iter_samples(f)


def _members(raw: dict) -> list[tuple[str, bytes]]:
    key = raw["__key__"]
    return [(f"{key}.{ext}", raw[ext]) for ext in contract.MEMBER_ORDER if ext in raw]


def _row(raw: dict) -> ShardRow:
    decoded = contract.decode_sample(raw)
    return ShardRow.from_members(decoded[contract.EXT_JSON], raw[contract.EXT_IMAGE], raw.get(contract.EXT_MASK),
                                 decoded[contract.EXT_EMB])


def _merge_folder(out: str, folders: list[str], split: str, domain: str, per_shard: int) -> list[ShardInfo]:
    """The chunks' samples of one (split, domain), merged by key, as consecutive shards."""
    target = f"{out}/{contract.shard_folder(split, domain)}"
    merged = heapq.merge(*(_chunk_samples(f, split, domain) for f in folders), key=lambda raw: raw["__key__"])
    infos: list[ShardInfo] = []
    batch: list[dict] = []
    previous = None

    def flush():
        data = members_tar_bytes(m for raw in batch for m in _members(raw))
        infos.append(write_shard_files(target, split, domain, len(infos), data, [_row(raw) for raw in batch]))
        batch.clear()

    for raw in merged:
        if raw["__key__"] == previous:
            raise ValueError(f"key {previous!r} was written by two chunks (the same key in two input tars); "
                             "rerun with --chunk-inputs 0 --overwrite to have one job keep one of them")
        previous = raw["__key__"]
        batch.append(raw)
        if len(batch) == per_shard:
            flush()
    if batch:
        flush()
    return infos


def _merged_letters(folders: list[str]) -> list[DeadLetter]:
    letters = []
    for folder in folders:
        for name, path in output.dead_letter_files(folder).items():
            letters += [DeadLetter.from_json(line.letter)
                        for line in output.iter_dead_letter_lines(path, f"{contract.DEAD_LETTER_DIR}/{name}")]
    return letters


def _exact_duplicate_groups(folders: list[str]) -> list[tuple[str, ...]]:
    """Sets of keys with the same decoded pixels, over every chunk (sorted, as ExactDuplicates)."""
    keys_by_digest: dict[str, list[str]] = {}
    for folder in folders:
        path = f"{folder}/{DIGESTS_FILE}"
        if not FileSystems.exists(path):
            continue
        for line in output.read_bytes(path).decode("utf-8").splitlines():
            digest, key = line.split(" ", 1)
            keys_by_digest.setdefault(digest, []).append(key)
    return [tuple(sorted(keys)) for keys in keys_by_digest.values() if len(keys) > 1]


def _clear_stitched(out: str) -> None:
    """What a killed stitch left in OUT (shard folders, dead letters, a manifest)."""
    existing = [p for p in (f"{out}/{n}" for n in contract.OUTPUT_ENTRIES) if FileSystems.exists(p)]
    if existing:
        FileSystems.delete(existing)


def stitch(out: str, plan: RunPlan, n_chunks: int) -> dict:
    """The done chunks -> the shards, sidecars, dead letters and manifest of one job; returns
    the manifest. Memory: one sample per chunk and one shard at a time, the dead letters and
    the (digest, key) pairs."""
    out = out.rstrip("/")
    folders = [chunk_dir(out, i) for i in range(n_chunks)]
    _clear_stitched(out)
    manifests = [json.loads(output.read_bytes(f"{f}/{contract.MANIFEST}").decode("utf-8")) for f in folders]
    shards: list[ShardInfo] = []
    for split, domain in contract.split_domains():
        shards += _merge_folder(out, folders, split, domain, plan.config.samples_per_shard)
    letters = _merged_letters(folders)
    if letters:
        write_atomic(f"{out}/{contract.DEAD_LETTER_FILE}", dead_letter_lines(letters))
    reasons: dict[str, int] = {}
    for m in manifests:
        for reason, n in m.get("dead_letter_reasons", {}).items():
            reasons[reason] = reasons.get(reason, 0) + n
    header = plan.manifest_header()
    if plan.identity:
        combine = IdentityTotals()
        totals = combine.merge_accumulators(
            [{**combine.create_accumulator(), **(m.get("identity") or {}).get("totals", {})} for m in manifests])
        header["identity"] = {**plan.identity_header(), "totals": combine.extract_output(totals),
                              "exact_duplicates": _exact_duplicates_section(_exact_duplicate_groups(folders))}
    manifest = build_manifest(header=header, shards=shards, dead_counts=reasons,
                              launch_inputs=sum(m["counts"]["inputs"] for m in manifests), streamed_inputs=0)
    write_run_outputs(out, manifest, shards)
    FileSystems.delete([chunks_root(out)])
    return manifest
