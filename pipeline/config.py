"""The run configuration: one dataclass of plain values, presets for the three models, and
validation up front (a bad argument fails before any worker starts)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import MISSING, dataclass, field
from typing import Any, Optional

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

# The identity model per source kind (general-domain wds inputs are never verified): real faces
# in CelebA, dogs and objects in folder: sets; the tiny preset's demo faces are drawn, not real.
PRESET_IDENTITY = {
    "paper": {"celeba": "face", "folder": "clip"},
    "small": {"celeba": "face", "folder": "clip"},
    "tiny": {"celeba": "clip", "folder": "clip"},
}
# The tiny preset's CLIP is random: its distances carry no identity, so by default it verifies
# everyone (2.0 is the largest distance between unit vectors) and finds duplicates by pixels
# and perceptual hash only. --identity-threshold / --duplicate-threshold override this.
PRESET_IDENTITY_THRESHOLDS = {"tiny": {"clip": (2.0, 0.0)}}
IDENTITY_MODELS = ("face", "clip", "none")


def option(default=MISSING, *, help: Optional[str] = None, digest: bool = True, flags: tuple[str, ...] = (),
           cli_type: Any = None, cli_text: Optional[str] = None, cli_default: Any = MISSING):
    """A RunConfig field with everything said about it in one place: its default, the CLI's
    help text and flags (`prep run` is generated from these fields), and whether it enters the
    resume digest (`digest=False`: it does not change what is written).

    cli_type/cli_text: how the CLI takes a value of another type (e.g. "R,G,B" for a tuple);
    `RunConfig.from_cli` parses it back. cli_default: the CLI's default where it differs from the
    library's (e.g. `workers`: 0, auto, on the command line; 1 for `run()` and the tests).
    """
    metadata = {"help": help, "digest": digest, "flags": flags, "cli_type": cli_type, "cli_text": cli_text}
    if cli_default is not MISSING:
        metadata["cli_default"] = cli_default
    return field(default=default, metadata=metadata)


def parse_fill(text: str) -> tuple[int, int, int]:
    """'255,255,255' -> (255, 255, 255)."""
    parts = [int(p) for p in text.split(",")]
    if len(parts) != 3:
        raise ValueError("expected R,G,B, e.g. 255,255,255")
    return parts[0], parts[1], parts[2]


@dataclass
class RunConfig:
    """Every option of `prep run`, with its one default (the CLI reads them from here)."""

    inputs: list[str] = option(help="celeba:DIR, folder:DIR, wds:PATTERN or wds:DIR (repeatable); "
                               "NAME=KIND:LOC names an input (its keys start with NAME_)", flags=("--input", "-i"))
    out: str = option(help="output directory (local path or gs://...)", flags=("--out", "-o"))
    preset: str = option("small", help="models: paper (BLIP-2, ViT-L-14, u2net), small, or tiny (offline)")
    # Models (None: the preset's).
    caption_model: Optional[str] = option(None, help="Hugging Face id or local directory")
    clip_model: Optional[str] = option(None, help="open_clip model name or model-config JSON path")
    clip_pretrained: Optional[str] = option(None, help="open_clip pretrained tag or checkpoint path")
    mask_model: Optional[str] = option(None, help="rembg model name or a custom ONNX file")
    # Caption.
    caption_prompt: Optional[str] = option(None, help="prompt given to the captioner")
    caption_max_new_tokens: int = option(30)
    caption_num_beams: int = option(1)
    caption_general: bool = option(False, help="also caption general-domain images with the VLM")
    caption_join: str = option(". ", help="separator between the VLM and attribute captions")
    trust_remote_code: bool = option(False, help="allow Hugging Face models with custom code")
    # Decode.
    max_side: Optional[int] = option(None, help="downscale images whose longer side exceeds this")
    min_side: int = option(16)
    max_aspect: float = option(10.0)
    max_pixels: int = option(64_000_000, help="reject images with more pixels (decompression bomb guard)")
    # Mask and embed.
    mask_threshold: float = option(0.5, help="foreground when soft mask >= threshold")
    mask_min_fraction: Optional[float] = option(None, help="dead-letter masks with less foreground")
    mask_fill: tuple[int, int, int] = option(
        (255, 255, 255), help="R,G,B of the background in the masked image", cli_type=str, cli_text="255,255,255")
    # Pairing and shards.
    refs_per_sample: int = option(4, help="K: same-identity references per sample")
    seed: int = option(0)
    samples_per_shard: int = option(1000)
    val_fraction: float = option(0.0, help="whole identities into OUT/val (CelebA's partition file wins)")
    # Identity: is every ref the same person and another photo? (transforms/identity.py, verify.py)
    identity_model: Optional[str] = option(
        None, help="face (dlib or --face-model), clip (the masked-object CLIP embedding) or none; default per "
        "source: face for celeba: and clip for folder: (paper, small), clip in tiny")
    face_model: str = option("dlib", help="dlib's ResNet face descriptor, or an ArcFace-style .onnx file (112x112 in)")
    face_detect_max_side: int = option(640, help="detect faces on a copy at most this many pixels on its longer side")
    no_face: str = option("drop", help="an image without a face: drop (dead letter) or keep (unverified)")
    identity_threshold: Optional[float] = option(
        None, help="same identity when at most this far from the identity's centre (default per model: dlib 0.6)")
    duplicate_threshold: Optional[float] = option(
        None, help="near-duplicates (never each other's refs) below this distance (default per model: dlib 0.2)")
    identity_outliers: str = option("keep", help="outliers: keep (no refs, nobody's ref) or drop (dead letter)")
    drop_duplicates: bool = option(False, help="exact duplicates (same pixels): keep the first by key, dead-letter the rest")
    ref_strategy: str = option("random", help="random (seeded, the paper's) or diverse (farthest-first)")
    # Execution. The padded stages' batch sizes and the device change what is written (a
    # model's output for one element depends on the batch it is run in): they are digested.
    device: str = option("auto", help="auto, cpu or cuda[:N]")
    caption_batch_size: int = option(8)
    caption_model_copies: Optional[int] = option(
        None, digest=False, help="load the captioner once per worker machine, this many copies shared by all its "
        "processes (Beam's large-model mode, for BLIP-2-sized models)")
    mask_batch_size: int = option(8, digest=False)
    embed_batch_size: int = option(32)
    identity_batch_size: int = option(8, digest=False)
    prepare_threads: int = option(
        4, digest=False, help="threads per model stage preparing inputs while the model runs (1: serial); "
        "output is byte-identical for any value (bench/ceiling.py measures it)")
    overwrite: bool = option(False, digest=False, help="replace an existing output")
    model_cache: Optional[str] = option(None, digest=False, help="where the tiny preset builds its models")
    workers: int = option(1, digest=False, cli_default=0, help="local runs: worker processes, byte-identical output "
                          "for any N (0: the machine's cores, capped by memory; 1: one process)")

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of one field (handlers and the trainer take theirs from here)."""
        return cls.__dataclass_fields__[name].default

    @classmethod
    def from_cli(cls, values: dict[str, Any]) -> "RunConfig":
        """The CLI's values (strings where a field has a cli_type) -> a RunConfig."""
        parsed = dict(values)
        if isinstance(parsed.get("mask_fill"), str):
            parsed["mask_fill"] = parse_fill(parsed["mask_fill"])
        if "inputs" in parsed:
            parsed["inputs"] = list(parsed["inputs"])
        return cls(**parsed)

    def digest_json(self) -> dict:
        """The fields that decide what is written (declared on each field: `digest=`)."""
        data = self.to_json()
        return {f.name: data[f.name] for f in dataclasses.fields(self) if f.metadata.get("digest", True)}

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
        if self.identity_model is not None and self.identity_model not in IDENTITY_MODELS:
            problems.append(f"--identity-model must be one of {IDENTITY_MODELS}")
        for name, allowed in (("no_face", ("drop", "keep")), ("identity_outliers", ("keep", "drop")),
                              ("ref_strategy", ("random", "diverse"))):
            if getattr(self, name) not in allowed:
                problems.append(f"--{name.replace('_', '-')} must be one of {allowed}")
        for name in ("identity_threshold", "duplicate_threshold"):
            value = getattr(self, name)
            if value is not None and value < 0:
                problems.append(f"--{name.replace('_', '-')} must be >= 0")
        if self.face_model != "dlib" and not self.face_model.endswith(".onnx"):
            problems.append("--face-model must be dlib or a path to an .onnx file")
        for name in ("caption_batch_size", "mask_batch_size", "embed_batch_size", "identity_batch_size",
                     "face_detect_max_side", "caption_max_new_tokens", "caption_num_beams"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1")
        if self.caption_model_copies is not None and self.caption_model_copies < 1:
            problems.append("--caption-model-copies must be >= 1")
        if self.prepare_threads < 1:
            problems.append("--prepare-threads must be >= 1")
        if self.workers < 0:
            problems.append("--workers must be >= 0 (0: the machine's cores, capped by memory)")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            problems.append("--device must be auto, cpu or cuda[:N]")
        if problems:
            raise ValueError("invalid configuration:\n  " + "\n  ".join(problems))

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["mask_fill"] = list(self.mask_fill)
        # Contract v1's manifest config has always carried an (always empty) "extra"; the field
        # is gone, the key stays so that the manifest is unchanged.
        data["extra"] = {}
        return data


@dataclass(frozen=True)
class ResolvedModels:
    caption_model: str
    clip_model: str
    clip_pretrained: Optional[str]
    mask_model: str
    mask_min_fraction: float
    identity: dict = field(default_factory=dict)  # source kind -> "face" | "clip" | "none"
    thresholds: dict = field(default_factory=dict)  # "face" | "clip" -> verify.Thresholds

    def identity_modes(self) -> list[str]:
        """The identity models this run uses, in a fixed order."""
        return [m for m in ("face", "clip") if m in self.identity.values()]


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
    identity = {kind: config.identity_model or mode for kind, mode in PRESET_IDENTITY[config.preset].items()}
    return ResolvedModels(
        caption_model=config.caption_model or preset["caption_model"],
        clip_model=config.clip_model or preset["clip_model"],
        clip_pretrained=clip_pretrained or None,
        mask_model=_expand(config.mask_model) or preset["mask_model"],
        mask_min_fraction=min_fraction,
        identity=identity,
        thresholds=resolve_thresholds(config, identity),
    )


def resolve_thresholds(config: RunConfig, identity: dict) -> dict:
    """The same-identity and duplicate thresholds of each identity model the run uses: the
    model's documented defaults (transforms/identity.py), the preset's, then the flags."""
    from prep.transforms.identity import thresholds_for
    from prep.transforms.verify import Thresholds

    out = {}
    for mode in sorted(set(identity.values()) - {"none"}):
        base = thresholds_for(mode, config.face_model)
        same, duplicate = PRESET_IDENTITY_THRESHOLDS.get(config.preset, {}).get(mode, (base.same, base.duplicate))
        out[mode] = Thresholds(
            same=config.identity_threshold if config.identity_threshold is not None else same,
            duplicate=config.duplicate_threshold if config.duplicate_threshold is not None else duplicate,
        )
    return out


def _expand(path: Optional[str]) -> Optional[str]:
    return os.path.expanduser(path) if path else path
