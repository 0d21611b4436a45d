"""Embed stage: open_clip image encoder on the *masked* object, L2-normalised.

The model is an open_clip model name (`ViT-L-14`, ...) or a path to a model-config JSON
(registered with open_clip on load, so any worker can build it); the weights are a pretrained
tag (`openai`, `laion2b_s34b_b79k`, ... downloaded by open_clip when there is a network) or a
local checkpoint file. General-domain samples do not pass here: they get `null_embedding`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from prep.device import resolve_device
from prep.models.locate import hf_hub_cache
from prep.schemas.records import Sample
from prep.transforms.decode import load_rgb
from prep.transforms.inference import ModelUnavailable, StageHandler
from prep.transforms.options import EmbedOptions
from prep.transforms.mask import DEFAULT_FILL, load_mask, masked_image

STAGE = "embed"


def register_model(model: str) -> str:
    """Return the open_clip model name, registering a config JSON path first if given one."""
    if model.endswith(".json"):
        import open_clip

        if not os.path.isfile(model):
            raise ModelUnavailable(f"open_clip model config {model!r} does not exist")
        open_clip.add_model_config(model)
        return os.path.splitext(os.path.basename(model))[0]
    return model


def embed_dim(model: str) -> int:
    """The embedding width of a model, from its config (no weights are loaded)."""
    if model.endswith(".json"):
        with open(model, encoding="utf-8") as f:
            return int(json.load(f)["embed_dim"])
    import open_clip

    config = open_clip.get_model_config(model)
    if config is None:
        raise ModelUnavailable(f"unknown open_clip model {model!r}; see open_clip.list_models()")
    return int(config["embed_dim"])


def null_embedding(dim: int) -> np.ndarray:
    """φ: the fixed object embedding of general-domain samples (all zeros)."""
    return np.zeros((dim,), dtype=np.float32)


def load_clip(model: str, pretrained: Optional[str], device: str = "cpu", precision: str = "fp32"):
    """(model, preprocess) in eval mode, with a clear error when the weights are missing."""
    import open_clip

    name = register_model(model)
    try:
        net, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained or None, device=device, precision=precision
        )
    except Exception as exc:  # noqa: BLE001 - a failed download surfaces as many exception types
        if "Unknown model" in str(exc):
            raise ModelUnavailable(f"unknown open_clip model {model!r}; see open_clip.list_models()") from exc
        cache = hf_hub_cache()  # where the preflight looked too (prep.models.locate.locate_clip)
        raise ModelUnavailable(
            f"open_clip could not load {name!r} with pretrained={pretrained!r} ({type(exc).__name__}: {exc}). "
            f"Pretrained tags download to the Hugging Face cache ({cache}; set HF_HOME to move it) and need a "
            f"network; offline, pass --clip-pretrained /path/to/checkpoint (.safetensors, .bin or .pt)"
        ) from exc
    net.eval()
    return net, preprocess


def split_preprocess(preprocess) -> Optional[tuple[Any, tuple, tuple]]:
    """open_clip's image transform split where its pixels become floats: (host, mean, std).

    `host` is the transform's PIL part (resize, crop, mode), ending in uint8 pixels; what
    followed it, ToTensor's scaling to [0, 1] and Normalize(mean, std), is elementwise, so it can
    run once over the stacked batch on the model's device (`device_pixels`) with the same
    result bit for bit (tested). The pool, the batch stack and the host-to-GPU copy then carry a
    quarter of the bytes (uint8, not float32), and the float work is the GPU's. None: a
    transform of another shape, which then runs whole on the host."""
    from torchvision.transforms import Compose, Normalize

    steps = list(getattr(preprocess, "transforms", []))
    if (len(steps) < 2 or not isinstance(steps[-1], Normalize) or steps[-1].inplace
            or type(steps[-2]) not in _to_tensor_types()):
        return None
    mean, std = tuple(float(v) for v in steps[-1].mean), tuple(float(v) for v in steps[-1].std)
    if len(mean) != 3 or len(std) != 3:
        return None
    return Compose(steps[:-2]), mean, std


def _to_tensor_types() -> tuple:
    """ToTensor, and open_clip's MaybeToTensor (a ToTensor that passes tensors through)."""
    from torchvision.transforms import ToTensor

    try:
        from open_clip.transform import MaybeToTensor
    except ImportError:  # pragma: no cover - older open_clip
        return (ToTensor,)
    return (ToTensor, MaybeToTensor)


@dataclass
class LoadedClip:  # a class, not a tuple: Beam's Shared keeps a weak reference to it
    model: Any
    preprocess: Any
    device: str

    def __post_init__(self):
        split = split_preprocess(self.preprocess)
        self.host, self.mean, self.std = split if split is not None else (None, None, None)

    def host_pixels(self, image) -> Any:
        """One image's host-side input: uint8 HxWx3 pixels (split transform) or the whole
        transform's float tensor."""
        if self.host is None:
            return self.preprocess(image)
        out = self.host(image)
        if out.mode != "RGB":
            out = out.convert("RGB")
        return np.asarray(out)

    def batch(self, prepared: list) -> Any:
        """The host part of a batch: the elements stacked into one CPU tensor."""
        import torch

        if self.host is None:
            return torch.stack(prepared)
        return torch.from_numpy(np.stack(prepared))

    def device_pixels(self, batch) -> Any:
        """The batch on the model's device as the whole transform would give it: float
        N x 3 x H x W, scaled to [0, 1] and normalised (the split's second half)."""
        import torch

        batch = batch.to(self.device)
        if self.host is None:
            return batch
        dtype = torch.get_default_dtype()
        mean = torch.tensor(self.mean, dtype=dtype, device=batch.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=dtype, device=batch.device).view(1, 3, 1, 1)
        # ToTensor: permute to channels first (contiguous), float, / 255; Normalize: - mean, / std
        pixels = batch.permute(0, 3, 1, 2).contiguous().to(dtype=dtype).div(255)
        return pixels.sub_(mean).div_(std)


def input_dtype(net) -> Any:
    """The dtype the image tower's first layer computes in. Not the first parameter's: open_clip's
    fp16/bf16 casts only conv and linear weights, so `class_embedding` stays fp32 (a float input
    to a half conv fails on the GPU)."""
    import torch

    tower = getattr(net, "visual", net)
    for module in tower.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            return module.weight.dtype
    return next(net.parameters()).dtype


class EmbedHandler(StageHandler):
    stage = STAGE

    def __init__(
        self,
        model: str,
        pretrained: Optional[str],
        *,
        fill: tuple[int, int, int] = DEFAULT_FILL,
        device: str = "auto",
        precision: str = "auto",
        min_batch_size: Optional[int] = None,
        max_batch_size: int = EmbedOptions.batch_size,
        prepare_threads: int = 1,
    ):
        super().__init__(min_batch_size=min_batch_size, max_batch_size=max_batch_size, prepare_threads=prepare_threads)
        self.model_id = model
        self.pretrained = pretrained
        self.fill = tuple(fill)
        self.device = device
        self.precision = precision

    def describe(self) -> dict:
        return {"model": self.model_id, "pretrained": self.pretrained, "fill": list(self.fill), "precision": self.precision}

    def load_model(self):
        device = resolve_device(self.device)
        precision = self.precision
        if precision == "auto":
            precision = "fp16" if device.startswith("cuda") else "fp32"
        net, preprocess = load_clip(self.model_id, self.pretrained, device, precision)
        return LoadedClip(net, preprocess, device)

    def prepare(self, sample: Sample, model):
        image = masked_image(load_rgb(sample.image_jpeg), load_mask(sample.mask_png), self.fill)
        return model.host_pixels(image)

    def infer(self, prepared: list, model) -> list:
        import torch

        net = model.model
        dtype = input_dtype(net)
        with torch.inference_mode():
            batch = model.device_pixels(model.batch(prepared))
            feats = net.encode_image(batch.to(dtype)).float()
            feats = torch.nn.functional.normalize(feats, dim=-1)
        return list(feats.cpu().numpy().astype(np.float32))

    def apply(self, sample: Sample, embedding: np.ndarray) -> Sample:
        if not np.all(np.isfinite(embedding)):
            raise ValueError("embedding has non-finite values")
        return sample.with_(embedding=np.ascontiguousarray(embedding, dtype=np.float32))
