"""The pipeline, composed from the transforms in the paper's order:

  ingest -> unique keys -> decode -> caption -> attribute caption -> mask -> embed -> pair -> write
                                  \\-> general domain: given text, null embedding ---------> write

`plan_run` does the launcher-side work (enumerate inputs, build/resolve models, handlers);
`build_pipeline` adds the steps to a Beam pipeline. Tests call both on a TestPipeline.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Optional

import apache_beam as beam

import prep
from prep.pipeline.config import ResolvedModels, RunConfig, resolve_models
from prep.pipeline.fingerprint import fingerprint_caption, fingerprint_clip, fingerprint_mask
from prep.pipeline.gpu_plan import caption_copies
from prep.pipeline.outputs import WriteDeadLetters, WriteManifest
from prep.pipeline.resume import RETRY_PLAN, RUN_STATE, ResumeState
from prep.pipeline.splits import SPLITS, TRAIN, assign_splits
from prep.schemas.records import GENERAL, SPECIFIC, DeadLetter, Sample, SourceItem, SourceReport
from prep.transforms import sources
from prep.transforms.attributes import add_attribute_caption
from prep.transforms.caption import CaptionHandler
from prep.transforms.common import DEAD, counter, dead
from prep.transforms.decode import DecodeImages, DecodeParams
from prep.transforms.embed import EmbedHandler, embed_dim, null_embedding
from prep.transforms.inference import ModelStage
from prep.transforms.mask import MaskHandler
from prep.transforms.pair import PairByIdentity, null_refs
from prep.transforms.write import WriteShards, write_atomic


@dataclass
class RunPlan:
    config: RunConfig
    models: ResolvedModels
    items: list[SourceItem] = field(default_factory=list)
    ingest_dead: list[DeadLetter] = field(default_factory=list)
    wds_urls: list[str] = field(default_factory=list)
    reports: list[SourceReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    dim: int = 0
    items_pattern: Optional[str] = None  # set by stage_items(): the items are read from files
    caption: Optional[CaptionHandler] = None
    mask: Optional[MaskHandler] = None
    embed: Optional[EmbedHandler] = None

    @property
    def launch_inputs(self) -> int:
        return len(self.items) + len(self.ingest_dead)

    def manifest_header(self) -> dict:
        return {
            "created_by": f"prep {prep.__version__}",
            "config": self.config.to_json(),
            "embedding_dim": self.dim,
            "models": {
                "caption": {**self.caption.describe(), "fingerprint": fingerprint_caption(self.models.caption_model)},
                "mask": {**self.mask.describe(), "fingerprint": fingerprint_mask(self.models.mask_model)},
                "embed": {
                    **self.embed.describe(),
                    "fingerprint": fingerprint_clip(self.models.clip_model, self.models.clip_pretrained),
                },
            },
            "sources": [r.to_json() for r in self.reports],
            "warnings": list(self.warnings),
            "splits": self.split_counts(),
        }

    def split_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for item in self.items:
            if item.domain == SPECIFIC:
                counts[item.split or TRAIN] = counts.get(item.split or TRAIN, 0) + 1
        return dict(sorted(counts.items()))


def plan_run(config: RunConfig) -> RunPlan:
    """Everything decided before the pipeline starts: inputs, models, handlers."""
    config.validate()
    models = resolve_models(config)
    plan = RunPlan(config=config, models=models)
    seen: dict[str, str] = {}
    given: set[tuple[str, str]] = set()
    for spec in config.inputs:
        kind, location = sources.parse_input_spec(spec)
        where = (kind, sources.normalize_root(location) if kind != "wds" else location)
        if where in given:
            plan.warnings.append(f"input {spec!r} repeats an earlier input; it is read once")
            continue
        given.add(where)
        if kind == "wds":
            urls, report = sources.plan_wds(location)
            plan.wds_urls.extend(u for u in urls if u not in plan.wds_urls)
        else:
            planner = sources.plan_celeba if kind == "celeba" else sources.plan_folder
            items, letters, report = planner(location)
            plan.ingest_dead.extend(letters)
            for item in items:
                if item.key in seen:
                    plan.ingest_dead.append(
                        DeadLetter.of(item, "ingest", f"duplicate key: {item.key} is also {seen[item.key]}")
                    )
                else:
                    seen[item.key] = item.path
                    plan.items.append(item)
        report.spec = spec
        plan.reports.append(report)
    plan.items, split_warnings = assign_splits(plan.items, val_fraction=config.val_fraction, seed=config.seed)
    plan.warnings.extend(split_warnings)
    plan.dim = embed_dim(models.clip_model)
    plan.caption = CaptionHandler(
        models.caption_model,
        prompt=config.caption_prompt,
        max_new_tokens=config.caption_max_new_tokens,
        num_beams=config.caption_num_beams,
        device=config.device,
        trust_remote_code=config.trust_remote_code,
        max_batch_size=config.caption_batch_size,
        prepare_threads=config.prepare_threads,
        large_model=caption_copies(config) is not None,  # on cuda: one copy per machine by default
        model_copies=caption_copies(config),
    )
    plan.mask = MaskHandler(
        models.mask_model,
        threshold=config.mask_threshold,
        min_fraction=models.mask_min_fraction,
        device=config.device,
        max_batch_size=config.mask_batch_size,
        prepare_threads=config.prepare_threads,
    )
    plan.embed = EmbedHandler(
        models.clip_model,
        models.clip_pretrained,
        fill=tuple(config.mask_fill),
        device=config.device,
        max_batch_size=config.embed_batch_size,
        prepare_threads=config.prepare_threads,
    )
    return plan


INLINE_ITEMS = 10_000  # above this, the planned items go to files, not into the job graph
ITEMS_PER_FILE = 50_000
PLAN_DIR = "_plan"


def _item_line(item: SourceItem) -> str:
    return json.dumps(dataclasses.asdict(item), sort_keys=True, ensure_ascii=False)


def _parse_item(line: str) -> SourceItem:
    return SourceItem(**json.loads(line))


def stage_items(plan: RunPlan, out: str, inline_limit: Optional[int] = None) -> None:
    """Write the planned items as JSON lines under OUT/_plan/ when there are many.

    `beam.Create` embeds its elements in the job graph: at CelebA scale that is ~7 MB of
    Dataflow's 10 MB limit. From files, the workers read the items and the graph stays small.
    """
    if len(plan.items) <= (INLINE_ITEMS if inline_limit is None else inline_limit):
        plan.items_pattern = None
        return
    base = f"{out.rstrip('/')}/{PLAN_DIR}"
    ordered = sorted(plan.items, key=lambda i: i.key)
    for n, start in enumerate(range(0, len(ordered), ITEMS_PER_FILE)):
        lines = "".join(_item_line(i) + "\n" for i in ordered[start:start + ITEMS_PER_FILE])
        write_atomic(f"{base}/items-{n:05d}.jsonl", lines.encode("utf-8"))
    plan.items_pattern = f"{base}/items-*.jsonl"


class _DropDuplicateKeys(beam.DoFn):
    """Keeps, for a key produced twice (two sources, two tars), the input with the smallest path."""

    def __init__(self):
        self._dropped = counter("ingest", "duplicate_keys")

    def process(self, sample: Sample, winners):
        winner = winners.get(sample.key)
        if winner is not None and sample.path != winner:
            self._dropped.inc()
            yield dead(DeadLetter.of(sample, "ingest", f"duplicate key: {sample.key} is also {winner}"))
        else:
            yield sample


class UniqueKeys(beam.PTransform):
    """Keys must be unique from ingest to shard; only (key, path) pairs are shuffled to check."""

    def expand(self, samples):
        winners = (
            samples
            | "KeyPath" >> beam.Map(lambda s: (s.key, s.path)).with_output_types(tuple[str, str])
            | "GroupPaths" >> beam.GroupByKey()
            | "Repeated" >> beam.FlatMap(lambda kv: [(kv[0], min(kv[1]))] if len(list(kv[1])) > 1 else [])
        )
        out = samples | "Drop" >> beam.ParDo(_DropDuplicateKeys(), winners=beam.pvalue.AsDict(winners)).with_outputs(
            DEAD, main="ok"
        )
        return out.ok, out[DEAD]


class _FinishGeneral(beam.DoFn):
    """General domain: the caption is the given text (or the VLM's), the embedding is φ."""

    def __init__(self, dim: int):
        self._dim = dim

    def process(self, sample: Sample):
        caption = (sample.caption_vlm if sample.caption_vlm is not None else sample.text or "").strip()
        if not caption:
            yield dead(DeadLetter.of(sample, "caption", "no caption: general-domain sample has no text (use --caption-general)"))
            return
        yield null_refs(sample.with_(caption=caption, embedding=null_embedding(self._dim)), self._dim)


def _by_domain(sample: Sample, _n: int) -> int:
    return 0 if sample.domain == SPECIFIC else 1


def _refs_by_split(entry, _n: int) -> int:
    return SPLITS.index(entry[1].split or TRAIN)


def _key_in(record, keys: frozenset[str]) -> bool:
    return record.key in keys


def _by_split(sample: Sample, _n: int) -> int:
    return SPLITS.index(sample.split or TRAIN)


def split_dir(out: str, split: str) -> str:
    """Train shards live in OUT/<domain>/ (contract v1); other splits in OUT/<split>/<domain>/."""
    return out if split == TRAIN else f"{out}/{split}"


class _SkipDone(beam.DoFn):
    """Resume: samples already in complete shards are not processed again."""

    def __init__(self, done: frozenset[str]):
        self._done = done
        self._skipped = counter("resume", "skipped")

    def process(self, sample: Sample):
        if sample.key in self._done:
            self._skipped.inc()
        else:
            yield sample


def build_pipeline(p: beam.Pipeline, plan: RunPlan, resume: Optional[ResumeState] = None) -> None:
    cfg = plan.config
    resume = resume or ResumeState()
    out = cfg.out.rstrip("/")
    letters = []

    # Ingest: small items fan out before the bytes are read.
    only = resume.only_keys
    if plan.items_pattern and only is None:
        listed = (
            p
            | "ListImages" >> beam.io.ReadFromText(plan.items_pattern, validate=False)
            | "ParseItems" >> beam.Map(_parse_item).with_output_types(SourceItem)
        )
    else:
        listed = p | "ListImages" >> beam.Create(plan.items if only is None else [i for i in plan.items if i.key in only])
    items = listed | "FanOutImages" >> beam.Reshuffle()
    images = items | "ReadImages" >> beam.ParDo(sources.ReadImageBytes()).with_outputs(DEAD, main="ok")
    tars = p | "ListTars" >> beam.Create(plan.wds_urls) | "FanOutTars" >> beam.Reshuffle()
    pairs = tars | "ReadTars" >> beam.ParDo(sources.ReadWdsShard()).with_outputs(DEAD, main="ok")
    letters += [p | "IngestDeadLetters" >> beam.Create(plan.ingest_dead), images[DEAD], pairs[DEAD]]
    streamed_inputs = (
        (pairs.ok, pairs[DEAD]) | "StreamedInputs" >> beam.Flatten() | "CountStreamed" >> beam.combiners.Count.Globally()
    )
    samples = (images.ok, pairs.ok) | "AllInputs" >> beam.Flatten()
    samples, duplicates = samples | "UniqueKeys" >> UniqueKeys()
    letters.append(duplicates)
    if resume.done_keys:
        samples = samples | "SkipDone" >> beam.ParDo(_SkipDone(resume.done_keys))
    if only is not None:
        samples = samples | "OnlyRetried" >> beam.Filter(_key_in, keys=only)

    decode = DecodeParams(
        max_pixels=cfg.max_pixels, min_side=cfg.min_side, max_aspect=cfg.max_aspect, max_side=cfg.max_side
    )
    decoded = samples | "Decode" >> beam.ParDo(DecodeImages(decode)).with_outputs(DEAD, main="ok")
    letters.append(decoded[DEAD])
    specific, general = decoded.ok | "SplitDomains" >> beam.Partition(_by_domain, 2)

    # Caption (VLM) -> attribute caption. General images are captioned only if asked.
    if cfg.caption_general:
        specific = (specific, general) | "ToCaption" >> beam.Flatten()
    captioned, failed = specific | "Caption" >> ModelStage(plan.caption)
    letters.append(failed)
    if cfg.caption_general:
        specific, general = captioned | "SplitCaptioned" >> beam.Partition(_by_domain, 2)
    else:
        specific = captioned
    specific = specific | "AttributeCaption" >> beam.Map(add_attribute_caption, sep=cfg.caption_join)

    # Mask -> embed the masked object -> pair with same-identity samples.
    specific, failed = specific | "Mask" >> ModelStage(plan.mask)
    letters.append(failed)
    specific, failed = specific | "Embed" >> ModelStage(plan.embed)
    letters.append(failed)
    refs = specific | "Pair" >> PairByIdentity(cfg.refs_per_sample, cfg.seed, plan.dim, done=resume.specific)

    general = general | "FinishGeneral" >> beam.ParDo(_FinishGeneral(plan.dim)).with_outputs(DEAD, main="ok")
    letters.append(general[DEAD])

    # Write shards (whole identities per split), dead letters and the manifest.
    by_split = specific | "SplitBySplit" >> beam.Partition(_by_split, len(SPLITS))
    refs_by_split = refs | "SplitRefsBySplit" >> beam.Partition(_refs_by_split, len(SPLITS))
    done, first, kept = resume.keys, resume.first_index, resume.kept_indices()
    written = [
        general.ok | "WriteGeneral" >> WriteShards(
            out, GENERAL, cfg.samples_per_shard, done.get((TRAIN, GENERAL), ()), first.get((TRAIN, GENERAL), 0),
            kept_indices=kept.get((TRAIN, GENERAL), ()),
        )
    ]
    for split, part, part_refs in zip(SPLITS, by_split, refs_by_split):
        if split != TRAIN and not any(i.split == split for i in plan.items):
            continue
        label = "WriteSpecific" if split == TRAIN else f"WriteSpecific{split.title()}"
        infos = part | label >> WriteShards(
            split_dir(out, split), SPECIFIC, cfg.samples_per_shard, done.get((split, SPECIFIC), ()),
            first.get((split, SPECIFIC), 0), refs=part_refs, kept_indices=kept.get((split, SPECIFIC), ()),
        )
        if split != TRAIN:
            infos = infos | f"Tag{split.title()}" >> beam.Map(dataclasses.replace, split=split)
        written.append(infos)
    if resume.shards:
        written.append(p | "KeptShards" >> beam.Create(resume.shards))
    shard_infos = written | "AllShards" >> beam.Flatten()
    dead_letters = letters | "AllDeadLetters" >> beam.Flatten()
    if only is not None:  # a retry: a sample already in a shard is never also a dead letter
        dead_letters = (
            dead_letters | "OnlyRetriedDead" >> beam.Filter(_key_in, keys=only),
            p | "KeptDeadLetters" >> beam.Create(resume.kept_letters),
        ) | "WithKeptDeadLetters" >> beam.Flatten()
    dead_letters | "WriteDeadLetters" >> WriteDeadLetters(out)
    launch_inputs = plan.launch_inputs
    if resume.inputs is not None:  # a retry: the inputs are still the original run's
        launch_inputs = resume.inputs
        streamed_inputs = p | "NoStreamedInputs" >> beam.Create([0])
    shard_infos | "WriteManifest" >> WriteManifest(out, plan.manifest_header(), launch_inputs, dead_letters, streamed_inputs)


def output_exists(out: str) -> bool:
    from apache_beam.io.filesystems import FileSystems

    return any(
        FileSystems.exists(f"{out.rstrip('/')}/{name}") for name in ("manifest.json", SPECIFIC, GENERAL, "dead_letter", *SPLITS[1:])
    )


def clear_output(out: str) -> None:
    from apache_beam.io.filesystems import FileSystems

    base = out.rstrip("/")
    names = ("manifest.json", RUN_STATE, RETRY_PLAN, PLAN_DIR, SPECIFIC, GENERAL, "dead_letter", *SPLITS[1:])
    paths = [f"{base}/{n}" for n in names]
    existing = [p for p in paths if FileSystems.exists(p)]
    if existing:
        FileSystems.delete(existing)



