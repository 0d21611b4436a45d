"""Mask stage: rembg salient-object segmentation -> a binary mask (0/255) at image size.

The model is a rembg model name (`u2net`, `u2netp`, `u2net_human_seg`, `isnet-general-use`,
...; rembg downloads it to its home folder when there is a network, or finds it there) or a
path to a custom ONNX file anywhere on disk, which is linked into rembg's models folder
(rembg refuses custom paths outside it). The preflight finds both without loading them:
`prep.models.locate.locate_mask_model`.

`masked_image` (x ⊗ m with a fixed fill colour) is the function the embed stage and the
sampler both use, so the object the trainer conditions on is made one way only.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import Optional

import numpy as np
from PIL import Image

from prep.models.locate import is_custom_mask_model, rembg_model_files
from prep.schemas.records import DeadLetterKind, Sample
from prep.transforms.decode import load_rgb
from prep.transforms.inference import ModelUnavailable, Reject, StageHandler
from prep.transforms.options import MaskOptions

STAGE = "mask"
DEFAULT_FILL = MaskOptions.fill


def is_custom_model(model: str) -> bool:
    return is_custom_mask_model(model)  # one rule, shared with the preflight (models/locate.py)


def binarize(soft: Image.Image | np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Soft mask (uint8 0..255) -> uint8 array of only 0 and 255 (>= threshold*255 is foreground)."""
    arr = np.asarray(soft, dtype=np.uint8)
    return np.where(arr >= round(threshold * 255), 255, 0).astype(np.uint8)


def mask_png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask, "L").save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def load_mask(png: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(png))
    img.load()
    return img


def masked_image(image: Image.Image, mask: Image.Image, fill: tuple[int, int, int] = DEFAULT_FILL) -> Image.Image:
    """x ⊗ m: the object's pixels where the mask is 255, `fill` everywhere else."""
    if mask.size != image.size:
        raise ValueError(f"mask size {mask.size} != image size {image.size}")
    background = Image.new("RGB", image.size, tuple(fill))
    # (convert() to the mode an image already has is a full copy: only where it differs)
    image = image if image.mode == "RGB" else image.convert("RGB")
    mask = mask if mask.mode == "L" else mask.convert("L")
    return Image.composite(image, background, mask)


def import_rembg():
    """The rembg package, imported without changing torch's thread count.

    Importing rembg imports pymatting, whose numba functions are compiled with `parallel=True`:
    numba's OpenMP threading layer then sets the OpenMP thread count (which torch shares) to
    the number of cores, overriding OMP_NUM_THREADS and an earlier `torch.set_num_threads`.
    With `--workers N` that put N x cores torch threads on the cores; oversubscribed OpenMP
    threads spin and wait on each other: measured 0.55 s against 0.02 s per tiny captioner
    batch on a loaded 2-core machine. So the count is put back (and `--workers` also sets
    NUMBA_NUM_THREADS per worker: pipeline/local.py)."""
    import sys

    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    import rembg
    import rembg.sessions  # noqa: F401 - the sessions are what prep uses

    if torch is not None and torch.get_num_threads() != before:
        torch.set_num_threads(before)
    return rembg


def rembg_home() -> str:
    return import_rembg().sessions.base.BaseSession.rembg_home()


def new_rembg_session(model: str, providers: Optional[list[str]] = None):
    """A rembg session for a model name or a custom ONNX path, with a clear error if absent."""
    import onnxruntime as ort

    new_session = import_rembg().new_session

    if providers is None:
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if os.environ.get("PREP_THREADS"):  # set per worker process by `prep run --workers N`
        opts.intra_op_num_threads = int(os.environ["PREP_THREADS"])
        opts.inter_op_num_threads = 1
    if is_custom_model(model):
        path = os.path.abspath(os.path.expanduser(model))
        if not os.path.isfile(path):
            raise ModelUnavailable(f"mask model file {model!r} does not exist (pass an ONNX file with rembg's u2net interface)")
        # rembg only accepts custom models inside its home; link ours there (by content hash).
        digest = hashlib.sha256(open(path, "rb").read()).hexdigest()[:16]
        folder = os.path.join(rembg_home(), "models", "prep-custom")
        os.makedirs(folder, exist_ok=True)
        link = os.path.join(folder, f"{digest}.onnx")
        if not os.path.exists(link):
            tmp = f"{link}.{os.getpid()}.tmp"
            os.symlink(path, tmp)
            os.replace(tmp, link)
        return new_session("u2net_custom", model_path=link, sess_opts=opts, providers=providers)
    try:
        return new_session(model, sess_opts=opts, providers=providers)
    except ValueError as exc:
        raise ModelUnavailable(f"unknown rembg model {model!r}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - a failed download surfaces as many exception types
        raise ModelUnavailable(
            f"rembg model {model!r} is not on disk and could not be downloaded ({type(exc).__name__}: {exc}). "
            f"Put {model}.onnx at one of {', '.join(rembg_model_files(model))} (or set U2NET_HOME to a folder "
            f"holding it), or pass --mask-model /path/to/{model}.onnx"
        ) from exc


class MaskHandler(StageHandler):
    """rembg segmentation, binarised; rejects images whose foreground is below a floor."""

    stage = STAGE
    pad_batches = False  # rembg runs one image at a time: nothing to pad

    def __init__(
        self,
        model: str,
        *,
        threshold: float = MaskOptions.threshold,
        min_fraction: float = 0.0,
        device: str = "auto",
        min_batch_size: Optional[int] = None,
        max_batch_size: int = MaskOptions.batch_size,
        prepare_threads: int = 1,
    ):
        super().__init__(min_batch_size=min_batch_size, max_batch_size=max_batch_size, prepare_threads=prepare_threads)
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"mask threshold must be in (0, 1), got {threshold}")
        self.model_id = model
        self.threshold = threshold
        self.min_fraction = min_fraction
        self.device = device

    def describe(self) -> dict:
        return {"model": self.model_id, "threshold": self.threshold, "min_fraction": self.min_fraction}

    def load_model(self):
        providers = ["CPUExecutionProvider"] if self.device == "cpu" else None
        return new_rembg_session(self.model_id, providers)

    def prepare(self, sample: Sample, session):
        return load_rgb(sample.image_jpeg)

    def infer(self, images: list, session) -> list:
        return [session.predict(image)[0] for image in images]

    def finish(self, soft):
        """Soft mask -> (binary mask PNG, foreground fraction), or a Reject below the floor."""
        mask = binarize(soft, self.threshold)
        fraction = float(np.count_nonzero(mask)) / mask.size
        if fraction < self.min_fraction:
            return Reject(DeadLetterKind.MASK_BELOW_FLOOR,
                          f"mask foreground {fraction:.2%} below the floor {self.min_fraction:.2%}")
        return mask_png(mask), fraction

    def apply(self, sample: Sample, result) -> Sample:
        png, fraction = result
        return sample.with_(mask_png=png, mask_fraction=fraction)
