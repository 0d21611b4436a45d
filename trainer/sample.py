"""Sampling: a reference image and a prompt -> new images of that object.

The reference goes through the pipeline's own steps, with the models the checkpoint records
(taken from the shards' manifest at training time): decode (`prep.transforms.decode`), mask
(`new_rembg_session` + `binarize`), x ⊗ m (`masked_image`, same fill), CLIP image embedding
(`load_clip`, L2-normalised) -> the object embedding o. Then guided DDIM sampling (see
`prep.trainer.model.Diffusion.sample`). `sample(...)` writes a PNG grid, one row:
reference | masked reference | N samples, each image_size x image_size.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from prep.atomic import write_atomic
from prep.models.tiny import built_at_random
from prep.pipeline.config import RunConfig
from prep.trainer.model import Diffusion, TextEncoder, UNet, UNetConfig
from prep.trainer.train import TrainConfig, load_checkpoint, torch_device


@dataclass
class Reference:
    image: Image.Image  # upright RGB, as the pipeline decodes it
    mask: Image.Image  # "L", values {0, 255}
    masked: Image.Image  # x ⊗ m
    embedding: torch.Tensor  # [D], unit norm: the object embedding o


@dataclass(frozen=True)
class SampleParams:
    num_samples: int = 4
    steps: int = 50
    eta: float = 0.0
    text_scale: float = 5.0
    object_scale: float = 3.0
    seed: int = 0


class Customizer:
    """A trained checkpoint plus the pipeline's mask and CLIP models, loaded once."""

    def __init__(self, checkpoint: str, *, device: str = "auto"):
        import open_clip

        from prep.transforms.embed import load_clip, register_model

        state = load_checkpoint(checkpoint)
        self.config = TrainConfig.from_dict(state["config"])
        self.device = torch_device(device)
        self.clip, self.preprocess = load_clip(self.config.clip_model, self.config.clip_pretrained, device=str(self.device))
        # The CLIP that embeds references and scores samples: random (the tiny preset's, or no
        # pretrained weights) makes evaluate's similarities meaningless.
        self.random_clip = (not self.config.clip_pretrained or built_at_random(self.config.clip_pretrained)
                            or built_at_random(self.config.clip_model))
        self.tokenizer = open_clip.get_tokenizer(register_model(self.config.clip_model))
        self.text_encoder = TextEncoder(self.clip, self.tokenizer)
        model_config = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["model_config"].items()})
        self.unet = UNet(model_config).to(self.device, memory_format=torch.channels_last).eval()
        self.unet.load_state_dict(state["model"])
        self.diffusion = Diffusion(self.config.timesteps, self.config.beta_schedule).to(self.device)
        self.image_size = model_config.image_size
        self.step = int(state["step"])
        self._mask_session = None

    # -- the pipeline's steps on one reference ---------------------------------------------

    def mask_session(self):
        if self._mask_session is None:
            from prep.transforms.mask import new_rembg_session

            if not self.config.mask_model:
                raise ValueError("the checkpoint records no mask model (the shards had no manifest)")
            providers = ["CPUExecutionProvider"] if self.device.type == "cpu" else None
            self._mask_session = new_rembg_session(self.config.mask_model, providers)
        return self._mask_session

    def reference(self, path: str) -> Reference:
        """Decode, mask and embed a reference image exactly as the pipeline does."""
        from prep.transforms.decode import (
            DecodeParams,
            ImageRejected,
            decode_image,
            load_rgb,
        )
        from prep.transforms.mask import DEFAULT_FILL, binarize, masked_image

        with open(path, "rb") as f:
            raw = f.read()
        try:
            jpeg, _, _ = decode_image(raw, DecodeParams(max_side=self.config.max_side))
        except ImageRejected as exc:
            raise ValueError(f"reference {path!r} cannot be used: {exc}") from None
        image = load_rgb(jpeg)
        soft = self.mask_session().predict(image)[0]
        threshold = self.config.mask_threshold if self.config.mask_threshold is not None else RunConfig.default("mask_threshold")
        mask = Image.fromarray(binarize(soft, threshold), "L")
        masked = masked_image(image, mask, tuple(self.config.mask_fill or DEFAULT_FILL))
        return Reference(image, mask, masked, self.embed_images([masked])[0])

    # -- CLIP features (also what evaluation scores with) ----------------------------------

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """CLIP image embeddings [N, D], L2-normalised (as the pipeline's embed stage)."""
        batch = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)
        dtype = next(self.clip.parameters()).dtype
        return F.normalize(self.clip.encode_image(batch.to(dtype)).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """CLIP text embeddings [N, D], L2-normalised."""
        return F.normalize(self.clip.encode_text(self.tokenizer(list(texts)).to(self.device)).float(), dim=-1)

    # -- generation ------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        embedding: torch.Tensor,
        prompt: str,
        params: SampleParams = SampleParams(),
    ) -> list[Image.Image]:
        """`params.num_samples` images for object embedding [D] and a prompt (seeded)."""
        n = params.num_samples
        text = self.text_encoder([prompt] * n)
        null_text = self.text_encoder([""] * n)
        obj = embedding.to(self.device, torch.float32)[None].expand(n, -1)
        x = self.diffusion.sample(
            self.unet, text, null_text, obj, steps=params.steps, eta=params.eta, text_scale=params.text_scale,
            object_scale=params.object_scale, generator=torch.Generator().manual_seed(params.seed),
        )
        pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(p, "RGB") for p in pixels]


def make_grid(images: Sequence[Image.Image], size: int) -> Image.Image:
    """One row of square cells: each image centre-cropped and resized to size x size."""
    grid = Image.new("RGB", (size * len(images), size), (255, 255, 255))
    for i, image in enumerate(images):
        grid.paste(ImageOps.fit(image.convert("RGB"), (size, size), method=Image.Resampling.BICUBIC), (i * size, 0))
    return grid


def sample(
    checkpoint: str,
    reference_image_path: str,
    prompt: str,
    out_path: str,
    *,
    params: SampleParams = SampleParams(),
    device: str = "auto",
) -> dict[str, Any]:
    """Write the grid reference | masked reference | N samples to `out_path` (PNG)."""
    customizer = Customizer(checkpoint, device=device)
    ref = customizer.reference(reference_image_path)
    images = customizer.generate(ref.embedding, prompt, params)
    grid = make_grid([ref.image, ref.masked, *images], customizer.image_size)
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    write_atomic(os.path.abspath(out_path), buffer.getvalue())
    fraction = float(np.count_nonzero(np.asarray(ref.mask))) / (ref.mask.size[0] * ref.mask.size[1])
    return {"out": out_path, "size": grid.size, "samples": len(images), "mask_fraction": fraction, "step": customizer.step}
