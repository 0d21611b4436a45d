"""The training loop: one readable function, `train(TrainConfig) -> dict`.

    x0, text, o  <- TripletStream (mixing r, cross-reference ω, φ for general, text drop)
    t, ε         <- a dedicated, checkpointed torch.Generator
    loss         =  ‖ε − ε_θ(√ᾱ_t x0 + √(1−ᾱ_t) ε, t, TextEncoder(text), o)‖²
    AdamW, linear warmup then cosine decay to min_lr, gradient clipping, bf16 autocast on GPU.

Files in `out`: `config.json` (the resolved config), `loss.csv` (step, loss, lr: every step),
`checkpoint.pt` (unless `checkpoint` names another path). A checkpoint holds the UNet, the
optimizer, the step, the config (a plain dict), the data position (batches consumed) and the
RNG states, all plain tensors and containers: it is written with `torch.save` and read with
`torch.load(weights_only=True)`. Starting again with the same config resumes from it exactly:
the next losses are bit-identical to an uninterrupted run's (same device and thread count).
`max_steps`, `device`, `threads`, `log_every`, `checkpoint_every` and the paths (shards,
models, outputs) may change on resume; any other difference is refused.

Single process: the loader takes rank/world_size (see `TripletStream`), but this loop does not
set up torch.distributed.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch

from prep.atomic import write_atomic
from prep.device import resolve_device
from prep.schemas import contract
from prep.schemas.output import read_manifest
from prep.trainer.data import TripletStream, list_shards
from prep.trainer.model import Diffusion, TextEncoder, UNet, UNetConfig

log = logging.getLogger("prep.trainer")

CHECKPOINT_FORMAT = "prep-trainer-1"
# Fields that may differ between a checkpoint and the config that resumes from it.
RESUME_MAY_CHANGE = frozenset(
    {"max_steps", "device", "threads", "log_every", "checkpoint_every", "out", "checkpoint", "resume", "shards", "general",
     "clip_model", "clip_pretrained", "mask_model"}
)


@dataclass
class TrainConfig:
    shards: str  # a `prep run` output OUT: reads OUT/specific and OUT/manifest.json
    general: Optional[str] = None  # general-domain shard folder; default OUT/general
    out: str = "run"  # run folder: config.json, loss.csv, checkpoint.pt
    # data (the paper's r and ω, classifier-free-guidance drops)
    ratio: float = 0.3
    omega: float = 0.5
    swap_refs: str = "all"  # or "identity": ω never swaps in an augmented view (trainer/data.py)
    weights: bool = False  # sample the specific domain by `prep weights`' per-sample weights
    text_drop: float = 0.1
    object_drop: float = 0.0
    image_size: int = 64
    batch_size: int = 16
    num_workers: int = 0
    shuffle_buffer: int = 256
    # optimisation
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup: int = 20
    decay_steps: Optional[int] = None  # cosine horizon; default max_steps (kept on resume)
    max_steps: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda[:N]
    threads: Optional[int] = None  # torch intra-op CPU threads (None: torch's default)
    # logging and checkpoints
    log_every: int = 10
    checkpoint: Optional[str] = None  # default OUT_RUN/checkpoint.pt
    checkpoint_every: int = 0  # 0: only at the end
    resume: bool = True  # continue from `checkpoint` when it exists
    # model
    channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention_levels: tuple[int, ...] = (2,)  # 16x16 at 64x64 (the middle block has attention too)
    heads: int = 4
    object_tokens: int = 4
    context_dim: int = 128
    timesteps: int = 1000
    beta_schedule: str = "cosine"
    # the pipeline's models; None: read from OUT/manifest.json
    clip_model: Optional[str] = None
    clip_pretrained: Optional[str] = None
    embed_dim: Optional[int] = None
    mask_model: Optional[str] = None
    mask_threshold: Optional[float] = None
    mask_fill: Optional[tuple[int, int, int]] = None
    max_side: Optional[int] = None

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (tuples become lists): safe for JSON and `weights_only` loading."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in values.items() if k in known})
        for name in ("channel_mults", "attention_levels", "mask_fill"):
            value = getattr(config, name)
            if value is not None:
                setattr(config, name, tuple(value))
        return config

    def model_config(self, text_dim: int) -> UNetConfig:
        return UNetConfig(
            image_size=self.image_size, text_dim=text_dim, object_dim=int(self.embed_dim or 0),
            channels=self.channels, channel_mults=tuple(self.channel_mults), num_res_blocks=self.num_res_blocks,
            attention_levels=tuple(self.attention_levels), heads=self.heads, object_tokens=self.object_tokens,
            context_dim=self.context_dim,
        )


def resolve(config: TrainConfig, notes: Optional[list[str]] = None) -> TrainConfig:
    """Fill defaults (general folder, checkpoint path, models from the manifest) and validate;
    before anything is built. What it changes is said in `notes`, one line each:
    - no general-domain shards: train on the domain-specific samples alone (ratio 1.0). The
      paper's r mixes in general image-text pairs; an output of your own photos has none, and a
      researcher running it expects it to train, told so, not to stop;
    - a warmup longer than the run: clipped to max_steps (the lr would never reach --lr)."""
    notes = notes if notes is not None else []
    c = TrainConfig.from_dict(config.to_dict())
    c.general = c.general or os.path.join(c.shards, contract.shard_folder(contract.TRAIN, contract.GENERAL))
    specific = os.path.join(c.shards, contract.shard_folder(contract.TRAIN, contract.SPECIFIC))
    if c.ratio > 0 and not list_shards(specific):
        raise ValueError(f"no domain-specific training shards (*.tar) in {specific}: is {c.shards} an output of "
                         "`prep run` with a celeba: or folder: input?")
    if c.ratio < 1 and not list_shards(c.general):
        notes.append(f"no general-domain shards in {c.general}: training on the domain-specific samples alone "
                     f"(--ratio {c.ratio:g} -> 1.0; give `prep run` a wds: input to mix in general image-text pairs)")
        c.ratio = 1.0
    if c.max_steps > 0 and c.warmup > c.max_steps:
        notes.append(f"--warmup {c.warmup} is longer than --max-steps {c.max_steps}: clipped to {c.max_steps} "
                     "(the learning rate would never reach --lr)")
        c.warmup = c.max_steps
    c.checkpoint = c.checkpoint or os.path.join(c.out, "checkpoint.pt")
    c.decay_steps = c.decay_steps or c.max_steps
    manifest_path = os.path.join(c.shards, contract.MANIFEST)
    manifest = read_manifest(c.shards) if os.path.isfile(manifest_path) else None
    if manifest is not None:
        models = manifest.get("models", {})
        embed, mask = models.get("embed", {}), models.get("mask", {})
        c.clip_model = c.clip_model or embed.get("model")
        c.clip_pretrained = c.clip_pretrained or embed.get("pretrained")
        c.embed_dim = c.embed_dim or manifest.get("embedding_dim")
        c.mask_model = c.mask_model or mask.get("model")
        c.mask_threshold = c.mask_threshold if c.mask_threshold is not None else mask.get("threshold")
        c.mask_fill = c.mask_fill or (tuple(embed["fill"]) if embed.get("fill") else None)
        c.max_side = c.max_side or manifest.get("config", {}).get("max_side")
    if not c.clip_model or not c.embed_dim:
        raise ValueError(f"no CLIP model / embedding dim: {manifest_path} is missing; pass clip_model and embed_dim")
    for name in ("ratio", "omega", "text_drop", "object_drop"):
        if not 0.0 <= getattr(c, name) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {getattr(c, name)}")
    if c.batch_size < 1 or c.max_steps < 0 or c.warmup < 0 or c.log_every < 1 or c.num_workers < 0:
        raise ValueError("batch_size and log_every must be >= 1; max_steps, warmup and num_workers >= 0")
    if not 0 < c.min_lr <= c.lr:
        raise ValueError(f"need 0 < min_lr <= lr, got min_lr={c.min_lr}, lr={c.lr}")
    c.model_config(text_dim=1).validate()
    return c


def torch_device(device: str) -> torch.device:
    """The trainer's --device, by the pipeline's rule (prep/device.py)."""
    return torch.device(resolve_device(device))


def load_text_encoder(clip_model: str, clip_pretrained: Optional[str], device: torch.device) -> TextEncoder:
    """The frozen text tower of the pipeline's CLIP (loaded through the pipeline's loader)."""
    import open_clip

    from prep.transforms.embed import load_clip, register_model

    net, _ = load_clip(clip_model, clip_pretrained, device=str(device))
    return TextEncoder(net, open_clip.get_tokenizer(register_model(clip_model))).to(device)


def learning_rate(step: int, c: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at decay_steps (nanoGPT's schedule)."""
    if step < c.warmup:
        return c.lr * (step + 1) / c.warmup
    decay = max(1, (c.decay_steps or c.max_steps) - c.warmup)
    progress = min(1.0, (step - c.warmup) / decay)
    return c.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (c.lr - c.min_lr)


def make_optimizer(model: torch.nn.Module, c: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and kernels only, not on biases and norms."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=c.lr, betas=(0.9, 0.99))


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    """torch.save to a temporary name, then rename: a killed run never leaves half a file."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(os.path.abspath(path), buffer.getvalue())


def load_checkpoint(path: str) -> dict[str, Any]:
    """Tensors and plain containers only (`weights_only=True`): never unpickles code."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a prep trainer checkpoint (format {state.get('format')!r})")
    return state


def _check_resumable(saved: dict[str, Any], c: TrainConfig, path: str) -> None:
    now = c.to_dict()
    diff = {k: (saved.get(k), now[k]) for k in now if k not in RESUME_MAY_CHANGE and saved.get(k) != now[k]}
    if diff:
        details = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"cannot resume from {path}: the config changed ({details}); use another --out or --no-resume")


def _loss_log(path: str, keep_until: int):
    """loss.csv, keeping the rows of steps <= keep_until (a resumed run rewrites the rest)."""
    rows: list[list[str]] = []
    if keep_until > 0 and os.path.isfile(path):
        with open(path, newline="", encoding="utf-8") as f:
            rows = [r for r in list(csv.reader(f))[1:] if r and int(r[0]) <= keep_until]
    f = open(path, "w", newline="", encoding="utf-8")
    writer = csv.writer(f)
    writer.writerows([["step", "loss", "lr"], *rows])
    return f, writer


def train(config: TrainConfig) -> dict[str, Any]:
    """Train (or resume) and return {'step', 'start_step', 'losses' (this run's), ...}."""
    notes: list[str] = []
    c = resolve(config, notes)
    for note in notes:  # before anything is built
        print(f"prep train: {note}", file=sys.stderr, flush=True)
    device = torch_device(c.device)
    if c.threads:
        torch.set_num_threads(c.threads)
    os.makedirs(c.out, exist_ok=True)
    torch.manual_seed(c.seed)

    text_encoder = load_text_encoder(c.clip_model, c.clip_pretrained, device)
    model_config = c.model_config(text_encoder.width)
    model = UNet(model_config).to(device, memory_format=torch.channels_last)  # faster convolutions
    diffusion = Diffusion(c.timesteps, c.beta_schedule).to(device)
    optimizer = make_optimizer(model, c)
    noise_rng = torch.Generator().manual_seed(c.seed)  # timesteps and noise, on the CPU
    amp_dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    step = 0
    if c.resume and os.path.isfile(c.checkpoint):
        state = load_checkpoint(c.checkpoint)
        c.decay_steps = config.decay_steps or state["config"]["decay_steps"]
        _check_resumable(state["config"], c, c.checkpoint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        noise_rng.set_state(state["rng"]["noise"])
        torch.set_rng_state(state["rng"]["torch"])
        step = int(state["step"])
        log.info("resumed from %s at step %d", c.checkpoint, step)
    with open(os.path.join(c.out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(c.to_dict(), f, indent=1, sort_keys=True)
    log.info("config: %s", json.dumps(c.to_dict(), sort_keys=True))
    log.info("UNet: %.2fM parameters, device %s", sum(p.numel() for p in model.parameters()) / 1e6, device)

    stream = TripletStream(
        os.path.join(c.shards, contract.shard_folder(contract.TRAIN, contract.SPECIFIC)), c.general, ratio=c.ratio, omega=c.omega, text_drop=c.text_drop,
        object_drop=c.object_drop, image_size=c.image_size, batch_size=c.batch_size, embed_dim=c.embed_dim,
        seed=c.seed, shuffle_buffer=c.shuffle_buffer, start_batch=step, swap_refs=c.swap_refs,
        weights=c.weights,
    )
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=c.num_workers)
    batches = iter(loader) if step < c.max_steps else iter(())

    def checkpoint() -> None:
        save_checkpoint(c.checkpoint, {
            "format": CHECKPOINT_FORMAT, "step": step, "config": c.to_dict(),
            "model_config": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(model_config).items()},
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "data": {"batches": step, "batch_size": c.batch_size, "num_workers": c.num_workers},
            "rng": {"noise": noise_rng.get_state(), "torch": torch.get_rng_state()},
        })

    csv_file, csv_writer = _loss_log(os.path.join(c.out, "loss.csv"), keep_until=step)
    start_step, started = step, time.perf_counter()
    losses: list[float] = []
    model.train()
    try:
        while step < c.max_steps:
            lr = learning_rate(step, c)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = next(batches)
            x0 = batch["image"].to(device, memory_format=torch.channels_last)
            obj, text = batch["object"].to(device), text_encoder(batch["text"])
            t = torch.randint(0, c.timesteps, (x0.shape[0],), generator=noise_rng).to(device)
            noise = torch.randn(x0.shape, generator=noise_rng).to(device, memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                loss = diffusion.loss(model, x0, t, noise, text, obj)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            losses.append(loss.item())
            csv_writer.writerow([step, f"{losses[-1]:.6f}", f"{lr:.6g}"])
            if step % c.log_every == 0 or step == c.max_steps:
                recent = losses[-c.log_every:]
                log.info("step %d/%d  loss %.4f  lr %.2e", step, c.max_steps, sum(recent) / len(recent), lr)
                csv_file.flush()
            if c.checkpoint_every and step % c.checkpoint_every == 0:
                checkpoint()
    finally:
        csv_file.close()
        del batches  # stops the DataLoader workers
    checkpoint()
    wall = time.perf_counter() - started
    return {
        "step": step, "start_step": start_step, "losses": losses,
        "final_loss": losses[-1] if losses else None,  # the last step's
        "final_loss_mean": sum(losses[-c.log_every:]) / len(losses[-c.log_every:]) if losses else None,  # last log_every
        "ratio": c.ratio, "warmup": c.warmup, "notes": notes,
        "wall_s": wall, "checkpoint": c.checkpoint, "loss_csv": os.path.join(c.out, "loss.csv"), "config": c.to_dict(),
    }
