"""Tiny, randomly initialised stand-ins for the three models, built from configs.

They are saved to disk in the same formats as real checkpoints and loaded back through the
same code paths (`AutoModelForImageTextToText.from_pretrained(dir)`, open_clip with a JSON
model config + safetensors checkpoint, rembg with a custom ONNX file), so the `tiny` preset
exercises the real loading code offline. Builds are deterministic (fixed seeds): rebuilding
gives the same weights, hence the same fingerprints.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

TINY_VERSION = "1"
TINY_CLIP_NAME = "prep-tiny-clip"

# Real English words, so a random captioner still writes word-like captions.
_CAPTION_WORDS = (
    "a an the of with in on and photo picture portrait close up face person woman man girl boy "
    "smiling looking camera hair dark light blond brown black long short wearing glasses hat "
    "shirt red blue green white yellow background wall standing sitting young old head front "
    "dog cat object table outdoor indoor bright colorful"
).split()


@dataclass(frozen=True)
class TinyModels:
    captioner: str  # a Hugging Face model directory
    clip_config: str  # an open_clip model config JSON (model name = file stem)
    clip_weights: str  # a safetensors checkpoint for it
    mask_onnx: str  # an ONNX segmentation model with rembg's u2net interface


def default_cache_dir() -> Path:
    root = os.environ.get("PREP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "prep"
    )
    return Path(root)


def ensure_tiny_models(cache_dir: str | os.PathLike | None = None) -> TinyModels:
    """Build the tiny models under `cache_dir/tiny-v{N}` once; later calls reuse them."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    target = root / f"tiny-v{TINY_VERSION}"
    models = TinyModels(
        captioner=str(target / "captioner"),
        clip_config=str(target / f"{TINY_CLIP_NAME}.json"),
        clip_weights=str(target / f"{TINY_CLIP_NAME}.safetensors"),
        mask_onnx=str(target / "mask.onnx"),
    )
    if (target / "COMPLETE").exists():
        return models
    root.mkdir(parents=True, exist_ok=True)
    # Build in a private folder, then rename: concurrent builders never see half a model.
    work = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=root))
    try:
        # In a child process: torch compute on the launcher's main thread would leave an
        # OpenMP thread team behind that halves the speed of the models Beam later runs on
        # its worker threads (measured: 26 vs 49 img/s for the same BLIP batches on 2 cores).
        subprocess.run([sys.executable, "-c", f"from prep.models.tiny import build_all; build_all({str(work)!r})"],
                       check=True)
        try:
            os.rename(work, target)
        except OSError:
            if not (target / "COMPLETE").exists():  # lost a race to a broken build: retry once
                shutil.rmtree(target, ignore_errors=True)
                os.rename(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return models


def built_at_random(path: Optional[str]) -> bool:
    """Whether `path` lies in a folder of models prep built at random: the tiny preset's
    (`tiny-v{N}` with its COMPLETE marker) or `prep demo-models`' (its demo_models.json), at
    any depth above the path."""
    if not path:
        return False
    try:
        here = Path(os.path.expanduser(path)).resolve()
    except (OSError, RuntimeError):
        return False
    return any((p.name.startswith("tiny-v") and (p / "COMPLETE").is_file()) or (p / "demo_models.json").is_file()
               for p in (here, *here.parents))


def build_all(work: str) -> None:
    """Build the three tiny models into `work` (run in a child process by ensure_tiny_models)."""
    folder = Path(work)
    build_tiny_captioner(folder / "captioner")
    build_tiny_clip(folder / f"{TINY_CLIP_NAME}.json", folder / f"{TINY_CLIP_NAME}.safetensors")
    build_tiny_mask_onnx(folder / "mask.onnx")
    (folder / "COMPLETE").write_text(TINY_VERSION)


def build_tiny_captioner(out_dir: Path, seed: int = 0) -> None:
    """A BLIP captioner (vision 32x32, 2 layers, width 32) with a small word vocabulary."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab = {w: i for i, w in enumerate(specials + list(dict.fromkeys(_CAPTION_WORDS)))}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, bos_token="[DEC]")
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    sep = vocab["[SEP]"]
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=64, bos_token_id=vocab["[DEC]"],
            pad_token_id=vocab["[PAD]"], sep_token_id=sep, eos_token_id=sep,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=32, patch_size=8,
        ),
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def build_tiny_clip(config_path: Path, weights_path: Path, seed: int = 0) -> None:
    """An open_clip ViT (32x32 input, embed_dim 32) saved as config JSON + safetensors."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(TINY_CLIP_CONFIG, indent=2, sort_keys=True))
    open_clip.add_model_config(str(config_path))
    torch.manual_seed(seed)
    model = open_clip.create_model(config_path.stem, pretrained=None)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights_path))


def build_tiny_mask_onnx(path: Path, seed: int = 0) -> None:
    """Two 3x3 convolutions and a sigmoid: [1,3,320,320] -> [1,1,320,320], like u2net's output."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32)
    b1 = rng.normal(0, 0.1, (4,)).astype(np.float32)
    w2 = rng.normal(0, 0.5, (1, 4, 3, 3)).astype(np.float32)
    b2 = np.zeros((1,), np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["h1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["h2"], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["h2"], ["mask"]),
    ]
    graph = helper.make_graph(
        nodes,
        "prep_tiny_mask",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 320, 320])],
        [helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 1, 320, 320])],
        initializer=[numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="prep")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
