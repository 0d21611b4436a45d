"""The run's bookkeeping outputs: the dead-letter file, sizes.json, the wids index and the
manifest.

The manifest is written by the pipeline itself (last step, from side inputs), so a run on
Dataflow that the launcher does not wait for still ends with a complete manifest.

`OUT/<domain>/index.wids.json` (and `OUT/<split>/<domain>/index.wids.json` for val/test) is a
wids shard index ("wids-shard-index-v1", what `widsindex create` writes): shard URLs relative
to the index file, sample counts and sizes, so `wids.ShardListDataset("OUT/specific/index.wids.json")`
gives indexed access to the samples. The manifest's "wids_index" lists them.
"""

from __future__ import annotations

import json
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from prep.atomic import write_atomic, write_json
from prep.schemas.card import write_dataset_card
from prep.schemas import contract
from prep.schemas.contract import WIDS_INDEX
from prep.schemas.records import DeadLetter, ShardInfo
from prep.transforms.common import fault_point


def wids_index(domain: str, shards: list[ShardInfo]) -> dict[str, Any]:
    """The wids shard index of one domain's shards, in shard order.

    URLs are relative: wids resolves them against the index file's own location, so the
    output folder can be moved or copied (to gs:// too) without rewriting the index.
    """
    mine = sorted((s for s in shards if s.domain == domain), key=lambda s: s.name)
    return {
        "__kind__": contract.WIDS_KIND,
        "wids_version": 1,
        "name": domain,
        "shardlist": [{"url": s.name, "nsamples": s.count, "filesize": s.bytes} for s in mine],
    }


def shard_folders(shards: list[ShardInfo]) -> list[str]:
    """The folders (relative to OUT) that get a sizes.json and a wids index: "<domain>" (train)
    and "<split>/<domain>", each that has shards. A domain without samples (no general input:
    a folder of your own photos) has no folder at all, not an empty one."""
    folders = {contract.shard_folder(s.split, s.domain) for s in shards}
    return sorted(folders, key=lambda f: (f.count("/"), f))


def dead_letter_lines(letters: list[DeadLetter]) -> bytes:
    ordered = sorted(letters, key=lambda d: (d.key, d.stage, d.reason, d.path or ""))
    return b"".join(json.dumps(d.to_json(), ensure_ascii=False, sort_keys=True).encode("utf-8") + b"\n" for d in ordered)


class _WriteDeadLetters(beam.DoFn):
    def __init__(self, out_dir: str):
        self._path = f"{out_dir.rstrip('/')}/{contract.DEAD_LETTER_FILE}"

    def process(self, element):
        _, letters = element
        write_atomic(self._path, dead_letter_lines(list(letters)))
        yield self._path


def digest_lines(pairs) -> bytes:
    """(pixel digest, key) pairs as sorted "DIGEST KEY" lines (a chunk's exact-duplicate input)."""
    return b"".join(f"{d} {k}\n".encode("utf-8") for d, k in sorted(pairs) if d)


class _WriteDigests(beam.DoFn):
    def __init__(self, path: str):
        self._path = path

    def process(self, element):
        write_atomic(self._path, digest_lines(element[1]))
        yield self._path


class WriteDigests(beam.PTransform):
    """(digest, key) pairs -> one file of sorted lines (written even when there are none)."""

    def __init__(self, path: str):
        super().__init__()
        self._path = path

    def expand(self, pairs):
        return (
            (pairs | "Keyed" >> beam.Map(lambda e: (0, e)),
             pairs.pipeline | "Always" >> beam.Create([(0, ("", ""))]))
            | "WithEmpty" >> beam.Flatten()
            | "Gather" >> beam.GroupByKey()
            | "Write" >> beam.ParDo(_WriteDigests(self._path))
        )


class WriteDeadLetters(beam.PTransform):
    """All dead letters -> contract.DEAD_LETTER_FILE, sorted by key (deterministic)."""

    def __init__(self, out_dir: str):
        super().__init__()
        self._out = out_dir

    def expand(self, letters):
        return (
            letters
            | "OneGroup" >> beam.Map(lambda d: (0, d))
            | "Gather" >> beam.GroupByKey()
            | "Write" >> beam.ParDo(_WriteDeadLetters(self._out))
        )


def build_manifest(
    *,
    header: dict[str, Any],
    shards: list[ShardInfo],
    dead_counts: dict[str, int],
    launch_inputs: int,
    streamed_inputs: int,
) -> dict[str, Any]:
    shards = sorted(shards, key=lambda s: (s.split, s.domain, s.name))
    specific = sum(s.count for s in shards if s.domain == "specific")
    general = sum(s.count for s in shards if s.domain == "general")
    inputs = launch_inputs + streamed_inputs
    dead = sum(dead_counts.values())
    manifest = {
        "schema_version": contract.SCHEMA_VERSION,
        **header,
        "counts": {
            "inputs": inputs,
            "specific": specific,
            "general": general,
            "dead_lettered": dead,
        },
        "reconciled": inputs == specific + general + dead,
        "dead_letter_reasons": dict(sorted(dead_counts.items())),
        "wids_index": {folder: f"{folder}/{WIDS_INDEX}" for folder in shard_folders(shards)},
        "shards": [
            {**{name: getattr(s, name) for name in (*contract.MANIFEST_SHARD_FIELDS, "split")},
             **({"caption_flags": s.caption_flags} if s.caption_flags else {}),
             **({"caption_contradictions": s.caption_contradictions} if s.caption_contradictions else {}),
             **({"attribute_doubts": s.attribute_doubts} if s.attribute_doubts else {})}
            for s in shards
        ],
    }
    for name in ("caption_flags", "caption_contradictions", "attribute_doubts"):
        # captions the guards flagged and --caption-on-bad keep wrote (dropped ones: dead_letter_reasons);
        # captions whose words contradict the sample's labels, per attribute
        totals: dict[str, int] = {}
        for s in shards:
            for what, n in getattr(s, name).items():
                totals[what] = totals.get(what, 0) + n
        if totals:
            manifest[name] = dict(sorted(totals.items()))
    return manifest


class _WriteManifest(beam.DoFn):
    def __init__(self, out_dir: str, header: dict, launch_inputs: int):
        self._out = out_dir.rstrip("/")
        self._header = header
        self._launch_inputs = launch_inputs

    def process(self, _, shards, dead_counts, streamed_inputs, **sections):
        shards = list(shards)
        header = {**self._header, **{name.removeprefix("section_"): value for name, value in sections.items()}}
        manifest = build_manifest(
            header=header,
            shards=shards,
            dead_counts=dict(dead_counts),
            launch_inputs=self._launch_inputs,
            streamed_inputs=streamed_inputs,
        )
        write_run_outputs(self._out, manifest, shards)
        yield manifest


def write_run_outputs(out: str, manifest: dict, shards: list[ShardInfo]) -> None:
    """sizes.json and the wids index of each (split, domain) folder, the dataset card, then manifest.json (last:
    a folder with a manifest holds a complete run). The pipeline's manifest step and the chunk
    stitcher (pipeline/chunks.py) both end here."""
    out = out.rstrip("/")
    folders = {(s.split, s.domain) for s in shards}  # as shard_folders(): only folders with shards
    for split, domain in sorted(folders):
        mine = [s for s in shards if s.split == split]
        base = f"{out}/{contract.shard_folder(split, domain)}"
        sizes = {s.name: s.count for s in sorted(mine, key=lambda s: s.name) if s.domain == domain}
        write_atomic(f"{base}/{contract.SIZES}", json.dumps(sizes, indent=1).encode("utf-8") + b"\n")
        index = wids_index(domain, mine)
        write_atomic(f"{base}/{WIDS_INDEX}", json.dumps(index, indent=1).encode("utf-8") + b"\n")
    write_dataset_card(out, manifest)  # before the manifest, which marks the run complete
    fault_point("manifest.before_write")
    stale = f"{out}/{contract.DEAD_LETTER_FILE}"
    if manifest["counts"]["dead_lettered"] == 0 and FileSystems.exists(stale):
        FileSystems.delete([stale])  # a retry that left no dead letters
    write_json(f"{out}/{contract.MANIFEST}", manifest)


class WriteManifest(beam.PTransform):
    """Shard infos + dead letters + streamed input count -> sizes.json and index.wids.json per
    domain, and manifest.json.

    Dead letters are counted per (stage, reason class) before they meet the manifest writer,
    so its memory does not grow with the number of rejected inputs.
    """

    def __init__(self, out_dir: str, header: dict, launch_inputs: int, dead_letters, streamed_inputs, sections=None):
        super().__init__()
        self._out, self._header, self._launch = out_dir, header, launch_inputs
        self._dead, self._streamed = dead_letters, streamed_inputs
        self._sections = dict(sections or {})  # manifest key -> PCollection of one dict (e.g. "identity")

    def expand(self, shard_infos):
        reasons = (
            self._dead
            | "ReasonClass" >> beam.Map(lambda d: contract.reason_count_key(d.stage, d.kind.value))
            | "CountReasons" >> beam.combiners.Count.PerElement()
        )
        return (
            shard_infos.pipeline
            | "Once" >> beam.Create([None])
            | "Write" >> beam.ParDo(
                _WriteManifest(self._out, self._header, self._launch),
                shards=beam.pvalue.AsList(shard_infos),
                dead_counts=beam.pvalue.AsList(reasons),
                streamed_inputs=beam.pvalue.AsSingleton(self._streamed),
                **{f"section_{name}": beam.pvalue.AsSingleton(pcoll) for name, pcoll in sorted(self._sections.items())},
            )
        )
