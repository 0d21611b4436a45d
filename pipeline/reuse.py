"""`prep run ... --reuse PREV_OUT`: change one thing, recompute one thing.

Each model stage has a fingerprint (`stage_fingerprints`): a version of its code, its model's
weights (sha256, else the model's name), its own options, its batch size and device (a padded
stage's output may depend on them), and the fingerprints of the stages it reads (embed reads
the mask). Every manifest records them (`stage_fingerprints`).

With `--reuse PREV_OUT`, a sample's stage output is taken from PREV_OUT instead of computed
when all of these hold:
- PREV_OUT's manifest has the same contract version and records that stage's fingerprint, equal
  to this run's;
- PREV_OUT has a sample of the same key whose image member is byte-identical to this run's
  decoded image (so the stage's input is the same pixels);
- for embed, the mask was reused too (its input is the masked image).
Reused: caption (`caption_vlm`, kept caption flags), mask (`KEY.mask.png`), embed
(`KEY.emb.npy`). Decode, the attribute caption, the identity step and pairing always run
(they are cheap, or read every sample's state). Anything doubtful (a damaged shard, a missing
member, an older output without fingerprints) is recomputed and counted, never reused.

Counters `reuse.<stage>_reused` / `reuse.<stage>_computed` give the table at the end of the run;
the manifest records `reused_from` (PREV_OUT's manifest sha256 and the counts per stage).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Iterator, Optional

import apache_beam as beam
import numpy as np

from prep.schemas import contract, output
from prep.schemas.records import Sample
from prep.transforms.common import counter

# Bump one when that stage's code changes what it writes: outputs of the older code are then
# recomputed, never reused.
STAGE_VERSIONS = {"caption": 1, "mask": 1, "embed": 1}
REUSED_STAGES = ("caption", "mask", "embed")


def _weights_id(fingerprint: Optional[dict]) -> Optional[str]:
    f = fingerprint or {}
    return f.get("sha256") or f.get("id")


def stage_fingerprints(config: dict, models: dict, mask_min_fraction: Optional[float]) -> dict[str, Optional[str]]:
    """{stage: sha256 of what decides its output}, from a manifest-style config (RunConfig.to_json)
    and models header; None for a stage whose model has no stable identity (not reusable)."""
    def digest(obj: dict) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()

    def weights(stage: str) -> Optional[str]:
        return _weights_id((models.get(stage) or {}).get("fingerprint"))

    found: dict[str, Optional[str]] = {}
    w = weights("caption")
    found["caption"] = None if w is None else digest({
        "version": STAGE_VERSIONS["caption"], "weights": w,
        **{k: config.get(k) for k in ("caption_prompt", "caption_max_new_tokens", "caption_num_beams", "caption_on_bad",
                                      "caption_batch_size", "device", "trust_remote_code")}})
    w = weights("mask")
    found["mask"] = None if w is None else digest({
        "version": STAGE_VERSIONS["mask"], "weights": w, "min_fraction": mask_min_fraction,
        **{k: config.get(k) for k in ("mask_threshold", "mask_batch_size", "device")}})
    w = weights("embed")
    found["embed"] = None if w is None or found["mask"] is None else digest({
        "version": STAGE_VERSIONS["embed"], "weights": w, "mask": found["mask"],
        **{k: config.get(k) for k in ("mask_fill", "embed_batch_size", "device")}})
    return found


@dataclass
class ReusePlan:
    """What this run may take from PREV_OUT: the stages whose fingerprints match, and why not
    for the others."""

    prev: str
    manifest_sha256: str = ""
    stages: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)


def plan_reuse(prev: str, ours: dict[str, Optional[str]]) -> ReusePlan:
    """Compare PREV_OUT's manifest with this run's fingerprints; FileNotFoundError when PREV_OUT
    is not a complete output."""
    raw = output.read_bytes(output.join(prev, contract.MANIFEST)) if _exists(prev) else None
    if raw is None:
        raise FileNotFoundError(f"--reuse {prev}: no {contract.MANIFEST}: not a complete output of `prep run`")
    manifest = json.loads(raw.decode("utf-8"))
    plan = ReusePlan(prev=prev, manifest_sha256=hashlib.sha256(raw).hexdigest())
    if manifest.get("schema_version") != contract.SCHEMA_VERSION:
        plan.notes.append(f"contract v{manifest.get('schema_version')}, not v{contract.SCHEMA_VERSION}: nothing reused")
        return plan
    theirs = manifest.get("stage_fingerprints")
    if not isinstance(theirs, dict):
        plan.notes.append("written before stage fingerprints were recorded: nothing reused")
        return plan
    stages = []
    for stage in REUSED_STAGES:
        if ours.get(stage) is not None and theirs.get(stage) == ours.get(stage):
            stages.append(stage)
        else:
            plan.notes.append(f"{stage}: its model or options differ from {prev}'s: recomputed")
    if "embed" in stages and "mask" not in stages:
        stages.remove("embed")
    plan.stages = tuple(stages)
    plan.shards = [s.path for s in output.list_shards(prev) if s.domain == contract.SPECIFIC]
    return plan


def _exists(prev: str) -> bool:
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.exists(output.join(prev, contract.MANIFEST))


@dataclass(frozen=True)
class Previous:
    """What PREV_OUT holds of one sample, for the stages this run may reuse."""

    image_sha256: str
    caption_vlm: Optional[str] = None
    caption_flags: tuple[str, ...] = ()
    mask_png: Optional[bytes] = None
    embedding: Optional[np.ndarray] = None


class ReadPrevious(beam.DoFn):
    """A PREV_OUT shard -> (key, Previous) for its complete samples; an unreadable shard or a
    sample missing a member yields nothing for them (recomputed), counted."""

    def __init__(self, stages: tuple[str, ...]):
        self._stages = stages
        self._bad = counter("reuse", "prev_unreadable")

    def process(self, path: str) -> Iterator[tuple[str, Previous]]:
        try:
            samples = list(contract.iter_samples(io.BytesIO(output.read_bytes(path))))
        except Exception:  # noqa: BLE001 - a damaged shard: its samples are recomputed
            self._bad.inc()
            return
        for raw in samples:
            try:
                yield raw["__key__"], self._previous(raw)
            except Exception:  # noqa: BLE001 - a missing or broken member: recomputed
                self._bad.inc()

    def _previous(self, raw: dict) -> Previous:
        meta = json.loads(raw[contract.EXT_JSON].decode("utf-8"))
        return Previous(
            image_sha256=hashlib.sha256(raw[contract.EXT_IMAGE]).hexdigest(),
            caption_vlm=meta["caption_vlm"] if "caption" in self._stages else None,
            caption_flags=tuple(meta.get("caption_flags") or ()),
            mask_png=raw[contract.EXT_MASK] if "mask" in self._stages else None,
            embedding=contract.load_npy(raw[contract.EXT_EMB]) if "embed" in self._stages else None,
        )


class AttachPrevious(beam.DoFn):
    """(key, {"new": [Sample], "prev": [Previous]}) -> the sample, with PREV_OUT's outputs for the
    stages it may reuse (its decoded image identical to PREV_OUT's), `reused` naming them."""

    def __init__(self, stages: tuple[str, ...]):
        self._stages = stages
        self._reused = {s: counter("reuse", f"{s}_reused") for s in stages}

    def process(self, entry) -> Iterator[Sample]:
        from prep.transforms.write import mask_fraction

        _, grouped = entry
        prev = list(grouped["prev"])
        for sample in grouped["new"]:
            if len(prev) != 1 or sample.image_jpeg is None or sample.domain != contract.SPECIFIC or \
                    hashlib.sha256(sample.image_jpeg).hexdigest() != prev[0].image_sha256:
                yield sample
                continue
            p, changes, reused = prev[0], {}, []
            if "caption" in self._stages and p.caption_vlm is not None:
                changes.update(caption_vlm=p.caption_vlm, caption_flags=p.caption_flags)
                reused.append("caption")
            if "mask" in self._stages and p.mask_png is not None:
                changes.update(mask_png=p.mask_png, mask_fraction=mask_fraction(p.mask_png))
                reused.append("mask")
                if "embed" in self._stages and p.embedding is not None:
                    changes.update(embedding=np.ascontiguousarray(p.embedding, np.float32))
                    reused.append("embed")
            for stage in reused:
                self._reused[stage].inc()
            yield sample.with_(**changes, reused=tuple(reused))


def join_previous(samples, plan: ReusePlan):
    """Samples -> the same samples, with what PREV_OUT lets them reuse attached."""
    if not plan.stages or not plan.shards:
        return samples
    p = samples.pipeline
    prev = (p | "ListPrevShards" >> beam.Create(plan.shards) | "FanOutPrev" >> beam.Reshuffle()
            | "ReadPrev" >> beam.ParDo(ReadPrevious(plan.stages)).with_output_types(tuple[str, Previous]))
    keyed = samples | "KeyForReuse" >> beam.Map(lambda s: (s.key, s)).with_output_types(tuple[str, Sample])
    return ({"new": keyed, "prev": prev} | "JoinPrev" >> beam.CoGroupByKey()
            | "AttachPrev" >> beam.ParDo(AttachPrevious(plan.stages)))


def _reused(sample: Sample, _n: int, stage: str) -> int:
    return 1 if stage in sample.reused else 0


def stage_or_reuse(samples, stage: str, run_stage, label: str):
    """Samples that reuse `stage` pass by; the others go through `run_stage` (a callable
    PCollection -> (ok, failed)). Returns (ok, failed)."""
    parts = samples | f"{label}Reused" >> beam.Partition(_reused, 2, stage=stage)
    todo, reused = parts[0], parts[1]
    ok, failed = run_stage(todo)
    return (reused, ok) | f"{label}WithReused" >> beam.Flatten(), failed
