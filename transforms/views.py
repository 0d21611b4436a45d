"""Refs for objects without a second photo: augmented views of the sample's own image.

Cross-reference regularisation swaps a sample's object embedding for that of another photo of
the same object. An LSUN record, or a singleton identity of CelebA or a folder, has no other
photo, so it would never be swapped. `--singleton-refs augment` gives such a sample K views of
its own image instead (a random resized crop, a horizontal flip, a mild colour jitter), each
masked and embedded by the run's own mask and CLIP models like any image, and stores their
embeddings as its refs with `ref_kinds` "augmented".

- Which samples: those of an input kind set to `augment` (default: lsun; `--singleton-refs`
  overrides it for every kind) whose identity has one planned image (LSUN: every record).
  Identity refs are preferred: a sample that pairing gives identity refs keeps them and its
  views are dropped; an identity outlier gets none (it may not be the object it is filed as).
- Deterministic: the view parameters are drawn from (seed, sample key, view index) alone, so
  reruns, worker counts and chunking give the same bytes.
- A view travels the pipeline as a Sample keyed `<sample key>#aug<j>` ('#' never occurs in a
  sample key) with `view_of` set. It is never written as a sample; a view that fails mask or
  embed is counted (`views/failed`), not dead-lettered, and the sample gets fewer refs.
"""

from __future__ import annotations

import hashlib
import io
from typing import Iterator, Optional

import apache_beam as beam
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from prep.schemas.records import Sample
from prep.transforms.common import counter

VIEW_MARK = "#aug"
AUGMENTED = "augmented"
IDENTITY = "identity"
REF_KINDS = (IDENTITY, AUGMENTED)
# Random resized crop: the crop keeps this share of the area, with an aspect ratio (w/h) change
# in this range; the crop is resized back to the image's size. Then a flip with p = 0.5 and a
# brightness / contrast / saturation factor each in [1 - JITTER, 1 + JITTER].
CROP_AREA = (0.6, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
JITTER = 0.1
VIEW_JPEG_QUALITY = 95


def view_key(key: str, index: int) -> str:
    return f"{key}{VIEW_MARK}{index}"


def is_view_key(key: str) -> bool:
    return VIEW_MARK in key


def parent_of(key: str) -> tuple[str, int]:
    parent, _, index = key.rpartition(VIEW_MARK)
    return parent, int(index)


def _rng(seed: int, key: str, index: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}\x00{key}\x00{index}".encode("utf-8")).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def augment(image: Image.Image, seed: int, key: str, index: int) -> Image.Image:
    """One view of `image` (RGB), a pure function of (pixels, seed, key, index)."""
    rng = _rng(seed, key, index)
    width, height = image.size
    area = width * height * rng.uniform(*CROP_AREA)
    ratio = float(np.exp(rng.uniform(np.log(CROP_RATIO[0]), np.log(CROP_RATIO[1]))))
    w = int(round(min(width, max(1.0, np.sqrt(area * ratio)))))
    h = int(round(min(height, max(1.0, np.sqrt(area / ratio)))))
    x0 = int(rng.integers(0, width - w + 1))
    y0 = int(rng.integers(0, height - h + 1))
    view = image.crop((x0, y0, x0 + w, y0 + h)).resize((width, height), Image.Resampling.BICUBIC)
    if rng.uniform() < 0.5:
        view = ImageOps.mirror(view)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        view = enhancer(view).enhance(float(rng.uniform(1 - JITTER, 1 + JITTER)))
    return view


def view_jpegs(image_jpeg: bytes, seed: int, key: str, indices) -> list[bytes]:
    """The JPEG bytes of views `indices` of one image, decoded once."""
    with Image.open(io.BytesIO(image_jpeg)) as opened:
        rgb = opened.convert("RGB")
    found = []
    for index in indices:
        out = io.BytesIO()
        augment(rgb, seed, key, index).save(out, format="JPEG", quality=VIEW_JPEG_QUALITY)
        found.append(out.getvalue())
    return found


def view_jpeg(image_jpeg: bytes, seed: int, key: str, index: int) -> bytes:
    return view_jpegs(image_jpeg, seed, key, [index])[0]


class MakeViews(beam.DoFn):
    """Each sample passes on; a sample that gets views is followed by its K views.

    `every_kind`: source kinds whose every sample is its own object (lsun); `singletons`: the
    keys of the other samples that get views (planned singletons of kinds set to augment)."""

    def __init__(self, k: int, seed: int, every_kind: frozenset[str], singletons: frozenset[str],
                 singletons_path: Optional[str] = None):
        self._k, self._seed = k, seed
        self._every_kind, self._singletons = every_kind, singletons
        self._path = singletons_path  # many singletons: one key per line, read at setup (not in the job graph)
        self._made = counter("views", "made")

    def setup(self):
        if self._path is not None:
            from apache_beam.io.filesystems import FileSystems

            with FileSystems.open(self._path) as f:
                self._singletons = frozenset(f.read().decode("utf-8").split())

    def wants(self, sample: Sample) -> bool:
        return sample.source in self._every_kind or sample.key in self._singletons

    def process(self, sample: Sample) -> Iterator[Sample]:
        yield sample
        if not self.wants(sample) or sample.image_jpeg is None:
            return
        for j, jpeg in enumerate(view_jpegs(sample.image_jpeg, self._seed, sample.key, range(self._k))):
            self._made.inc()
            yield sample.with_(key=view_key(sample.key, j), image_jpeg=jpeg,
                               view_of=sample.key, caption=None, caption_vlm=None, caption_attributes=None,
                               reused=())


def view_entry(view: Sample) -> tuple[str, tuple[int, np.ndarray]]:
    parent, index = parent_of(view.key)
    return parent, (index, view.embedding)


def with_views(entry, refs_cls) -> Iterator[tuple[str, object]]:
    """(key, {"refs": [Refs], "views": [(j, embedding)]}) -> (key, Refs): identity refs when
    pairing found any, else the views' embeddings in view order (not for outliers)."""
    key, grouped = entry
    found = list(grouped["refs"])
    if not found:  # the sample itself did not reach pairing (a dead letter): its views go too
        return
    refs: object = found[0]
    views = sorted(grouped["views"], key=lambda v: v[0])
    if refs.ref_keys or not views or refs.outlier_reason is not None:
        yield key, refs
        return
    block = np.stack([np.asarray(e, np.float32) for _, e in views]).astype(np.float32)
    yield key, refs_cls(ref_keys=tuple(view_key(key, j) for j, _ in views), refs=block, split=refs.split,
                        verdict=refs.verdict, outlier_reason=refs.outlier_reason,
                        ref_kinds=(AUGMENTED,) * len(views))


def ref_kinds_of(ref_keys, ref_kinds: Optional[tuple] = None) -> list[str]:
    """The kind of each ref: as recorded, else identity (outputs from before augmented refs)."""
    if ref_kinds:
        return list(ref_kinds)
    return [IDENTITY] * len(ref_keys)
