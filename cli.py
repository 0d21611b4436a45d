"""`prep`: a thin Typer shell. Each command parses, validates, logs the resolved config and
calls one plain function (which the tests call directly).

Options that `prep run` does not know are Beam pipeline options and pass through unchanged:
  prep run --input celeba:DIR --out gs://b/out --runner=DataflowRunner --project=P --region=R ...
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])
log = logging.getLogger("prep")


def _register_subcommands() -> None:
    from prep.trainer.cli import register  # imports only typer: `prep --help` stays fast

    register(app)


class _DropImportNoise(logging.Filter):
    """Beam warns at import that optional GCP client libraries are absent; that is expected."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "apitools not found" not in record.getMessage()


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropImportNoise())
    if not verbose:
        for noisy in ("apache_beam", "absl"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


def _parse_fill(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.split(",")]
    if len(parts) != 3:
        raise typer.BadParameter("expected R,G,B, e.g. 255,255,255")
    return parts[0], parts[1], parts[2]


@app.command(
    "run",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def run_cmd(
    ctx: typer.Context,
    inputs: List[str] = typer.Option(..., "--input", "-i", help="celeba:DIR, folder:DIR or wds:PATTERN (repeatable)"),
    out: str = typer.Option(..., "--out", "-o", help="output directory (local path or gs://...)"),
    preset: str = typer.Option("small", help="models: paper (BLIP-2, ViT-L-14, u2net), small, or tiny (offline)"),
    caption_model: Optional[str] = typer.Option(None, help="Hugging Face id or local directory"),
    caption_prompt: Optional[str] = typer.Option(None, help="prompt given to the captioner"),
    caption_max_new_tokens: int = typer.Option(30),
    caption_num_beams: int = typer.Option(1),
    caption_general: bool = typer.Option(False, help="also caption general-domain images with the VLM"),
    caption_join: str = typer.Option(". ", help="separator between the VLM and attribute captions"),
    clip_model: Optional[str] = typer.Option(None, help="open_clip model name or model-config JSON path"),
    clip_pretrained: Optional[str] = typer.Option(None, help="open_clip pretrained tag or checkpoint path"),
    mask_model: Optional[str] = typer.Option(None, help="rembg model name or a custom ONNX file"),
    mask_threshold: float = typer.Option(0.5, help="foreground when soft mask >= threshold"),
    mask_min_fraction: Optional[float] = typer.Option(None, help="dead-letter masks with less foreground"),
    mask_fill: str = typer.Option("255,255,255", help="R,G,B of the background in the masked image"),
    max_side: Optional[int] = typer.Option(None, help="downscale images whose longer side exceeds this"),
    min_side: int = typer.Option(16),
    max_aspect: float = typer.Option(10.0),
    refs_per_sample: int = typer.Option(4, help="K: same-identity references per sample"),
    seed: int = typer.Option(0),
    samples_per_shard: int = typer.Option(1000),
    val_fraction: float = typer.Option(0.0, help="whole identities into OUT/val (CelebA's partition file wins)"),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N]"),
    caption_batch_size: int = typer.Option(8),
    caption_model_copies: Optional[int] = typer.Option(
        None, help="load the captioner once per worker machine, this many copies shared by all its processes "
        "(Beam's large-model mode, for BLIP-2-sized models)"),
    mask_batch_size: int = typer.Option(8),
    embed_batch_size: int = typer.Option(32),
    prepare_threads: int = typer.Option(4, help="threads per model stage preparing inputs while the model runs (1: serial)"),
    trust_remote_code: bool = typer.Option(False, help="allow Hugging Face models with custom code"),
    model_cache: Optional[str] = typer.Option(None, help="where the tiny preset builds its models"),
    overwrite: bool = typer.Option(False, help="replace an existing output"),
    retry_dead_letter: bool = typer.Option(
        False, help="on a complete output: redo only its dead-lettered inputs and merge them in as new shards"),
    progress: bool = typer.Option(True, help="print per-stage counts and images/s every 10 s (local runners)"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Caption, attribute-caption, mask, embed and pair images; write WebDataset shards."""
    _setup_logging(verbose)
    from prep.pipeline.config import RunConfig
    from prep.pipeline.run import OutputExists, format_summary, run

    config = RunConfig(
        inputs=list(inputs), out=out, preset=preset, caption_model=caption_model,
        clip_model=clip_model, clip_pretrained=clip_pretrained, mask_model=mask_model,
        caption_prompt=caption_prompt, caption_max_new_tokens=caption_max_new_tokens,
        caption_num_beams=caption_num_beams, caption_general=caption_general, caption_join=caption_join,
        trust_remote_code=trust_remote_code, max_side=max_side, min_side=min_side, max_aspect=max_aspect,
        mask_threshold=mask_threshold, mask_min_fraction=mask_min_fraction, mask_fill=_parse_fill(mask_fill),
        refs_per_sample=refs_per_sample, seed=seed, samples_per_shard=samples_per_shard, val_fraction=val_fraction, device=device,
        caption_batch_size=caption_batch_size, caption_model_copies=caption_model_copies, mask_batch_size=mask_batch_size,
        embed_batch_size=embed_batch_size, prepare_threads=prepare_threads, overwrite=overwrite, model_cache=model_cache,
    )
    try:
        config.validate()
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if progress and not any(a.startswith("--runner") and "Dataflow" in a for a in ctx.args):
        os.environ.setdefault("PREP_PROGRESS", "10")
    log.info("config: %s", json.dumps(config.to_json(), sort_keys=True))
    log.info("beam options: %s", ctx.args)
    try:
        manifest = run(config, ctx.args, retry_dead_letter=retry_dead_letter)
    except (OutputExists, FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if manifest is not None:
        typer.echo(format_summary(manifest, out))
        if not manifest.get("reconciled"):
            raise typer.Exit(1)


@app.command("validate")
def validate_cmd(out: str = typer.Argument(..., help="output directory of prep run")):
    """Check an output directory against the shard contract; exit 1 on any violation."""
    _setup_logging(False)
    from prep.schemas.validate import format_report, validate_output

    report = validate_output(out)
    typer.echo(format_report(report))
    if not report.ok:
        raise typer.Exit(1)


@app.command("inspect")
def inspect_cmd(
    out: str = typer.Argument(..., help="output directory of prep run (local path or gs://...)"),
    html: str = typer.Option("report.html", "--out", "-o", help="where to write the HTML page"),
    samples: int = typer.Option(24, min=0, help="triplets on the contact sheet"),
    seed: int = typer.Option(0, help="seed that chooses the triplets"),
    identity: Optional[str] = typer.Option(None, help="contact sheet: only this identity (glob)"),
    key: Optional[str] = typer.Option(None, help="contact sheet: only keys matching this glob, e.g. 'celeba_0001*'"),
):
    """Write one self-contained HTML page of an output: counts, dead letters, charts, sampled triplets."""
    _setup_logging(False)
    from prep.report import format_summary, inspect_output

    try:
        summary = inspect_output(out, html, samples=samples, seed=seed, identity=identity, key=key)
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
    seed: int = typer.Option(0),
):
    """Write a synthetic CelebA-layout dataset and img2dataset-style general shards."""
    from prep.demo import write_demo_data

    info = write_demo_data(
        out_dir, identities=identities, images_per_identity=images_per_identity,
        general_shards=general_shards, general_per_shard=general_per_shard, seed=seed, corrupt=corrupt,
    )
    typer.echo(json.dumps(info, indent=1))


_register_subcommands()


def main(argv: Optional[list[str]] = None) -> None:
    app(args=argv if argv is not None else sys.argv[1:], prog_name="prep")


if __name__ == "__main__":
    main()
