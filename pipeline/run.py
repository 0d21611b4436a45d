"""`run(config, beam_args)`: the one function behind `prep run` (the CLI only parses)."""

from __future__ import annotations

import json
import logging
from typing import Optional, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from prep.pipeline.build import build_pipeline, clear_output, output_exists, plan_run
from prep.pipeline.config import RunConfig
from prep.schemas import contract

log = logging.getLogger(__name__)


class OutputExists(RuntimeError):
    pass


def make_runner(options: PipelineOptions):
    """The runner the options name; with none named, Beam's in-memory FnApiRunner.

    (The DirectRunner first tries the Prism runner, which downloads a binary: offline that
    fails and falls back to the same FnApiRunner, slower and leaving files behind.)
    """
    if options.view_as(StandardOptions).runner:
        return None
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    return FnApiRunner()


def read_manifest(out: str) -> dict:
    with FileSystems.open(f"{out.rstrip('/')}/{contract.MANIFEST}") as f:
        return json.loads(f.read().decode("utf-8"))


def run(config: RunConfig, beam_args: Optional[Sequence[str]] = None, *, wait: bool = True) -> Optional[dict]:
    """Check the output folder, plan, build and run the pipeline; return the manifest."""
    config.validate()
    exists = output_exists(config.out)
    if exists and not config.overwrite:
        raise OutputExists(
            f"{config.out} already holds output (manifest, shards or dead letters); pass --overwrite to replace it"
        )
    plan = plan_run(config)
    if exists:
        clear_output(config.out)
    for report in plan.reports:
        for warning in report.warnings:
            log.warning("%s: %s", report.spec, warning)
    options = PipelineOptions(list(beam_args or []))
    runner = make_runner(options)
    p = beam.Pipeline(runner=runner, options=options)
    build_pipeline(p, plan)
    result = p.run()
    if not wait:
        return None
    result.wait_until_finish()
    return read_manifest(config.out)


def format_summary(manifest: dict, out: str) -> str:
    counts = manifest["counts"]
    lines = [
        f"inputs {counts['inputs']}: specific {counts['specific']}, general {counts['general']}, "
        f"dead-lettered {counts['dead_lettered']} ({'reconciled' if manifest.get('reconciled') else 'NOT RECONCILED'})",
    ]
    shards = manifest.get("shards", [])
    for domain in ("specific", "general"):
        mine = [s for s in shards if s["domain"] == domain]
        if mine:
            lines.append(f"{domain}: {len(mine)} shard(s), {sum(s['count'] for s in mine)} samples -> {out.rstrip('/')}/{domain}/")
    for reason, n in manifest.get("dead_letter_reasons", {}).items():
        lines.append(f"dead letter  {n:6d}  {reason}")
    for source in manifest.get("sources", []):
        line = f"source {source['spec']}: {source['items']} inputs"
        if source.get("missing_on_disk"):
            examples = ", ".join(source.get("missing_examples", [])[:3])
            line += f"; {source['missing_on_disk']} annotated images not on disk (e.g. {examples})"
        lines.append(line)
        for warning in source.get("warnings", []):
            lines.append(f"  warning: {warning}")
    if counts["dead_lettered"]:
        lines.append(f"dead letters: {out.rstrip('/')}/{contract.DEAD_LETTER_DIR}/")
    lines.append(f"manifest: {out.rstrip('/')}/{contract.MANIFEST}")
    return "\n".join(lines)
