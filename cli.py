"""prep turns images into training triplets (image, object embedding, caption) for
encoder-based personalised text-to-image models, written as WebDataset shards.

How it is built: a thin Typer shell. Each command parses, validates, logs the resolved config
and calls one plain function (which the tests call directly). `prep run`'s options are
generated from RunConfig's fields (pipeline/config.py), help panel included.

Options that `prep run` does not know must be Beam pipeline options (anything else is an
error naming the closest option); they pass through unchanged:
  prep run --input celeba:DIR --out gs://b/out --runner=DataflowRunner --project=P --region=R ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import os
import sys
import typing
from typing import Any, List, Optional

import typer

ABOUT = __doc__.split("\n\n")[0]  # `prep --help`: what prep does, in one sentence
app = typer.Typer(add_completion=False, no_args_is_help=True, help=ABOUT)
log = logging.getLogger("prep")


def _register_subcommands() -> None:
    from prep.trainer.cli import (
        register,  # imports only typer: `prep --help` stays fast
    )

    register(app)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from prep.pipeline.quiet import drop_import_noise, drop_model_load_failure_log

    drop_import_noise()
    from prep.pipeline.console import (  # imports Beam: after the filter above
        WarnOnce,
        WorkerLogEntries,
    )

    once = WarnOnce()
    for handler in logging.getLogger().handlers:
        for f in (WorkerLogEntries(), once):  # in this order: once sees the worker's message alone
            handler.addFilter(f)
    if not verbose:
        drop_model_load_failure_log()  # the run ends with its message in one `error:` line (_run_cmd)
        for noisy in ("apache_beam", "absl"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


def _config_parameters() -> tuple[list[inspect.Parameter], dict[str, Any]]:
    """One CLI option per RunConfig field: its flags, help and default come from the field."""
    from prep.pipeline.config import RunConfig

    hints = typing.get_type_hints(RunConfig)
    params, annotations = [], {}
    for f in dataclasses.fields(RunConfig):
        kind = f.metadata.get("cli_type") or hints[f.name]
        kind = List[str] if kind == list[str] else kind
        if f.default is dataclasses.MISSING:
            default = ...
        elif "cli_default" in f.metadata:
            default = f.metadata["cli_default"]
        else:
            default = f.metadata.get("cli_text") or f.default
        flags = f.metadata.get("flags") or ()
        if kind is bool and f.default is False and not flags:
            flags = (f"--{f.name.replace('_', '-')}",)  # a plain switch: no --no-X twin widening the table
        option = typer.Option(default, *flags, help=f.metadata.get("help"), rich_help_panel=f.metadata["panel"],
                              metavar=f.metadata.get("metavar"))
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind))
        annotations[f.name] = kind
    return params, annotations


PROGRESS_INTERVAL = 10.0  # seconds between plain progress lines (not a terminal)
RUN_HELP = "\n\n".join(" ".join(paragraph) for paragraph in (
    ("Caption, attribute-caption, mask, embed and pair images; write WebDataset shards.",),
    ("Presets: paper and small download their model weights on first use (Hugging Face hub,",
     "open_clip, rembg) and need a network then; tiny builds small random models locally and runs offline."),
    ("Options not listed here must be Apache Beam pipeline options; they pass through to Beam unchanged,",
     "e.g. --runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp."),
))


def _run_cmd(
    ctx: typer.Context,
    retry_dead_letter: bool = False,
    no_progress: bool = False,
    verbose: bool = False,
    dry_run: bool = False,
    **values: Any,
):
    """Caption, attribute-caption, mask, embed and pair images; write WebDataset shards (RUN_HELP)."""
    _setup_logging(verbose)
    from prep.pipeline import preflight
    from prep.pipeline.beam_options import runner_problems, unknown_options
    from prep.pipeline.config import RunConfig
    from prep.schemas import contract

    try:  # strict options: what is not prep's must be a Beam option (pipeline/beam_options.py)
        unknown = unknown_options(ctx.args, [o for p in ctx.command.params for o in (*p.opts, *p.secondary_opts)])
    except ValueError as exc:
        unknown = [str(exc)]
    unknown += runner_problems(ctx.args)  # a runner prep cannot run: refused before anything starts
    if unknown:
        typer.echo("\n".join(f"error: {line}" for line in unknown), err=True)
        raise typer.Exit(2)
    try:
        config = RunConfig.from_cli(values)
        config.validate()
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if dry_run:
        text, ok = preflight.dry_run(config, ctx.args)
        typer.echo(text)
        raise typer.Exit(0 if ok else 2)
    try:  # models, inputs, GPU memory: before OUT is touched, before the pipeline's imports
        checked = preflight.preflight(config, ctx.args)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    from prep.pipeline.console import RunConsole
    from prep.pipeline.run import OutputExists, format_summary, run

    local = not any(a.startswith("--runner") for a in ctx.args)
    log.info("config: %s", json.dumps(config.to_json(), sort_keys=True))
    log.info("beam options: %s", ctx.args)
    from prep.pipeline.interrupts import Interrupted, interruptible
    from prep.transforms.inference import ModelUnavailable

    try:
        with interruptible(), RunConsole(interval=PROGRESS_INTERVAL, enabled=local and not no_progress,
                                         verbose=verbose):
            manifest = run(config, ctx.args, retry_dead_letter=retry_dead_letter, checked=checked)
    except Interrupted:  # Ctrl-C / SIGTERM: one line (said already); main() exits 130 / 143, OUT resumable
        raise
    except (OutputExists, FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except RuntimeError as exc:  # a model the preflight found could not be loaded (a corrupt file, say)
        said = ModelUnavailable.said_in(exc)
        if said is None:
            raise
        typer.echo(f"error: {said}\nfix it and rerun the same command to resume", err=True)
        raise typer.Exit(1) from None
    if manifest is not None:
        typer.echo(format_summary(manifest, config.out))
        if not manifest.get("reconciled"):
            raise typer.Exit(1)
        counts = manifest.get("counts", {})
        if not counts.get("specific") and not counts.get("general"):
            typer.echo(f"error: no sample was written ({counts.get('inputs', 0)} input(s), all dead-lettered); "
                       f"see {config.out.rstrip('/')}/{contract.DEAD_LETTER_DIR}/", err=True)
            raise typer.Exit(1)


def _register_run() -> None:
    """`prep run`: RunConfig's fields, then the options of this command alone."""
    params, annotations = _config_parameters()
    from prep.pipeline.config import PANEL_IO, PANEL_RUNNER

    own = [
        ("retry_dead_letter", bool, typer.Option(
            False, "--retry-dead-letter", rich_help_panel=PANEL_IO,
            help="on a complete output: redo only its dead-lettered inputs and merge them in as new shards")),
        ("no_progress", bool, typer.Option(
            False, "--no-progress", rich_help_panel=PANEL_RUNNER,
            help="no per-stage counts, rates and ETA while it runs (shown for local runners)")),
        ("verbose", bool, typer.Option(
            False, "--verbose", "-v", rich_help_panel=PANEL_RUNNER,
            help="INFO logs, worker processes' logs included")),
        ("dry_run", bool, typer.Option(
            False, "--dry-run", rich_help_panel=PANEL_RUNNER,
            help="check models and inputs, print the plan and stop; writes nothing to OUT")),
    ]
    for name, kind, option in own:
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind))
        annotations[name] = kind
    ctx = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    _run_cmd.__signature__ = inspect.Signature([ctx, *params])
    _run_cmd.__annotations__ = {"ctx": typer.Context, **annotations}
    app.command("run", help=RUN_HELP, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(_run_cmd)


_register_run()


@app.command("validate")
def validate_cmd(out: str = typer.Argument(..., help="output directory of prep run")):
    """Check an output directory against the shard contract; exit 1 on any violation."""
    _setup_logging(False)
    from prep.schemas.validate import format_report, validate_output

    report = validate_output(out)
    typer.echo(format_report(report))
    if not report.ok:
        raise typer.Exit(1)


@app.command("diff")
def diff_cmd(
    a: str = typer.Argument(..., metavar="A", help="an output of prep run (the before)"),
    b: str = typer.Argument(..., metavar="B", help="another output (the after)"),
    as_json: bool = typer.Option(False, "--json", help="the whole report as JSON, for scripts"),
    examples: int = typer.Option(3, min=0, help="examples per changed field"),
):
    """What changed between two outputs: per field, samples changed, added and removed, with
    examples side by side, and counts per split. Exit 0 when identical, 1 when they differ."""
    _setup_logging(False)
    from prep.report.diff import diff_outputs, format_diff

    try:
        report = diff_outputs(a, b, examples=examples)
    except FileNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(report.to_json(), indent=1, sort_keys=True) if as_json else format_diff(report))
    if not report.identical:
        raise typer.Exit(1)


attributes_app = typer.Typer(add_completion=False, no_args_is_help=True,
                              help="f_a as a network: an attribute probe on the stored embeddings (docs/attributes.md)")
app.add_typer(attributes_app, name="attributes")


@attributes_app.command("fit")
def attributes_fit_cmd(
    out: str = typer.Argument(..., metavar="OUT", help="an output of prep run with attribute labels (CelebA)"),
    save: str = typer.Option(..., "--save", metavar="PROBE", help="folder to write the probe to"),
    attributes: Optional[str] = typer.Option(None, help="only these attributes, comma-separated (default: all labelled)"),
    min_count: Optional[int] = typer.Option(None, min=1, help="positives and negatives an attribute needs in each split"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
):
    """Fit one probe per attribute on OUT's train split, choose thresholds and measure on its
    val split (other identities), and on its test split when there is one; save it to PROBE."""
    _setup_logging(False)
    from prep.models import attribute_probe

    kwargs = {"min_count": min_count} if min_count is not None else {}
    try:
        probe = attribute_probe.fit_output(out, attributes=attributes.split(",") if attributes else None, **kwargs)
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    probe.save(save)
    typer.echo(json.dumps(probe.report, indent=1, sort_keys=True) if as_json else attribute_probe.format_report(probe))
    typer.echo(f"probe: {save} ({len(probe.names)} attributes, embedding model "
               f"{attribute_probe.describe_embed_model(probe.embed_model)})")


@app.command("weights")
def weights_cmd(
    out: str = typer.Argument(..., metavar="OUT", help="an output of prep run"),
    balance: str = typer.Option(..., help="attributes to balance, comma-separated (e.g. Male,Young)"),
    max_weight: float = typer.Option(10.0, help="cap on a sample's weight (weights have mean 1)"),
    split: str = typer.Option("train", help="the split to weigh"),
):
    """Per-sample sampling weights that balance the chosen attributes' combinations (inverse
    frequency, mean 1, capped), beside the shards as NNNNNN_weights.parquet; recorded in the
    manifest. `prep train --weights` samples by them."""
    _setup_logging(False)
    from prep.report.weights import format_weights, write_weights

    try:
        record = write_weights(out, balance.split(","), max_weight=max_weight, split=split)
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(format_weights(record))


@app.command("inspect")
def inspect_cmd(
    out_dir: str = typer.Argument(..., metavar="OUT", help="output directory of prep run (local path or gs://...)"),
    html: str = typer.Option("report.html", "--html", "--out", "-o",
                             help="where to write the HTML page (--out: the older name, still accepted)"),
    samples: int = typer.Option(24, min=0, help="triplets on the contact sheet"),
    seed: int = typer.Option(0, help="seed that chooses the triplets"),
    identity: Optional[str] = typer.Option(None, help="contact sheet: only this identity (glob)"),
    key: Optional[str] = typer.Option(None, help="contact sheet: only keys matching this glob, e.g. 'celeba_0001*'"),
    attributes: Optional[str] = typer.Option(
        None, help="the bias view: these attributes too, comma-separated (always: Male, Young, Pale_Skin, Attractive, "
                   "Eyeglasses)"),
):
    """Write one self-contained HTML page of an output: counts, dead letters, charts, sampled triplets."""
    _setup_logging(False)
    from prep.report import format_summary, inspect_output

    try:
        summary = inspect_output(out_dir, html, samples=samples, seed=seed, identity=identity, key=key,
                                 attributes=attributes.split(",") if attributes else None)
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(format_summary(summary))


@app.command("demo-data")
def demo_data_cmd(
    out_dir: str = typer.Argument(..., help="where to write the synthetic dataset"),
    identities: int = typer.Option(8),
    images_per_identity: int = typer.Option(4),
    general_shards: int = typer.Option(2),
    general_per_shard: int = typer.Option(8),
    corrupt: int = typer.Option(0, help="also write this many corrupt images (they must be dead-lettered)"),
    lsun_records: int = typer.Option(12, help="images in the LSUN-layout database OUT_DIR/lsun/dog (plus one bad "
                                              "record); 0 for none"),
    seed: int = typer.Option(0),
):
    """Write a synthetic CelebA-layout dataset, img2dataset-style general shards and an LSUN-layout database."""
    _setup_logging(False)
    from prep.demo import write_demo_data

    info = write_demo_data(
        out_dir, identities=identities, images_per_identity=images_per_identity,
        general_shards=general_shards, general_per_shard=general_per_shard, seed=seed, corrupt=corrupt,
        lsun_records=lsun_records,
    )
    typer.echo(json.dumps(info, indent=1))


@app.command("demo-models")
def demo_models_cmd(
    out_dir: str = typer.Argument(..., help="where to write the tiny captioners, one folder per family"),
    family: Optional[List[str]] = typer.Option(
        None, "--family", help="only this family, by model_type (repeatable): blip-2, paligemma, florence2, "
                               "qwen2_vl, smolvlm, llava_onevision"),
    seed: int = typer.Option(0),
):
    """Write tiny random-weight captioners of each VLM family, built offline, for --caption-model."""
    import os

    from prep.models.demo_models import INDEX_FILE, build_demo_models

    try:
        built = build_demo_models(out_dir, families=family or None, seed=seed)
    except (ValueError, ImportError, FileExistsError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    with open(os.path.join(out_dir, INDEX_FILE), encoding="utf-8") as f:
        index = json.load(f)
    for model_type, folder in built.items():
        typer.echo(f"{model_type}: {folder} ({index[model_type]['params']} parameters)")
    example = built.get("qwen2_vl") or next(iter(built.values()))
    typer.echo(f"try: prep run --input ... --caption-model {example} --preset tiny ...")


_register_subcommands()


def main(argv: Optional[list[str]] = None) -> None:
    from prep.pipeline.interrupts import Interrupted

    try:
        app(args=argv if argv is not None else sys.argv[1:], prog_name="prep")
    except Interrupted as exc:  # the one line is said: leave now, skipping the interpreter's shutdown
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(exc.exit_code)


if __name__ == "__main__":
    main()
