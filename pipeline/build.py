"""The pipeline, composed from the transforms in the paper's order:

  ingest -> unique keys -> decode -> caption -> attribute caption -> mask -> embed -> pair -> write
                                  \\-> general domain: given text, null embedding ---------> write

`plan_run` does the launcher-side work (enumerate inputs, build/resolve models, handlers);
`build_pipeline` adds the steps to a Beam pipeline. Tests call both on a TestPipeline.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import apache_beam as beam

import prep
from prep.atomic import write_atomic
from prep.pipeline.config import (
    ALWAYS_ITS_OWN_OBJECT,
    ResolvedModels,
    RunConfig,
    resolve_models,
    singleton_refs_modes,
)
from prep.pipeline.fingerprint import (
    fingerprint_caption,
    fingerprint_clip,
    fingerprint_face,
    fingerprint_mask,
)
from prep.pipeline.gpu_plan import caption_copies
from prep.pipeline.items import INLINE_ITEMS, parse_item
from prep.pipeline.outputs import WriteDeadLetters, WriteDigests, WriteManifest
from prep.pipeline.resume import Continuation
from prep.pipeline.reuse import ReusePlan, join_previous, plan_reuse, stage_fingerprints, stage_or_reuse
from prep.pipeline.splits import SPLITS, TRAIN, assign_splits
from prep.schemas import contract
from prep.schemas.records import (
    GENERAL,
    SPECIFIC,
    DeadLetter,
    DeadLetterKind,
    Sample,
    SourceItem,
    SourceReport,
)
from prep.transforms import sources
from prep.transforms.attributes import add_attribute_caption
from prep.transforms.caption import CaptionHandler
from prep.transforms.common import DEAD, counter, dead
from prep.transforms.decode import DecodeImages, DecodeParams
from prep.transforms.embed import EmbedHandler, embed_dim, null_embedding
from prep.transforms.identity import (
    DropListed,
    ExactDuplicates,
    IdentityHandler,
    duplicate_letters,
)
from prep.transforms.inference import ModelStage
from prep.transforms.mask import MaskHandler
from prep.transforms.pair import (
    IdentityTotals,
    PairByIdentity,
    Refs,
    is_outlier,
    mode_of,
    null_refs,
    outlier_letter,
)
from prep.transforms.views import MakeViews, is_view_key, view_entry, with_views
from prep.transforms.write import WriteShards


@dataclass
class RunPlan:
    config: RunConfig
    models: ResolvedModels
    items: list[SourceItem] = field(default_factory=list)
    ingest_dead: list[DeadLetter] = field(default_factory=list)
    wds_urls: list[str] = field(default_factory=list)
    wds_origins: dict[str, dict] = field(default_factory=dict)  # url -> {"input": n, "tar": relative}
    wds_namespaces: dict[str, str] = field(default_factory=dict)  # url -> its input's key namespace
    reports: list[SourceReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    dim: int = 0
    items_pattern: Optional[str] = None  # set from items.stage_items(): the items are read from files
    caption: Optional[CaptionHandler] = None
    mask: Optional[MaskHandler] = None
    embed: Optional[EmbedHandler] = None
    identity: dict[str, IdentityHandler] = field(default_factory=dict)  # "face" / "clip" -> its stage
    fingerprints: Optional[dict[str, dict]] = None  # set once by hash_model_weights()
    digests_out: Optional[str] = None  # a chunk of a chunked run: where its (pixel digest, key) pairs go
    beam_options: list[str] = field(default_factory=list)  # as given (secrets redacted), for the manifest
    reuse: Optional[ReusePlan] = None  # --reuse PREV_OUT, once planned (pipeline/reuse.py)

    @property
    def launch_inputs(self) -> int:
        return len(self.items) + len(self.ingest_dead)

    def hash_model_weights(self) -> dict[str, dict]:
        """Hash every model's weights (GBs for the paper preset; cached across runs by
        path, size and mtime in pipeline/fingerprint.py), once per plan."""
        if self.fingerprints is None:
            self.fingerprints = {
                "caption": fingerprint_caption(self.models.caption_model),
                "mask": fingerprint_mask(self.models.mask_model),
                "embed": fingerprint_clip(self.models.clip_model, self.models.clip_pretrained),
            }
            if "face" in self.identity:
                self.fingerprints["identity"] = fingerprint_face(self.config.face_model)
        return self.fingerprints

    def models_header(self) -> dict:
        """The manifest's "models": each handler's settings and its weights' fingerprint."""
        fingerprints = self.hash_model_weights()
        handlers = {"caption": self.caption, "mask": self.mask, "embed": self.embed}
        header = {stage: {**handler.describe(), "fingerprint": fingerprints[stage],
                          "random_weights": random_weights(stage, handler)} for stage, handler in handlers.items()}
        if "face" in self.identity:
            header["identity"] = {**self.identity["face"].describe(), "fingerprint": fingerprints["identity"]}
        return header

    def identity_header(self) -> dict:
        """The manifest's "identity": the model per source and each model's thresholds (the
        pipeline adds its totals and exact duplicates)."""
        return {
            "models": {kind: mode for kind, mode in sorted(self.models.identity.items())
                       if any(i.source == kind for i in self.items)},
            "thresholds": {mode: {"same": t.same, "duplicate": t.duplicate}
                           for mode, t in sorted(self.models.thresholds.items())},
            "ref_strategy": self.config.ref_strategy,
            "outliers": self.config.identity_outliers,
        }

    def manifest_header(self) -> dict:
        header = {
            "created_by": f"prep {prep.__version__}",
            "config": self.config.to_json(),
            "embedding_dim": self.dim,
            "models": self.models_header(),
            "sources": [r.to_json() for r in self.reports],
            "warnings": list(self.warnings),
            "splits": self.split_counts(),
            "stage_fingerprints": self.stage_fingerprints(),
        }
        if self.beam_options:  # contract v1 addition: present when Beam options were given
            header["beam_options"] = list(self.beam_options)
        return header

    def stage_fingerprints(self) -> dict:
        """What decides each reusable stage's output (pipeline/reuse.py), as the manifest records it."""
        return stage_fingerprints(self.config.to_json(), self.models_header(), self.models.mask_min_fraction)

    def split_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for item in self.items:
            if item.domain == SPECIFIC:
                counts[item.split or TRAIN] = counts.get(item.split or TRAIN, 0) + 1
        return dict(sorted(counts.items()))


def random_weights(stage: str, handler) -> bool:
    """Whether a stage's model has random weights: built by prep (the tiny preset's models,
    models/tiny.py), or an open_clip architecture with no pretrained weights named."""
    from prep.models.tiny import built_at_random

    if stage == "embed":
        return not handler.pretrained or built_at_random(handler.pretrained) or built_at_random(handler.model_id)
    return built_at_random(handler.model_id)


def plan_run(config: RunConfig) -> RunPlan:
    """Everything decided before the pipeline starts: inputs, models, handlers."""
    config.validate()
    models = resolve_models(config)
    plan = RunPlan(config=config, models=models)
    seen: dict[str, str] = {}
    given: set[tuple[str, str]] = set()
    namespaces = sources.input_namespaces(config.inputs)  # every key starts with its input's namespace
    for n, spec in enumerate(config.inputs):  # n: lineage, which input (manifest config.inputs / sources)
        kind, location = sources.parse_input_spec(spec)
        where = (kind, sources.normalize_root(location) if kind != "wds" else location)
        if where in given:
            plan.warnings.append(f"input {spec!r} repeats an earlier input; it is read once")
            continue
        given.add(where)
        if kind == "wds":
            urls, report = sources.plan_wds(location)
            root = report.stats.get("folder") or pattern_root(location)
            shared = 0
            for url in urls:
                if url not in plan.wds_origins:
                    plan.wds_urls.append(url)
                    plan.wds_origins[url] = {"input": n, "tar": relative_to(root, url)}
                    plan.wds_namespaces[url] = namespaces[n]
                else:
                    shared += 1
            if shared:
                plan.warnings.append(f"input {spec!r}: {shared} of its tar(s) are also in an earlier input; "
                                     "each is read once, as part of the earlier input")
        else:
            planner = {"celeba": sources.plan_celeba, "folder": sources.plan_folder, "lsun": sources.plan_lsun}[kind]
            items, letters, report = planner(location, namespaces[n])
            plan.ingest_dead.extend(letters)
            for item in items:
                item = dataclasses.replace(item, origin={"input": n, **(item.origin or {})})
                if item.key in seen:
                    plan.ingest_dead.append(
                        DeadLetter.of(item, "ingest", DeadLetterKind.DUPLICATE_KEY, f"duplicate key: {item.key} is also {seen[item.key]}")
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
        large_model=caption_copies(config) is not None,  # on cuda: one copy per machine by default
        model_copies=caption_copies(config),
        prepare_threads=config.prepare_threads,
        on_bad=config.caption_on_bad,
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
    used = {models.identity.get(i.source, "none") for i in plan.items}
    plan.identity = {
        mode: IdentityHandler(mode, face_model=config.face_model, no_face=config.no_face,
                              detect_max_side=config.face_detect_max_side, device=config.device,
                              max_batch_size=config.identity_batch_size, prepare_threads=config.prepare_threads)
        for mode in models.identity_modes() if mode in used
    }
    return plan


def pattern_root(pattern: str) -> str:
    """The folder of a tar pattern before any brace or glob: '/d/laion/{0..9}.tar' -> '/d/laion'."""
    head = re.split(r"[{*?\[]", pattern, maxsplit=1)[0]
    return head.rsplit("/", 1)[0] if "/" in head else ""


def relative_to(root: str, url: str) -> str:
    """A tar's path relative to its pattern's folder (lineage that does not move with the data)."""
    prefix = root.rstrip("/") + "/"
    return url[len(prefix):] if root and url.startswith(prefix) else url


class _DropDuplicateKeys(beam.DoFn):
    """Keeps, for a key produced twice (two sources, two tars), the input with the smallest path."""

    def __init__(self):
        self._dropped = counter("ingest", "duplicate_keys")

    def process(self, sample: Sample, winners):
        winner = winners.get(sample.key)
        if winner is not None and sample.path != winner:
            self._dropped.inc()
            yield dead(DeadLetter.of(sample, "ingest", DeadLetterKind.DUPLICATE_KEY, f"duplicate key: {sample.key} is also {winner}"))
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
        self._no_caption = counter("caption", "dead_lettered")  # the caption stage's letters, counted once

    def process(self, sample: Sample):
        caption = (sample.caption_vlm if sample.caption_vlm is not None else sample.text or "").strip()
        if not caption:
            self._no_caption.inc()
            yield dead(DeadLetter.of(sample, "caption", DeadLetterKind.NO_CAPTION, "no caption: general-domain sample has no text (use --caption-general)"))
            return
        yield null_refs(sample.with_(caption=caption, embedding=null_embedding(self._dim)), self._dim)


def reuse_plan(plan: RunPlan) -> Optional[ReusePlan]:
    """--reuse PREV_OUT: the stages whose fingerprints match PREV_OUT's (pipeline/reuse.py)."""
    if not plan.config.reuse:
        return None
    if plan.reuse is None:
        plan.reuse = plan_reuse(plan.config.reuse, plan.stage_fingerprints())
    return plan.reuse


def _stage(samples, stage: str, handler, label: str, reuse: Optional[ReusePlan]):
    """One model stage; with --reuse, the samples that reuse its output pass it by."""
    if reuse is None or stage not in reuse.stages:
        return samples | label >> ModelStage(handler)
    return stage_or_reuse(samples, stage, lambda todo: todo | label >> ModelStage(handler), label)


def view_maker(plan: RunPlan) -> Optional[MakeViews]:
    """The views DoFn when some input kind's singletons get augmented refs, else None (the
    graph is then what it always was)."""
    modes = singleton_refs_modes(plan.config)
    every = frozenset(kind for kind, mode in modes.items() if mode == "augment" and kind in ALWAYS_ITS_OWN_OBJECT)
    counted = Counter((i.source, i.identity) for i in plan.items
                      if modes.get(i.source) == "augment" and i.source not in every)
    singles = sorted(i.key for i in plan.items if i.source not in every and counted.get((i.source, i.identity)) == 1)
    if not every and not singles:
        return None
    if len(singles) <= INLINE_ITEMS:
        return MakeViews(plan.config.singleton_refs_k, plan.config.seed, every, frozenset(singles))
    # Many singletons (a folder of one-photo identities): a file the workers read, not the job graph.
    path = f"{plan.config.out.rstrip('/')}/{contract.PLAN_DIR}/singletons.txt"
    write_atomic(path, "".join(k + "\n" for k in singles).encode("utf-8"))
    return MakeViews(plan.config.singleton_refs_k, plan.config.seed, every, frozenset(), singletons_path=path)


def _view_or_not(sample: Sample, _n: int) -> int:
    return 1 if sample.view_of is not None else 0


class _DropViewLetters(beam.DoFn):
    """A view that fails a stage is not an input: counted, never a dead letter."""

    def __init__(self, stage: str):
        self._failed = counter("views", f"failed_{stage.lower()}")

    def process(self, letter):
        if is_view_key(letter.key):
            self._failed.inc()
        else:
            yield letter


def _not_views(letters, stage: str):
    return letters | f"{stage}NotViews" >> beam.ParDo(_DropViewLetters(stage))


def _by_domain(sample: Sample, _n: int) -> int:
    return 0 if sample.domain == SPECIFIC else 1


def _refs_by_split(entry, _n: int) -> int:
    return SPLITS.index(entry[1].split or TRAIN)


def _key_in(record, keys: frozenset[str]) -> bool:
    return record.key in keys


def _by_split(sample: Sample, _n: int) -> int:
    return SPLITS.index(sample.split or TRAIN)


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


def build_pipeline(p: beam.Pipeline, plan: RunPlan, resume: Optional[Continuation] = None,
                   pair_spill: Optional[str] = None) -> None:
    """The paper's steps, top to bottom. `resume` (a killed run, or --retry-dead-letter) only
    says what to skip at ingest and what the writers and the manifest add; see pipeline/resume.py (Resume, Retry).
    `pair_spill`: a local folder every worker shares, for pairing's file shuffle (local runs;
    None: Beam's grouping, as on Dataflow)."""
    cfg = plan.config
    resume = resume or Continuation()
    samples, letters, streamed_inputs = _ingest(p, plan, resume)

    decode = DecodeParams(
        max_pixels=cfg.max_pixels, min_side=cfg.min_side, max_aspect=cfg.max_aspect, max_side=cfg.max_side,
        decoded_cache_mb=cfg.decoded_cache_mb,
    )
    keep = DecodeImages.ALL if cfg.caption_general else DecodeImages.SPECIFIC  # who decodes them again
    # The stages that read the pixels again: caption, mask, embed; the identity stage of the
    # sources it verifies; general images only the caption, when captioned.
    reads = {"specific": 3, "general": 1 if cfg.caption_general else 0}
    decoded = samples | "Decode" >> beam.ParDo(DecodeImages(
        decode, keep_pixels=keep, reads=reads, identity_modes=plan.models.identity,
        identity_staged=frozenset(plan.identity))).with_outputs(DEAD, main="ok")
    letters.append(decoded[DEAD])
    reuse = reuse_plan(plan)
    usable = join_previous(decoded.ok, reuse) if reuse is not None else decoded.ok
    specific, general = usable | "SplitDomains" >> beam.Partition(_by_domain, 2)

    # Caption (VLM) -> attribute caption. General images are captioned only if asked.
    if cfg.caption_general:
        specific = (specific, general) | "ToCaption" >> beam.Flatten()
    captioned, failed = _stage(specific, "caption", plan.caption, "Caption", reuse)
    letters.append(failed)
    if cfg.caption_general:
        specific, general = captioned | "SplitCaptioned" >> beam.Partition(_by_domain, 2)
    else:
        specific = captioned
    specific = specific | "AttributeCaption" >> beam.Map(add_attribute_caption, sep=cfg.caption_join)

    # Singletons (an LSUN record, a one-photo identity) get augmented views of their own
    # image, masked and embedded with the others; they leave before the identity step.
    views = view_maker(plan)
    if views is not None:
        specific = specific | "SingletonViews" >> beam.ParDo(views)

    # Mask -> embed the masked object -> pair with same-identity samples.
    specific, failed = _stage(specific, "mask", plan.mask, "Mask", reuse)
    letters.append(_not_views(failed, "Mask") if views is not None else failed)
    specific, failed = _stage(specific, "embed", plan.embed, "Embed", reuse)
    letters.append(_not_views(failed, "Embed") if views is not None else failed)
    if views is not None:
        specific, embedded_views = specific | "SplitViews" >> beam.Partition(_view_or_not, 2)
    if cfg.attribute_model:  # f_a: predicted attributes for unlabelled faces, doubts on labelled ones
        from prep.transforms.attribute_predict import ApplyAttributeProbe

        specific = specific | "AttributeProbe" >> beam.ParDo(
            ApplyAttributeProbe(cfg.attribute_model, cfg.attribute_doubt, cfg.caption_join, cfg.attribute_kind_set()))

    # Identity: faces / hashes -> exact duplicates -> verified same-identity refs.
    specific = _identity_stages(plan, specific, letters)
    written = [(w.candidate.pixel_sha256, w.key) for w in resume.specific if w.candidate is not None]
    exact = ExactDuplicates(written)
    duplicate_groups = specific | "ExactDuplicates" >> exact
    if plan.digests_out:  # a chunk: exact duplicates across chunks are found when they are stitched
        exact.digests | "WriteDigests" >> WriteDigests(plan.digests_out)
    if cfg.drop_duplicates:
        listed = duplicate_groups | "DuplicateLetters" >> beam.FlatMap(duplicate_letters)
        specific, dropped = specific | "DropDuplicates" >> DropListed(listed, "exact_duplicates")
        letters.append(dropped)
    pair = PairByIdentity(cfg.refs_per_sample, cfg.seed, plan.dim, done=resume.specific, mode=plan.models.identity,
                          thresholds=plan.models.thresholds, strategy=cfg.ref_strategy, spill_dir=pair_spill)
    refs = specific | "Pair" >> pair
    if cfg.identity_outliers == "drop":
        outliers = refs | "Outliers" >> beam.Filter(is_outlier) | "OutlierLetters" >> beam.Map(outlier_letter)
        specific, dropped = specific | "DropOutliers" >> DropListed(outliers, "outliers")
        letters.append(dropped)
        refs = refs | "KeepVerdicts" >> beam.Filter(_not_outlier)

    if views is not None:  # identity refs where pairing found any, else the views'
        view_refs = embedded_views | "ViewEntries" >> beam.Map(view_entry).with_output_types(tuple[str, tuple])
        keyed = refs | "TypeRefs" >> beam.Map(lambda entry: entry).with_output_types(tuple[str, Refs])
        refs = ({"refs": keyed, "views": view_refs} | "JoinViews" >> beam.CoGroupByKey()
                | "RefsOrViews" >> beam.FlatMap(with_views, refs_cls=Refs).with_output_types(tuple[str, Refs]))

    general = general | "FinishGeneral" >> beam.ParDo(_FinishGeneral(plan.dim)).with_outputs(DEAD, main="ok")
    letters.append(general[DEAD])

    shard_infos = _write_shards(p, plan, resume, specific, refs, general.ok)
    dead_letters = _dead_letters(p, resume, letters)
    dead_letters | "WriteDeadLetters" >> WriteDeadLetters(cfg.out.rstrip("/"))
    launch_inputs = plan.launch_inputs
    if resume.inputs is not None:  # a retry: the inputs are still the original run's
        launch_inputs = resume.inputs
        streamed_inputs = p | "NoStreamedInputs" >> beam.Create([0])
    sections = {}
    if plan.identity:
        sections["identity"] = _identity_section(plan, pair.groups, duplicate_groups)
    shard_infos | "WriteManifest" >> WriteManifest(
        cfg.out.rstrip("/"), plan.manifest_header(), launch_inputs, dead_letters, streamed_inputs, sections
    )


def _by_identity_mode(sample: Sample, _n: int, modes: list[str], by_source: dict[str, str]) -> int:
    mode = mode_of(by_source, sample.source)
    return modes.index(mode) if mode in modes else len(modes)


def _identity_stages(plan: RunPlan, specific, letters):
    """Each specific sample through the identity stage of its source's model (face, clip);
    sources verified by none skip it."""
    if not plan.identity:
        return specific
    modes = sorted(plan.identity)
    parts = specific | "SplitIdentityModels" >> beam.Partition(
        _by_identity_mode, len(modes) + 1, modes=modes, by_source=plan.models.identity)
    done = [parts[len(modes)]]
    for i, mode in enumerate(modes):
        ok, failed = parts[i] | f"Identity{mode.title()}" >> ModelStage(plan.identity[mode])
        done.append(ok)
        letters.append(failed)
    return done | "AllIdentified" >> beam.Flatten()


def _exact_duplicates_section(groups: list) -> dict:
    ordered = sorted(list(g) for g in groups)
    return {"count": sum(len(g) - 1 for g in ordered), "groups": ordered[:100], "groups_total": len(ordered)}


def _identity_section(plan: RunPlan, group_summaries, duplicate_groups):
    """One dict: the plan's identity header, the pairing totals and the exact duplicates."""
    header = plan.identity_header()
    totals = group_summaries | "IdentityTotals" >> beam.CombineGlobally(IdentityTotals())
    duplicates = duplicate_groups | "DuplicateList" >> beam.combiners.ToList()
    return (
        totals.pipeline
        | "IdentityOnce" >> beam.Create([None])
        | "IdentitySection" >> beam.Map(_identity_manifest, header=header, totals=beam.pvalue.AsSingleton(totals),
                                        groups=beam.pvalue.AsSingleton(duplicates))
    )


def _identity_manifest(_, header: dict, totals: dict, groups: list) -> dict:
    return {**header, "totals": totals, "exact_duplicates": _exact_duplicates_section(groups)}


def _not_outlier(entry) -> bool:
    return not is_outlier(entry)


def _ingest(p: beam.Pipeline, plan: RunPlan, resume: Continuation):
    """Planned items and input tars -> unique-keyed samples still to process, the ingest dead
    letters, and the count of inputs found in tars (known only once they are read)."""
    only = resume.only_keys
    if plan.items_pattern and only is None:
        listed = (
            p
            | "ListImages" >> beam.io.ReadFromText(plan.items_pattern, validate=False)
            | "ParseItems" >> beam.Map(parse_item).with_output_types(SourceItem)
        )
    else:
        listed = p | "ListImages" >> beam.Create(plan.items if only is None else [i for i in plan.items if i.key in only])
    # Small items fan out before the bytes are read.
    items = listed | "FanOutImages" >> beam.Reshuffle()
    images = items | "ReadImages" >> beam.ParDo(sources.ReadImageBytes()).with_outputs(DEAD, main="ok")
    tars = p | "ListTars" >> beam.Create(plan.wds_urls) | "FanOutTars" >> beam.Reshuffle()
    pairs = tars | "ReadTars" >> beam.ParDo(sources.ReadWdsShard(plan.wds_origins, plan.wds_namespaces)).with_outputs(DEAD, main="ok")
    letters = [p | "IngestDeadLetters" >> beam.Create(plan.ingest_dead), images[DEAD], pairs[DEAD]]
    streamed_inputs = (
        (pairs.ok, pairs[DEAD]) | "StreamedInputs" >> beam.Flatten() | "CountStreamed" >> beam.combiners.Count.Globally()
    )
    samples = (images.ok, pairs.ok) | "AllInputs" >> beam.Flatten()
    if plan.config.exclude:  # takedowns: before any stage sees the sample
        from prep.transforms.sources.exclude import ExcludeListed

        kept = samples | "Exclude" >> beam.ParDo(ExcludeListed(plan.config.exclude)).with_outputs(DEAD, main="ok")
        samples = kept.ok
        letters.append(kept[DEAD])
    samples, duplicates = samples | "UniqueKeys" >> UniqueKeys()
    letters.append(duplicates)
    if resume.done_keys:
        samples = samples | "SkipDone" >> beam.ParDo(_SkipDone(resume.done_keys))
    if only is not None:
        samples = samples | "OnlyRetried" >> beam.Filter(_key_in, keys=only)
    return samples, letters, streamed_inputs


def _write_shards(p: beam.Pipeline, plan: RunPlan, resume: Continuation, specific, refs, general):
    """One writer per (split, domain) that has samples (whole identities per split); the shards
    a resume keeps join the written ones for the manifest."""
    cfg, out = plan.config, plan.config.out.rstrip("/")
    by_split = specific | "SplitBySplit" >> beam.Partition(_by_split, len(SPLITS))
    refs_by_split = refs | "SplitRefsBySplit" >> beam.Partition(_refs_by_split, len(SPLITS))
    written = [
        general | "WriteGeneral" >> WriteShards(out, TRAIN, GENERAL, cfg.samples_per_shard, **resume.for_writer(TRAIN, GENERAL))
    ]
    for split, part, part_refs in zip(SPLITS, by_split, refs_by_split):
        if split != TRAIN and not any(i.split == split for i in plan.items):
            continue
        label = "WriteSpecific" if split == TRAIN else f"WriteSpecific{split.title()}"
        written.append(part | label >> WriteShards(
            out, split, SPECIFIC, cfg.samples_per_shard, refs=part_refs, **resume.for_writer(split, SPECIFIC)
        ))
    if resume.shards:
        written.append(p | "KeptShards" >> beam.Create(resume.shards))
    return written | "AllShards" >> beam.Flatten()


def _dead_letters(p: beam.Pipeline, resume: Continuation, letters):
    dead_letters = letters | "AllDeadLetters" >> beam.Flatten()
    if resume.only_keys is not None:  # a retry: a sample already in a shard is never also a dead letter
        dead_letters = (
            dead_letters | "OnlyRetriedDead" >> beam.Filter(_key_in, keys=resume.only_keys),
            p | "KeptDeadLetters" >> beam.Create(resume.kept_letters),
        ) | "WithKeptDeadLetters" >> beam.Flatten()
    return dead_letters
