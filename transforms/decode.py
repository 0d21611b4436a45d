"""Decode and validate: raw input bytes -> the upright RGB JPEG that goes into the shard.

Rules:
- the whole image is decoded (a truncated file is an error, never silently padded);
- the pixel count is checked before decoding (decompression bombs are rejected cheaply);
- EXIF orientation is applied, animations keep their first frame, transparency is composited
  onto white, 16-bit and palette images are converted properly, everything ends as RGB;
- degenerate images (too small, extreme aspect ratio) are rejected with the reason;
- `max_side` downscales (aspect kept) so the models and the shard see the same pixels;
- an RGB JPEG that needs no change keeps its original bytes (no generation loss).
Nothing is ever replaced by a placeholder: a rejected image becomes a dead letter.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Optional

import apache_beam as beam
import numpy as np
from PIL import Image, ImageOps

from prep.schemas.records import DeadLetter, Sample
from prep.transforms.common import counter, dead

STAGE = "decode"
DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000; PIL's own default warns at ~89M and fails at 179M
ORIENTATION_TAG = 0x0112


class ImageRejected(ValueError):
    """The image cannot be used; the message is the reason a person reads."""


@dataclass(frozen=True)
class DecodeParams:
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = 16
    max_aspect: float = 10.0
    max_side: Optional[int] = None
    jpeg_quality: int = 95


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(scaled.astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(raw: bytes, params: DecodeParams = DecodeParams()) -> tuple[bytes, int, int]:
    """Return (jpeg_bytes, width, height) of the validated image, or raise ImageRejected."""
    if not raw:
        raise ImageRejected("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as exc:
        raise ImageRejected(f"decompression bomb: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any decoder error means "not an image we can read"
        raise ImageRejected(f"not a decodable image: {type(exc).__name__}: {exc}") from None
    width, height = img.size
    if width * height > params.max_pixels:
        raise ImageRejected(f"too many pixels: {width}x{height} = {width * height} > limit {params.max_pixels}")
    fmt = img.format
    try:
        img.seek(0)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
    except Exception as exc:  # noqa: BLE001 - truncated, corrupt, or over the pixel limit
        raise ImageRejected(f"cannot decode {fmt or 'image'} data: {type(exc).__name__}: {exc}") from None
    orientation = img.getexif().get(ORIENTATION_TAG, 1)
    multi_frame = getattr(img, "n_frames", 1) > 1
    needs_transpose = orientation not in (None, 1)
    if needs_transpose:
        img = ImageOps.exif_transpose(img)
    source_mode = img.mode
    img = _to_rgb(img)
    width, height = img.size
    if min(width, height) < params.min_side:
        raise ImageRejected(f"too small: {width}x{height} (min side {params.min_side})")
    aspect = max(width, height) / min(width, height)
    if aspect > params.max_aspect:
        raise ImageRejected(f"extreme aspect ratio {aspect:.1f} ({width}x{height}, max {params.max_aspect})")
    resized = False
    if params.max_side and max(width, height) > params.max_side:
        scale = params.max_side / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        width, height = img.size
        resized = True
    if fmt == "JPEG" and source_mode == "RGB" and not (needs_transpose or resized or multi_frame):
        return raw, width, height
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=params.jpeg_quality, subsampling=0 if params.jpeg_quality >= 90 else 2)
    return buf.getvalue(), width, height


def load_rgb(jpeg: bytes) -> Image.Image:
    """Open an image that `decode_image` produced (upright RGB; no further fixes needed)."""
    img = Image.open(io.BytesIO(jpeg))
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


class DecodeImages(beam.DoFn):
    """Sample(raw) -> Sample(image_jpeg, width, height), or a dead letter with the reason."""

    def __init__(self, params: DecodeParams = DecodeParams()):
        self._params = params
        self._ok = counter(STAGE, "ok")
        self._rejected = counter(STAGE, "dead_lettered")

    def setup(self):
        # Explicit, per worker: PIL's own guard is a second line behind our pixel check.
        Image.MAX_IMAGE_PIXELS = max(self._params.max_pixels, 1)

    def process(self, sample: Sample):
        try:
            jpeg, width, height = decode_image(sample.raw or b"", self._params)
        except ImageRejected as exc:
            self._rejected.inc()
            yield dead(DeadLetter.of(sample, STAGE, str(exc)))
            return
        self._ok.inc()
        yield sample.with_(raw=None, image_jpeg=jpeg, width=width, height=height)
