"""Download (or build) a preset's three models into the caches, e.g. inside a container image:

    python -m prep.pipeline.bake paper

Each model is loaded once through the same handler code the pipeline uses, which fills the
Hugging Face cache (HF_HOME), rembg's home (REMBG_HOME) and open_clip's cache.
"""

from __future__ import annotations

import sys

from prep.pipeline.config import RunConfig, resolve_models
from prep.transforms.caption import CaptionHandler
from prep.transforms.embed import EmbedHandler
from prep.transforms.mask import MaskHandler


def bake(preset: str) -> None:
    models = resolve_models(RunConfig(inputs=["bake:"], out="-", preset=preset))
    CaptionHandler(models.caption_model, device="cpu").load_model()
    MaskHandler(models.mask_model, device="cpu").load_model()
    EmbedHandler(models.clip_model, models.clip_pretrained, device="cpu").load_model()
    print(f"baked preset {preset}: {models}")


if __name__ == "__main__":
    bake(sys.argv[1] if len(sys.argv) > 1 else "paper")
