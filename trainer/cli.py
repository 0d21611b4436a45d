"""`prep train | sample | evaluate`: thin Typer commands over the trainer's plain functions.

`register(app)` adds the three commands to an existing Typer app (the `prep` CLI calls it).
Heavy imports (torch, open_clip, rembg) happen inside the commands, so `prep --help` stays fast.
"""

from __future__ import annotations

import json
import logging
from typing import List, NoReturn, Optional

import typer


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("prep.trainer").setLevel(logging.INFO)
    for handler in logging.getLogger().handlers:  # Beam's import-time note about GCP clients
        handler.addFilter(lambda record: "apitools not found" not in record.getMessage())


def _fail(exc: Exception) -> NoReturn:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(2)


def train_cmd(
    shards: str = typer.Option(..., help="output folder of `prep run` (reads OUT/specific, OUT/manifest.json)"),
    general: Optional[str] = typer.Option(None, help="general-domain shard folder (default OUT/general)"),
    out: str = typer.Option("run", help="run folder: checkpoint.pt, loss.csv, config.json"),
    ratio: float = typer.Option(0.3, help="r: fraction of domain-specific samples"),
    omega: float = typer.Option(0.5, help="ω: probability of swapping o for a same-identity reference"),
    swap_refs: str = typer.Option("all", help="refs ω may swap in: all, or identity (never an augmented view "
                                              "of the sample itself; see --singleton-refs)"),
    weights: bool = typer.Option(False, "--weights", help="sample the domain-specific shards by the weights "
                                                        "`prep weights OUT --balance ...` wrote"),
    text_drop: float = typer.Option(0.1, help="probability of dropping the caption (classifier-free guidance)"),
    object_drop: float = typer.Option(0.0, help="probability of giving a domain-specific sample φ"),
    image_size: int = typer.Option(64),
    batch_size: int = typer.Option(16),
    lr: float = typer.Option(3e-4),
    min_lr: float = typer.Option(3e-5),
    warmup: int = typer.Option(20),
    decay_steps: Optional[int] = typer.Option(None, help="cosine decay horizon (default --max-steps)"),
    max_steps: int = typer.Option(200),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N]"),
    num_workers: int = typer.Option(0, help="DataLoader workers"),
    log_every: int = typer.Option(10),
    checkpoint: Optional[str] = typer.Option(None, help="checkpoint path (default OUT_RUN/checkpoint.pt)"),
    checkpoint_every: int = typer.Option(0, help="also save every N steps (0: only at the end)"),
    resume: bool = typer.Option(True, help="continue from the checkpoint when it exists"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's choice)"),
    channels: int = typer.Option(32, help="UNet base width"),
    channel_mults: str = typer.Option("1,2,2", help="UNet width multipliers per level"),
    attention_levels: str = typer.Option("2", help="levels (indices into --channel-mults) with attention"),
    num_res_blocks: int = typer.Option(1),
    timesteps: int = typer.Option(1000),
    beta_schedule: str = typer.Option("cosine", help="cosine or linear"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Train the object- and text-conditioned diffusion model on prep's shards."""
    _setup_logging(verbose)
    from prep.trainer.train import TrainConfig, train

    config = TrainConfig(
        shards=shards, general=general, out=out, ratio=ratio, omega=omega, swap_refs=swap_refs, weights=weights, text_drop=text_drop,
        object_drop=object_drop, image_size=image_size, batch_size=batch_size, lr=lr, min_lr=min_lr,
        warmup=warmup, decay_steps=decay_steps, max_steps=max_steps, seed=seed, device=device,
        threads=threads, num_workers=num_workers, log_every=log_every, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
        resume=resume, channels=channels, channel_mults=_ints(channel_mults),
        attention_levels=_ints(attention_levels), num_res_blocks=num_res_blocks, timesteps=timesteps,
        beta_schedule=beta_schedule,
    )
    try:
        result = train(config)
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)
    summary = {k: result[k] for k in ("step", "start_step", "final_loss", "final_loss_mean", "ratio", "wall_s",
                                      "checkpoint", "loss_csv")}
    typer.echo(json.dumps(summary, indent=1))


def sample_cmd(
    checkpoint: str = typer.Option(..., help="a checkpoint written by `prep train`"),
    reference: str = typer.Option(..., help="reference image of the object"),
    prompt: str = typer.Option(..., help="text prompt"),
    out: str = typer.Option("grid.png", help="PNG grid: reference | masked | samples"),
    num_samples: int = typer.Option(4),
    steps: int = typer.Option(50, help="DDIM steps"),
    eta: float = typer.Option(0.0, help="0: deterministic DDIM, 1: DDPM-like"),
    text_scale: float = typer.Option(5.0, help="text guidance scale s_t"),
    object_scale: float = typer.Option(3.0, help="object guidance scale s_o"),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Generate images of a reference object following a prompt; write a PNG grid."""
    _setup_logging(verbose)
    from prep.trainer.sample import SampleParams, sample

    params = SampleParams(num_samples, steps, eta, text_scale, object_scale, seed)
    try:
        result = sample(checkpoint, reference, prompt, out, params=params, device=device)
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)
    typer.echo(json.dumps(result))


def evaluate_cmd(
    checkpoint: str = typer.Option(..., help="a checkpoint written by `prep train`"),
    references: List[str] = typer.Option(..., "--reference", help="reference image (repeatable)"),
    prompts: List[str] = typer.Option(..., "--prompt", help="text prompt (repeatable)"),
    num_samples: int = typer.Option(4),
    steps: int = typer.Option(50),
    eta: float = typer.Option(0.0),
    text_scale: float = typer.Option(5.0),
    object_scale: float = typer.Option(3.0),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    out_dir: Optional[str] = typer.Option(None, help="also save one grid per (reference, prompt) here"),
    json_out: Optional[str] = typer.Option(None, "--json", help="also write the rows as JSON"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Object similarity and text similarity (CLIP) for references x prompts, as a table."""
    _setup_logging(verbose)
    from prep.trainer.evaluate import evaluate, format_table, random_clip_note
    from prep.trainer.sample import SampleParams

    params = SampleParams(num_samples, steps, eta, text_scale, object_scale, seed)
    try:
        rows = evaluate(checkpoint, references, prompts, params=params, device=device, out_dir=out_dir)
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)
    typer.echo(format_table(rows))
    note = random_clip_note(rows)
    if note:
        typer.echo(note)
    if json_out:
        with open(json_out, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)


def register(app: typer.Typer) -> None:
    """Add `train`, `sample` and `evaluate` to a Typer app."""
    app.command("train")(train_cmd)
    app.command("sample")(sample_cmd)
    app.command("evaluate")(evaluate_cmd)
