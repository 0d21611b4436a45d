"""The run configuration: one dataclass of plain values, presets for the three models, and
validation up front (a bad argument fails before any worker starts)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional

PRESETS: dict[str, dict[str, Optional[str]]] = {
    # The paper's setup (PaLI is not public; BLIP-2 is the closest open captioner).
    "paper": {
        "caption_model": "Salesforce/blip2-opt-2.7b",
        "clip_model": "ViT-L-14",
        "clip_pretrained": "openai",
        "mask_model": "u2net",
    },
    "small": {
        "caption_model": "Salesforce/blip-image-captioning-base",
        "clip_model": "ViT-B-32",
        "clip_pretrained": "openai",
        "mask_model": "u2netp",
    },
    # Built locally from configs with random weights (see prep.models.tiny): runs offline.
    "tiny": {"caption_model": None, "clip_model": None, "clip_pretrained": None, "mask_model": None},
}

PRESET_STAGE_DEFAULTS = {
    "paper": {"mask_min_fraction": 0.01},
    "small": {"mask_min_fraction": 0.01},
    "tiny": {"mask_min_fraction": 0.0},
}


@dataclass
class RunConfig:
    inputs: list[str]
    out: str
    preset: str = "small"
    # Models (None: the preset's).
    caption_model: Optional[str] = None
    clip_model: Optional[str] = None
    clip_pretrained: Optional[str] = None
    mask_model: Optional[str] = None
    # Caption.
    caption_prompt: Optional[str] = None
    caption_max_new_tokens: int = 30
    caption_num_beams: int = 1
    caption_general: bool = False
    caption_join: str = ". "
    trust_remote_code: bool = False
    # Decode.
    max_side: Optional[int] = None
    min_side: int = 16
    max_aspect: float = 10.0
    max_pixels: int = 64_000_000
    # Mask and embed.
    mask_threshold: float = 0.5
    mask_min_fraction: Optional[float] = None
    mask_fill: tuple[int, int, int] = (255, 255, 255)
    # Pairing and shards.
    refs_per_sample: int = 4
    seed: int = 0
    samples_per_shard: int = 1000
    val_fraction: float = 0.0  # whole identities to OUT/val (CelebA's partition file wins when present)
    # Execution.
    device: str = "auto"
    caption_batch_size: int = 8
    caption_model_copies: Optional[int] = None  # one copy shared by all processes of a worker
    mask_batch_size: int = 8
    embed_batch_size: int = 32
    # Threads per model stage that run its per-element preprocessing (decode, composite,
    # resize) while the model runs (transforms/inference.py); 1 = serial on the model's
    # thread. Output is byte-identical for any value. See bench/ceiling.py for the measurement.
    prepare_threads: int = 4
    overwrite: bool = False
    model_cache: Optional[str] = None
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        problems = []
        if not self.inputs:
            problems.append("at least one --input is required (celeba:DIR, folder:DIR or wds:PATTERN)")
        if not self.out:
            problems.append("--out is required")
        if self.preset not in PRESETS:
            problems.append(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        if self.samples_per_shard < 1:
            problems.append("--samples-per-shard must be >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            problems.append("--val-fraction must be in [0, 1)")
        if self.refs_per_sample < 0:
            problems.append("--refs-per-sample must be >= 0")
        if self.max_side is not None and self.max_side < self.min_side:
            problems.append(f"--max-side {self.max_side} is below --min-side {self.min_side}")
        if not 0.0 < self.mask_threshold < 1.0:
            problems.append("--mask-threshold must be in (0, 1)")
        if self.mask_min_fraction is not None and not 0.0 <= self.mask_min_fraction < 1.0:
            problems.append("--mask-min-fraction must be in [0, 1)")
        if len(self.mask_fill) != 3 or not all(0 <= c <= 255 for c in self.mask_fill):
            problems.append("--mask-fill must be three integers 0..255")
        for name in ("caption_batch_size", "mask_batch_size", "embed_batch_size", "caption_max_new_tokens", "caption_num_beams"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1")
        if self.prepare_threads < 1:
            problems.append("--prepare-threads must be >= 1")
        if self.caption_model_copies is not None and self.caption_model_copies < 1:
            problems.append("--caption-model-copies must be >= 1")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            problems.append("--device must be auto, cpu or cuda[:N]")
        if problems:
            raise ValueError("invalid configuration:\n  " + "\n  ".join(problems))

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["mask_fill"] = list(self.mask_fill)
        return data


@dataclass(frozen=True)
class ResolvedModels:
    caption_model: str
    clip_model: str
    clip_pretrained: Optional[str]
    mask_model: str
    mask_min_fraction: float


def resolve_models(config: RunConfig) -> ResolvedModels:
    """The preset's models with the flags' overrides; the tiny preset builds its models once."""
    preset = dict(PRESETS[config.preset])
    if config.preset == "tiny":
        from prep.models.tiny import ensure_tiny_models

        tiny = ensure_tiny_models(config.model_cache)
        preset = {
            "caption_model": tiny.captioner,
            "clip_model": tiny.clip_config,
            "clip_pretrained": tiny.clip_weights,
            "mask_model": tiny.mask_onnx,
        }
    min_fraction = config.mask_min_fraction
    if min_fraction is None:
        min_fraction = PRESET_STAGE_DEFAULTS[config.preset]["mask_min_fraction"]
    clip_pretrained = config.clip_pretrained if config.clip_pretrained is not None else preset["clip_pretrained"]
    return ResolvedModels(
        caption_model=config.caption_model or preset["caption_model"],
        clip_model=config.clip_model or preset["clip_model"],
        clip_pretrained=clip_pretrained or None,
        mask_model=_expand(config.mask_model) or preset["mask_model"],
        mask_min_fraction=min_fraction,
    )


def _expand(path: Optional[str]) -> Optional[str]:
    return os.path.expanduser(path) if path else path
