"""The run configuration: one dataclass of plain values, presets for the three models, and
validation up front (a bad argument fails before any worker starts)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import MISSING, dataclass, field
from typing import Any, Optional

from prep.transforms.options import CaptionOptions, DecodeParams, EmbedOptions, MaskOptions

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
# An LSUN record is its own object (identity = its key): nothing to verify.
PRESET_IDENTITY = {
    "paper": {"celeba": "face", "folder": "clip", "lsun": "none"},
    "small": {"celeba": "face", "folder": "clip", "lsun": "none"},
    "tiny": {"celeba": "clip", "folder": "clip", "lsun": "none"},
}
# The tiny preset's CLIP is random: its distances carry no identity, so by default it verifies
# everyone (2.0 is the largest distance between unit vectors) and finds duplicates by pixels
# and perceptual hash only. --identity-threshold / --duplicate-threshold override this.
PRESET_IDENTITY_THRESHOLDS = {"tiny": {"clip": (2.0, 0.0)}}
IDENTITY_MODELS = ("face", "clip", "none")


# `prep run --help` groups the options into these panels, in this order (each field names its
# panel: `option(..., panel=...)`; the command's own options join the last one).
PANEL_IO = "Inputs and outputs"
PANEL_MODELS = "Models"
PANEL_STAGES = "Stages: decode, caption, mask, embed"
PANEL_IDENTITY = "Pairing and identity"
PANEL_RUNNER = "Runner, workers and batches"
PANELS = (PANEL_IO, PANEL_MODELS, PANEL_STAGES, PANEL_IDENTITY, PANEL_RUNNER)


def option(default=MISSING, *, panel: str, help: Optional[str] = None, digest: bool = True,
           flags: tuple[str, ...] = (), cli_type: Any = None, cli_text: Optional[str] = None,
           cli_default: Any = MISSING, metavar: Optional[str] = None):
    """A RunConfig field with everything said about it in one place: its default, the CLI's
    help text, flags, help panel (one of PANELS) and metavar (`prep run` is generated from these
    fields), and whether it enters the resume digest (`digest=False`: it does not change what
    is written).

    cli_type/cli_text: how the CLI takes a value of another type (e.g. "R,G,B" for a tuple);
    `RunConfig.from_cli` parses it back. cli_default: the CLI's default where it differs from the
    library's (e.g. `workers`: 0, auto, on the command line; 1 for `run()` and the tests).
    """
    if panel not in PANELS:
        raise ValueError(f"unknown help panel {panel!r}; one of {PANELS}")
    metadata = {"help": help, "digest": digest, "flags": flags, "cli_type": cli_type, "cli_text": cli_text,
                "panel": panel, "metavar": metavar}
    if cli_default is not MISSING:
        metadata["cli_default"] = cli_default
    return field(default=default, metadata=metadata)


def parse_fill(text: str) -> tuple[int, int, int]:
    """'255,255,255' -> (255, 255, 255)."""
    parts = [int(p) for p in text.split(",")]
    if len(parts) != 3:
        raise ValueError("expected R,G,B, e.g. 255,255,255")
    return parts[0], parts[1], parts[2]


# Fields added after resume digests were first recorded (see RunConfig.digest_json).
DIGEST_ADDED = frozenset({"caption_on_bad", "exclude", "singleton_refs", "singleton_refs_k", "attribute_model",
                          "attribute_doubt", "attribute_kinds"})
SINGLETON_REFS = ("none", "augment")
ALWAYS_ITS_OWN_OBJECT = frozenset({"lsun"})  # identity none whatever --identity-model says
ATTRIBUTE_KINDS = ("celeba", "folder")  # --attribute-model applies to these kinds' samples (faces) by default
# Refs for objects without a second photo (transforms/views.py), per input kind, unless
# --singleton-refs says otherwise for all: an LSUN record is always alone.
SINGLETON_REFS_DEFAULT = {"lsun": "augment"}


@dataclass
class RunConfig:
    """Every option of `prep run`, with its one default (the CLI reads them from here)."""

    inputs: list[str] = option(panel=PANEL_IO,
        help="celeba:DIR, folder:DIR, wds:PATTERN, wds:DIR or lsun:DIR (repeatable); NAME=KIND:LOC names an input (its "
        "keys start with NAME_)", flags=("--input", "-i"))
    out: str = option(panel=PANEL_IO, help="output directory (local path or gs://...)", flags=("--out", "-o"))
    reuse: Optional[str] = option(
        None, panel=PANEL_IO, digest=False, metavar="PREV_OUT",
        help="take each stage's output from an earlier output where its model, options and input pixels are the "
        "same (caption, mask, embed); the shards are those of a fresh run")
    exclude: Optional[str] = option(
        None, panel=PANEL_IO, metavar="FILE",
        help="takedowns: a file of URLs, keys or sha256 values, one per line; matching inputs are dropped at "
        "ingest as 'excluded' dead letters (docs/objects.md)")
    preset: str = option(
        "small", panel=PANEL_MODELS, help="models: paper (BLIP-2, ViT-L-14, u2net) or small (BLIP, ViT-B-32, u2netp) download weights "
        "on first use (network); tiny builds random ones locally (offline)")
    # Models (None: the preset's).
    caption_model: Optional[str] = option(None, panel=PANEL_MODELS, help="Hugging Face id or local directory")
    clip_model: Optional[str] = option(None, panel=PANEL_MODELS, help="open_clip model name or model-config JSON path")
    clip_pretrained: Optional[str] = option(
        None, panel=PANEL_MODELS, help="open_clip pretrained tag or checkpoint path")
    mask_model: Optional[str] = option(None, panel=PANEL_MODELS, help="rembg model name or a custom ONNX file")
    # Caption.
    caption_prompt: Optional[str] = option(None, panel=PANEL_STAGES, help="prompt given to the captioner")
    caption_max_new_tokens: int = option(CaptionOptions.max_new_tokens, panel=PANEL_STAGES)
    caption_num_beams: int = option(CaptionOptions.num_beams, panel=PANEL_STAGES)
    caption_general: bool = option(False, panel=PANEL_STAGES, help="also caption general-domain images with the VLM")
    caption_join: str = option(". ", panel=PANEL_STAGES, help="separator between the VLM and attribute captions")
    caption_on_bad: str = option(
        CaptionOptions.on_bad, panel=PANEL_STAGES, metavar="drop|keep",
        help="a caption the guards flag (repetition loop, prompt echo, refusal, cut at the token limit): drop "
        "(dead letter with the raw text) or keep (written with caption_flags)")
    trust_remote_code: bool = option(False, panel=PANEL_MODELS, help="allow Hugging Face models with custom code")
    # Decode.
    max_side: Optional[int] = option(DecodeParams.max_side, panel=PANEL_STAGES, help="downscale images whose longer side exceeds this")
    min_side: int = option(DecodeParams.min_side, panel=PANEL_STAGES)
    max_aspect: float = option(DecodeParams.max_aspect, panel=PANEL_STAGES)
    max_pixels: int = option(
        DecodeParams.max_pixels, panel=PANEL_STAGES, help="reject images with more pixels (decompression bomb guard)")
    # Mask and embed.
    mask_threshold: float = option(MaskOptions.threshold, panel=PANEL_STAGES, help="foreground when soft mask >= threshold")
    mask_min_fraction: Optional[float] = option(None, panel=PANEL_STAGES, help="dead-letter masks with less foreground")
    mask_fill: tuple[int, int, int] = option(
        MaskOptions.fill, panel=PANEL_STAGES,
        help="R,G,B of the background in the masked image", cli_type=str, cli_text="255,255,255")
    # Pairing and shards.
    refs_per_sample: int = option(4, panel=PANEL_IDENTITY, help="K: same-identity references per sample")
    seed: int = option(0, panel=PANEL_IDENTITY)
    samples_per_shard: int = option(1000, panel=PANEL_IO)
    val_fraction: float = option(
        0.0, panel=PANEL_IO, help="whole identities into OUT/val (CelebA's partition file wins)")
    # Identity: is every ref the same person and another photo? (transforms/identity.py, verify.py)
    identity_model: Optional[str] = option(
        None, panel=PANEL_IDENTITY,
        help="face (dlib or --face-model), clip (the masked-object CLIP embedding) or none; default per "
        "source: face for celeba: and clip for folder: (paper, small), clip in tiny")
    face_model: str = option(
        "dlib", panel=PANEL_IDENTITY, help="dlib's ResNet face descriptor, or an ArcFace-style .onnx file (112x112 in)")
    face_detect_max_side: int = option(
        640, panel=PANEL_IDENTITY, help="detect faces on a copy at most this many pixels on its longer side")
    no_face: str = option(
        "drop", panel=PANEL_IDENTITY, help="an image without a face: drop (dead letter) or keep (unverified)")
    identity_threshold: Optional[float] = option(
        None, panel=PANEL_IDENTITY,
        help="same identity when at most this far from the identity's centre (default per model: dlib 0.6)")
    duplicate_threshold: Optional[float] = option(
        None, panel=PANEL_IDENTITY,
        help="near-duplicates (never each other's refs) below this distance (default per model: dlib 0.2)")
    identity_outliers: str = option(
        "keep", panel=PANEL_IDENTITY, help="outliers: keep (no refs, nobody's ref) or drop (dead letter)")
    drop_duplicates: bool = option(
        False, panel=PANEL_IDENTITY, help="exact duplicates (same pixels): keep the first by key, dead-letter the rest")
    ref_strategy: str = option(
        "random", panel=PANEL_IDENTITY, help="random (seeded, the paper's) or diverse (farthest-first)")
    attribute_model: Optional[str] = option(
        None, panel=PANEL_STAGES, metavar="PROBE",
        help="an attribute probe (prep attributes fit): unlabelled faces get predicted attributes and their "
        "caption; labels it contradicts are flagged (docs/attributes.md)")
    attribute_doubt: float = option(
        0.95, panel=PANEL_STAGES, help="a label is doubted when the probe gives the opposite with this probability")
    attribute_kinds: str = option(
        ",".join(ATTRIBUTE_KINDS), panel=PANEL_STAGES, metavar="KIND,...",
        help="input kinds whose samples are faces: the only ones the probe applies to (celeba, folder, lsun)")
    singleton_refs: Optional[str] = option(
        None, panel=PANEL_IDENTITY, metavar="none|augment",
        help="refs for objects without a second photo: augment gives them K augmented views of their own image "
        "(masked and embedded; ref_kinds 'augmented'); default augment for lsun:, none for the other kinds")
    singleton_refs_k: int = option(2, panel=PANEL_IDENTITY, help="augmented views per singleton (--singleton-refs augment)")
    # Execution. The padded stages' batch sizes and the device change what is written (a
    # model's output for one element depends on the batch it is run in): they are digested.
    device: str = option("auto", panel=PANEL_RUNNER, help="auto, cpu or cuda[:N]")
    caption_batch_size: int = option(CaptionOptions.batch_size, panel=PANEL_RUNNER)
    caption_model_copies: Optional[int] = option(
        None, panel=PANEL_RUNNER, digest=False,
        help="load the captioner once per worker machine, this many copies shared by all its "
        "processes (Beam's large-model mode, for BLIP-2-sized models)")
    mask_batch_size: int = option(MaskOptions.batch_size, panel=PANEL_RUNNER, digest=False)
    embed_batch_size: int = option(EmbedOptions.batch_size, panel=PANEL_RUNNER)
    identity_batch_size: int = option(8, panel=PANEL_RUNNER, digest=False)
    prepare_threads: int = option(
        4, panel=PANEL_RUNNER, digest=False,
        help="threads per model stage preparing inputs while the model runs (1: serial); "
        "output is byte-identical for any value (bench/ceiling.py measures it)")
    decoded_cache_mb: int = option(
        DecodeParams.decoded_cache_mb, panel=PANEL_RUNNER, digest=False, help="decode each image once per worker process: MB of decoded "
        "pixels kept for the later stages (0: each stage decodes again); output is byte-identical for any value")
    overwrite: bool = option(False, panel=PANEL_IO, digest=False, help="replace an existing output")
    model_cache: Optional[str] = option(
        None, panel=PANEL_MODELS, digest=False, help="where the tiny preset builds its models")
    chunk_inputs: int = option(
        4000, panel=PANEL_RUNNER, digest=False, help="local runs: process at most about N inputs at a time, in "
        "chunks of whole identities (memory bounded by N, not by the data; the output is byte-identical for any "
        "N); 0: one job")
    workers: int = option(
        1, panel=PANEL_RUNNER, digest=False, cli_default=0, help="local runs: worker processes, byte-identical output "
                          "for any N (0: the machine's cores, capped by memory; 1: one process)")

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of one field (the stages hold theirs in transforms/options.py)."""
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

    def reuses_out(self) -> bool:
        """--reuse names --out itself: the new output replaces it once complete (pipeline/run.py)."""
        return bool(self.reuse) and os.path.abspath(self.reuse.rstrip("/")) == os.path.abspath(self.out.rstrip("/"))

    def attribute_kind_set(self) -> frozenset[str]:
        return frozenset(k.strip() for k in self.attribute_kinds.split(",") if k.strip())

    def digest_json(self) -> dict:
        """The fields that decide what is written (declared on each field: `digest=`). A field
        added since digests were first recorded (DIGEST_ADDED) counts only when it differs from
        its default, so a partial run of an older prep still resumes."""
        data = self.to_json()
        return {f.name: data[f.name] for f in dataclasses.fields(self) if f.metadata.get("digest", True)
                and not (f.name in DIGEST_ADDED and getattr(self, f.name) == f.default)}

    def validate(self) -> None:
        problems = []
        if not self.inputs:
            problems.append("at least one --input is required (celeba:DIR, folder:DIR, wds:PATTERN or lsun:DIR)")
        if not self.out:
            problems.append("--out is required")
        if self.preset not in PRESETS:
            problems.append(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        if self.reuse and self.out and self.reuses_out() and "://" in self.out:
            problems.append("--reuse naming --out itself works on local folders only (the new output replaces the old "
                            "by renaming); on an object store write to a new prefix and --reuse the old one")
        if self.singleton_refs is not None and self.singleton_refs not in SINGLETON_REFS:
            problems.append(f"--singleton-refs must be one of {', '.join(SINGLETON_REFS)}, not {self.singleton_refs!r}")
        if not set(self.attribute_kind_set()) <= {"celeba", "folder", "lsun"}:
            problems.append(f"--attribute-kinds takes celeba, folder and lsun, not {self.attribute_kinds!r}")
        if not 0.5 < self.attribute_doubt < 1.0:
            problems.append("--attribute-doubt must be in (0.5, 1)")
        if not 1 <= self.singleton_refs_k <= 16:
            problems.append("--singleton-refs-k must be in 1..16")
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
        if self.caption_on_bad not in ("drop", "keep"):
            problems.append(f"--caption-on-bad must be drop or keep, got {self.caption_on_bad!r}")
        for name in ("caption_batch_size", "mask_batch_size", "embed_batch_size", "identity_batch_size",
                     "face_detect_max_side", "caption_max_new_tokens", "caption_num_beams"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1")
        if self.caption_model_copies is not None and self.caption_model_copies < 1:
            problems.append("--caption-model-copies must be >= 1")
        if self.prepare_threads < 1:
            problems.append("--prepare-threads must be >= 1")
        if self.decoded_cache_mb < 0:
            problems.append("--decoded-cache-mb must be >= 0 (0: off)")
        if self.chunk_inputs < 0:
            problems.append("--chunk-inputs must be >= 0 (0: one job)")
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


def model_names(config: RunConfig) -> dict[str, Optional[str]]:
    """caption_model, clip_model, clip_pretrained, mask_model: the preset's with the flags'
    overrides (the tiny preset builds its models once). Light: the preflight calls it."""
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
    clip_pretrained = config.clip_pretrained if config.clip_pretrained is not None else preset["clip_pretrained"]
    return {
        "caption_model": config.caption_model or preset["caption_model"],
        "clip_model": config.clip_model or preset["clip_model"],
        "clip_pretrained": clip_pretrained or None,
        "mask_model": _expand(config.mask_model) or preset["mask_model"],
    }


def singleton_refs_modes(config: RunConfig) -> dict[str, str]:
    """Source kind -> "augment" | "none": whether its singletons get augmented views as refs."""
    from prep.transforms.sources import SOURCE_KINDS

    return {kind: config.singleton_refs or SINGLETON_REFS_DEFAULT.get(kind, "none") for kind in SOURCE_KINDS
            if kind != "wds"}


def identity_models(config: RunConfig) -> dict[str, str]:
    """Source kind -> the identity model ("face" | "clip" | "none") it is verified with. An LSUN
    record is its own object (its identity is its key): nothing to verify, whatever
    --identity-model says for the other kinds."""
    return {kind: "none" if kind in ALWAYS_ITS_OWN_OBJECT else config.identity_model or mode
            for kind, mode in PRESET_IDENTITY[config.preset].items()}


def resolve_models(config: RunConfig) -> ResolvedModels:
    """The preset's models with the flags' overrides; the tiny preset builds its models once."""
    min_fraction = config.mask_min_fraction
    if min_fraction is None:
        min_fraction = PRESET_STAGE_DEFAULTS[config.preset]["mask_min_fraction"]
    identity = identity_models(config)
    return ResolvedModels(
        **model_names(config),
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
