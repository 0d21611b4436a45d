"""`run(config, beam_args)`: the one function behind `prep run` (the CLI only parses)."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import sys
import tempfile
from typing import Optional, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from prep.atomic import write_json
from prep.pipeline import chunks
from prep.pipeline.beam_options import recorded as recorded_beam_options
from prep.pipeline.build import build_pipeline, plan_run, reuse_plan
from prep.pipeline.config import RunConfig
from prep.pipeline.console import (
    format_stage_table,
    make_local_runner,
    planned_totals,
    stage_counters,
)
from prep.pipeline.items import stage_items
from prep.pipeline.local import (
    SAMPLES_PER_TAR_GUESS,
    check_options,
    is_local,
    resolve_workers,
    sets_direct_options,
    worker_args,
    worker_environment,
    worker_provision_info,
)
from prep.pipeline.out_folder import clear_output, files_under, foreign_files, output_exists
from prep.pipeline.preflight import Preflight, preflight
from prep.pipeline.resume import (
    clear_retry_plan,
    read_run_state,
    run_digest,
    scan_completed,
    scan_for_retry,
    write_run_state,
)
from prep.schemas import contract
from prep.transforms.common import progress_note, progress_plan

log = logging.getLogger(__name__)


class OutputExists(RuntimeError):
    pass


def make_runner(options: PipelineOptions):
    """The runner the options name; with none named, Beam's in-memory FnApiRunner.

    (The DirectRunner first tries the Prism runner, which downloads a binary: offline that
    fails and falls back to the same FnApiRunner, slower and leaving files behind.)
    Options known to lose or garble elements (multi_threading) are refused: pipeline/local.py.
    """
    check_options(options)
    if options.view_as(StandardOptions).runner:
        return None
    return make_local_runner(provision_info=worker_provision_info(options))  # pipeline/console.py: workers' output


def notice(text: str) -> None:
    """A line about what the run does, in the console's style ([prep  1.2s] ...) when a local
    run's console shows progress, else on stderr as `prep: ...` (never a timestamped log line)."""
    from prep.transforms.common import _console

    if _console() is not None:
        progress_note(text)
    else:
        print(f"prep: {text}", file=sys.stderr, flush=True)


def what_differs(state: dict, config: RunConfig) -> str:
    """Which settings of a partial run's recorded config (its _run.json) this config changes,
    e.g. `--seed 0 -> 1`; else its inputs' files or models' weights differ (the digest covers them)."""
    before = state.get("config") or {}
    now = config.to_json()
    changed = [name for name in config.digest_json() if name in before and before[name] != now.get(name)]
    if changed:
        return ", ".join(f"--{name.replace('_', '-')} {before[name]!r} -> {now.get(name)!r}" for name in changed)
    return "its inputs (files found) or its models' weights, not its settings"


def read_manifest(out: str) -> dict:
    with FileSystems.open(f"{out.rstrip('/')}/{contract.MANIFEST}") as f:
        return json.loads(f.read().decode("utf-8"))


def run(
    config: RunConfig,
    beam_args: Optional[Sequence[str]] = None,
    *,
    wait: bool = True,
    retry_dead_letter: bool = False,
    checked: Optional[Preflight] = None,
) -> Optional[dict]:
    """Check the output folder, plan, build and run the pipeline; return the manifest.

    An output folder that holds a complete run (a manifest) is refused unless `overwrite`.
    One that holds a partial run of the same config and inputs (its `_run.json` digest
    matches) is resumed: complete shards are verified by checksum and kept, the rest redone.
    A folder that holds files but no prep output (a wrong --out) is refused too unless
    `overwrite`. `overwrite` removes only prep's own files (contract.is_run_file).

    First of all, the preflight (pipeline/preflight.py; `checked`: its report when the
    caller ran it already) checks the Beam options, every model, every input and the GPU
    memory plan, and raises before anything is written.
    """
    config.validate()
    if config.reuses_out():
        return _run_in_place(config, beam_args, wait=wait, checked=checked)
    check_options(PipelineOptions(list(beam_args or [])))  # before anything is written
    checked = checked or preflight(config, beam_args or [])
    for warning in checked.warnings():
        log.warning("%s", warning)
    out = config.out.rstrip("/")
    complete = FileSystems.exists(f"{out}/{contract.MANIFEST}")
    partial = not complete and (output_exists(out) or read_run_state(out) is not None)
    if retry_dead_letter and config.overwrite:
        raise ValueError("--retry-dead-letter keeps the existing shards; it cannot be combined with --overwrite")
    if retry_dead_letter and not complete:
        raise OutputExists(f"--retry-dead-letter needs a complete run in {config.out} (no manifest.json there)")
    if complete and not (config.overwrite or retry_dead_letter):
        raise OutputExists(
            f"{config.out} already holds a complete run (manifest.json); pass --overwrite to redo it, "
            "or --retry-dead-letter to redo only its dead-lettered inputs"
        )
    if not (complete or config.overwrite):
        foreign = foreign_files(out)
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise OutputExists(
                f"{config.out} is not empty and holds no prep output ({len(foreign)} file(s): {shown}); "
                "choose an empty or new folder, or pass --overwrite (it removes only prep's own files "
                "and leaves these where they are)"
            )
    plan = plan_run(config)
    progress_note(f"planned {len(plan.items)} image(s) and {len(plan.wds_urls)} tar(s) from {len(config.inputs)} input(s)")
    plan.beam_options = recorded_beam_options(beam_args or [])
    progress_note("hashing model weights (cached after the first run)")
    digest = run_digest(config, plan.items, plan.wds_urls, plan.hash_model_weights())
    resume = None
    if retry_dead_letter:
        state = read_run_state(out)
        if state is None or state.get("digest") != digest:
            raise OutputExists(
                f"--retry-dead-letter must use the config, inputs and models of the run in {config.out}; they differ"
            )
        resume = scan_for_retry(out, read_manifest(out))
        notice(f"retrying {len(resume.only_keys)} dead-lettered input(s) of {out}")
    elif (complete or partial) and config.overwrite:
        clear_output(out)
    elif partial:
        state = read_run_state(out)
        if state is None or state.get("digest") != digest:
            why = "was not written by prep" if state is None else f"differs: {what_differs(state, config)}"
            raise OutputExists(f"{config.out} holds a partial run that {why}; pass --overwrite to replace it")
        if chunks.read_chunk_plan(out) is not None:  # a chunked run resumes chunk by chunk
            notice(f"resuming the chunked run in {out}: finished chunks are kept")
        else:
            resume = scan_completed(out)
            notice(f"resuming {out}: {len(resume.shards)} complete shard(s) kept ({len(resume.done_keys)} samples), "
                   f"{len(resume.removed)} partial file(s) removed")
    write_run_state(out, digest, config.to_json())
    plan.items_pattern = stage_items(plan.items, out)
    for report in plan.reports:
        for warning in report.warnings:
            log.warning("%s: %s", report.spec, warning)
    for warning in plan.warnings:
        log.warning("%s", warning)
    beam_args = list(beam_args or [])
    local = is_local(PipelineOptions(beam_args))
    workers = 1
    if local:
        planned = len(plan.items) + SAMPLES_PER_TAR_GUESS * len(plan.wds_urls)
        workers = resolve_workers(config.workers, config.preset, config.device, planned)
        log.info("local run on %d worker process(es)", workers)
    progress_plan(planned_totals(plan, resume))
    progress_note("starting the pipeline")
    # Large local inputs run in chunks of whole identities, memory bounded by --chunk-inputs;
    # with --workers N, N chunks at a time, each in its own process (pipeline/chunks.py).
    parts = None if resume is not None else chunks.chunks_for(out, plan, local)
    if parts is not None:
        log.info("%d inputs in %d chunks of about %d", plan.launch_inputs, len(parts), config.chunk_inputs)
        pool = 1 if sets_direct_options(beam_args) else workers  # the user's own Beam mode, chunk by chunk
        run_chunk = functools.partial(_run_chunk, beam_args=beam_args if pool > 1 else worker_args(workers, beam_args))
        manifest, counters = chunks.run_chunks(out, plan, parts, run_chunk, workers=pool)
        return {**record_reuse(out, plan, manifest, counters), "stage_counters": counters}
    if local:
        beam_args = worker_args(workers, beam_args)
    result = _run_pipeline(plan, resume, beam_args, wait=wait)
    if not wait:
        return None
    # Not in manifest.json: this run's Beam counters, for the summary's per-stage table.
    counters = stage_counters(result)
    manifest = {**record_reuse(out, plan, read_manifest(config.out), counters), "stage_counters": counters}
    if resume is not None and retry_dead_letter:
        clear_retry_plan(out)  # the manifest now covers the retry's shards and dead letters
        manifest = {**manifest, "retried": len(resume.only_keys)}
    elif resume is not None:
        manifest = {**manifest, "resumed": {"kept_shards": len(resume.shards), "kept_samples": len(resume.done_keys)}}
    return manifest


PAIR_SPILL_PREFIX = "prep-pair-"  # then the pid of the run that made it


def remove_orphaned_spills(root: str) -> list[str]:
    """Remove the pairing folders in `root` that a killed run left (its process is gone: a
    SIGKILL skips the run's own cleanup); returns their paths. Folders of live runs stay."""
    removed = []
    for name in sorted(os.listdir(root)):
        pid = name[len(PAIR_SPILL_PREFIX):].split("-", 1)[0] if name.startswith(PAIR_SPILL_PREFIX) else ""
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            removed.append(os.path.join(root, name))
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _run_chunk(plan, resume, beam_args: Sequence[str]) -> dict[str, int]:
    """One chunk of a chunked run (pipeline/chunks.py), in this process or a chunk worker's:
    its stage counters."""
    return stage_counters(_run_pipeline(plan, resume, beam_args))


def _run_pipeline(plan, resume, beam_args: Sequence[str], wait: bool = True):
    """Build the plan's pipeline and run it (waiting for it unless `wait` is False).

    A local run that waits pairs through files in a temporary folder, removed when the run
    ends (`PairByIdentity(spill_dir=)`: its workers all share this machine's disk, and the
    in-memory runner holds a grouping several times over in memory); a killed run's folder
    goes at the next local run (`remove_orphaned_spills`)."""
    options = PipelineOptions(list(beam_args))
    runner = make_runner(options)
    with contextlib.ExitStack() as stack:
        pair_spill = None
        if wait and is_local(options):
            remove_orphaned_spills(tempfile.gettempdir())
            pair_spill = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"{PAIR_SPILL_PREFIX}{os.getpid()}-"))
        p = beam.Pipeline(runner=runner, options=options)
        build_pipeline(p, plan, resume, pair_spill=pair_spill)
        with worker_environment(options):  # thread counts the SDK worker processes inherit
            result = p.run()
        if wait:
            result.wait_until_finish()
    return result


IN_PLACE_SUFFIX = ".reuse-new"  # OUT + this: where `--reuse OUT --out OUT` writes before it replaces OUT


def _run_in_place(config: RunConfig, beam_args, *, wait: bool, checked) -> Optional[dict]:
    """`--reuse OUT --out OUT`: the run writes OUT.reuse-new, reusing OUT; only once that is
    complete does it replace OUT (renames; the old output is removed last). Interrupted, OUT is
    untouched and the same command resumes OUT.reuse-new. OUT must be a complete output holding
    only prep's files (the user's own files would not follow the rename)."""
    import dataclasses

    from prep.schemas.output import read_bytes

    out = config.out.rstrip("/")
    if not FileSystems.exists(f"{out}/{contract.MANIFEST}"):
        raise OutputExists(f"--reuse {config.reuse}: {out} holds no complete run (manifest.json) to reuse")
    foreign = [rel for rel in files_under(out) if not contract.is_run_file(rel) and rel != contract.DATASET_CARD]
    if foreign:
        raise OutputExists(f"--reuse {out} --out {out}: {out} also holds files that are not prep's "
                           f"({', '.join(foreign[:5])}); write to a new folder instead")
    new = out + IN_PLACE_SUFFIX
    staged = dataclasses.replace(config, out=new, reuse=out)
    manifest = run(staged, beam_args, wait=wait, checked=checked)
    if manifest is None:
        return None
    old = f"{out}.reuse-old"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)
    # The manifest and run state name the folder they were written in: name the final one.
    for name in (contract.MANIFEST, contract.RUN_STATE):
        path = f"{out}/{name}"
        if FileSystems.exists(path):
            data = json.loads(read_bytes(path))
            data["config"]["out"] = config.out
            if name == contract.MANIFEST and "reused_from" in data:
                data["reused_from"]["in_place"] = True
            write_json(path, data)
    notice(f"{out}: replaced by the new output (reused from itself)")
    fixed = {**manifest, "config": {**manifest["config"], "out": config.out}}
    if "reused_from" in fixed:
        fixed["reused_from"] = {**fixed["reused_from"], "in_place": True}
    return fixed


def record_reuse(out: str, plan, manifest: dict, counters: dict) -> dict:
    """--reuse: the manifest records `reused_from` (PREV_OUT's manifest sha256, and per stage
    the samples reused and computed); rewritten atomically once the run is complete."""
    if not plan.config.reuse:
        return manifest
    from prep.pipeline.console import computed_samples
    from prep.pipeline.reuse import REUSED_STAGES

    reuse = reuse_plan(plan)  # planned by the pipeline, or here for a chunked run's launcher
    stages = {}
    for stage in REUSED_STAGES:
        stages[stage] = {"reused": counters.get(f"reuse.{stage}_reused", 0), "computed": computed_samples(counters, stage)}
    manifest = {**manifest, "reused_from": {"out": reuse.prev, "manifest_sha256": reuse.manifest_sha256,
                                            "stages": stages, "notes": list(reuse.notes),
                                            "unreadable": counters.get("reuse.prev_unreadable", 0)}}
    write_json(f"{out.rstrip('/')}/{contract.MANIFEST}", manifest)
    return manifest


def format_summary(manifest: dict, out: str) -> str:
    """The end of `prep run`: the per-stage table (pipeline/console.py: stage_rows; its numbers
    are the manifest's), where the shards went, identity totals, dead letters by reason, sources.
    A source's warnings were logged when the run started: here they are counted, not repeated."""
    from prep.schemas.output import random_weights_note

    counts = manifest["counts"]
    lines = format_stage_table(manifest)
    lines.append(
        f"inputs {counts['inputs']}: specific {counts['specific']}, general {counts['general']}, "
        f"dead-lettered {counts['dead_lettered']} ({'reconciled' if manifest.get('reconciled') else 'NOT RECONCILED'})",
    )
    shards = manifest.get("shards", [])
    folders = sorted({(s.get("split", contract.TRAIN), s["domain"]) for s in shards},
                     key=lambda f: (f[0] != contract.TRAIN, f))
    for split, domain in folders:
        mine = [s for s in shards if s.get("split", contract.TRAIN) == split and s["domain"] == domain]
        where = f"{out.rstrip('/')}/{contract.shard_folder(split, domain)}/"
        lines.append(f"{split} {domain}: {len(mine)} shard(s), {sum(s['count'] for s in mine)} samples -> {where}")
    identity = manifest.get("identity")
    if identity:
        t = identity.get("totals") or {}
        by_status = t.get("samples") or {}
        models = ", ".join(f"{kind} {mode}" for kind, mode in sorted((identity.get("models") or {}).items()))
        lines.append(
            f"identity ({models}): {t.get('identities', 0)} identities, {t.get('identities_verified', 0)} verified; "
            f"samples {', '.join(f'{k} {v}' for k, v in by_status.items()) or 'none'}; "
            f"{t.get('duplicate_pairs', 0)} near-duplicate pairs; "
            f"{(identity.get('exact_duplicates') or {}).get('count', 0)} exact duplicates"
        )
    for reason, n in manifest.get("dead_letter_reasons", {}).items():
        lines.append(f"dead letter  {n:6d}  {reason}")
    for flag, n in (manifest.get("caption_flags") or {}).items():
        lines.append(f"caption kept {n:6d}  flagged: {flag}")
    contradicted = manifest.get("caption_contradictions") or {}
    if contradicted:
        lines.append("caption words against the labels: "
                     + ", ".join(f"{attr} {n}" for attr, n in contradicted.items()) + " (prep inspect lists them)")
    counters = manifest.get("stage_counters") or {}
    reused = manifest.get("reused_from")
    if reused:
        lines.append(f"reused from {reused['out']}: " + ", ".join(
            f"{stage} {s['reused']} reused / {s['computed']} computed" for stage, s in reused["stages"].items()))
        lines += [f"  {note}" for note in reused.get("notes") or []]
    if counters.get("attributes.predicted"):
        lines.append(f"attributes predicted by the probe for {counters['attributes.predicted']} unlabelled sample(s)")
    doubted = manifest.get("attribute_doubts") or {}
    if doubted:
        lines.append("labels the attribute probe doubts: "
                     + ", ".join(f"{attr} {n}" for attr, n in doubted.items()) + " (prep inspect lists them)")
    for source in manifest.get("sources", []):
        line = f"source {source['spec']}: {source['items']} inputs"
        if source.get("missing_on_disk"):
            examples = ", ".join(source.get("missing_examples", [])[:3])
            line += f"; {source['missing_on_disk']} annotated images not on disk (e.g. {examples})"
        if source.get("warnings"):
            line += f"; {len(source['warnings'])} warning(s), shown when the run started (manifest: sources)"
        lines.append(line)
    if counts["dead_lettered"]:
        lines.append(f"dead letters: {out.rstrip('/')}/{contract.DEAD_LETTER_DIR}/")
    lines.append(f"manifest: {out.rstrip('/')}/{contract.MANIFEST}")
    note = random_weights_note(manifest)
    if note:
        lines.append(note)
    return "\n".join(lines)
