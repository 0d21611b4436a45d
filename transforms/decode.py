"""Decode and validate: raw input bytes -> the upright RGB JPEG that goes into the shard.

Rules:
- the whole image is decoded (a truncated file is an error, never silently padded); JPEGs
  also get a structural check (an end-of-image marker after the scan data, no invalid
  markers inside it), because Pillow decodes a JPEG whose tail was cut and zero-filled, or
  whose scan data holds garbage markers, into grey or smeared pixels without a word;
- the pixel count is checked before decoding (decompression bombs are rejected cheaply:
  a header that declares 100000x100000 pixels never allocates them);
- the size rules (too small, extreme aspect ratio) are checked on the header too, before
  any pixel is decoded;
- EXIF orientation is applied, animations keep their first frame, transparency is composited
  onto white, 16-bit and palette images are converted properly, everything ends as RGB;
- `max_side` downscales (aspect kept) so the models and the shard see the same pixels;
- an RGB JPEG that needs no change keeps its original bytes (no generation loss).
Nothing is ever replaced by a placeholder: a rejected image becomes a dead letter whose
reason starts with a short class ("too many pixels", "truncated or corrupt image", ...)
followed by ": " and the details (the manifest counts dead letters by that class).

Known limit: libjpeg repairs some corruptions inside the entropy-coded data silently (a
flipped bit decodes to a wrong block, with a warning Pillow does not expose); only the
structural damage listed above is detected.
"""

from __future__ import annotations

import io
import re
import threading
import warnings
from collections import OrderedDict
from typing import Optional

import apache_beam as beam
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from prep.schemas.records import DeadLetter, DeadLetterKind, Sample
from prep.transforms.common import counter, dead
from prep.transforms.options import DecodeParams

STAGE = "decode"
# 8000 x 8000 by default; PIL's own default warns at ~89M and fails at 179M.
DEFAULT_MAX_PIXELS = DecodeParams.max_pixels
ORIENTATION_TAG = 0x0112

# Reason kinds (schemas.records.DeadLetterKind; a reason reads "<kind>: <details>").
EMPTY = DeadLetterKind.EMPTY_FILE
NOT_AN_IMAGE = DeadLetterKind.NOT_AN_IMAGE
TOO_MANY_PIXELS = DeadLetterKind.TOO_MANY_PIXELS
CORRUPT = DeadLetterKind.CORRUPT
UNCONVERTIBLE = DeadLetterKind.UNCONVERTIBLE
TOO_SMALL = DeadLetterKind.TOO_SMALL
EXTREME_ASPECT = DeadLetterKind.EXTREME_ASPECT

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_INT16_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


class ImageRejected(ValueError):
    """The image cannot be used; `kind` says why for code, the message is the reason a person reads."""

    def __init__(self, kind: DeadLetterKind, message: str):
        super().__init__(message)
        self.kind = kind


def _reject(kind: DeadLetterKind, details: str) -> ImageRejected:
    return ImageRejected(kind, f"{kind.value}: {details}")



# --------------------------------------------------------------------------------------
# JPEG structure
# --------------------------------------------------------------------------------------

# Markers without a length field: TEM and RST0..RST7 (SOI/EOI are handled on their own).
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


def jpeg_structure_problem(raw: bytes) -> Optional[str]:
    """What is structurally wrong with a JPEG that libjpeg would still decode, or None.

    Walks the marker segments by their lengths; inside each scan's entropy-coded data a
    0xFF byte may only be followed by 0x00 (stuffing), RST0..RST7, more 0xFF fill bytes, or
    the marker that ends the scan. The file must reach an end-of-image marker (EOI) after
    its last scan; whatever follows EOI (camera trailers, MPO frames) is not looked at.
    """
    n = len(raw)
    if raw[:2] != b"\xff\xd8":
        return "has no start-of-image marker"
    pos = 2
    scans = 0
    while True:
        if pos >= n:
            return "ends before its end-of-image marker (cut short)"
        if raw[pos] != 0xFF:
            return f"has 0x{raw[pos]:02X} at byte {pos} where a marker belongs"
        while pos < n and raw[pos] == 0xFF:  # fill bytes before a marker
            pos += 1
        if pos >= n:
            return "ends before its end-of-image marker (cut short)"
        marker = raw[pos]
        pos += 1
        if marker == 0xD9:
            return None if scans else "has its end-of-image marker before any scan data"
        if marker in _STANDALONE:
            continue
        if marker < 0xC0 or marker == 0xD8:
            return f"has an invalid marker 0xFF{marker:02X} at byte {pos - 2}"
        if pos + 2 > n:
            return "ends inside a marker segment (cut short)"
        length = int.from_bytes(raw[pos : pos + 2], "big")
        if length < 2 or pos + length > n:
            return f"has a marker 0xFF{marker:02X} at byte {pos - 2} whose length {length} runs past the end"
        pos += length
        if marker != 0xDA:  # not SOS: a plain segment
            continue
        scans += 1
        while True:  # entropy-coded data up to the next real marker
            i = raw.find(b"\xff", pos)
            if i < 0 or i + 1 >= n:
                return "has no end-of-image marker after its scan data (the file is cut short or its end overwritten)"
            follower = raw[i + 1]
            if follower == 0x00 or 0xD0 <= follower <= 0xD7:
                pos = i + 2
            elif follower == 0xFF:
                pos = i + 1
            elif follower < 0xC0 or follower == 0xD8:
                return f"has an invalid marker 0xFF{follower:02X} inside its scan data at byte {i}"
            else:
                pos = i
                break


# --------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _INT16_MODES or mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit files (PNG, TIFF) open as I;16 in Pillow 12, or as I in older versions.
        peak = 65535.0 if mode in _INT16_MODES or arr.max() > 255 else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(scaled.astype(np.uint8), "L").convert("RGB")
    if mode in ("P", "L", "RGB", "1") and "transparency" in img.info:
        # A palette entry or a colour key marks transparent pixels.
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


_PIL_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def _open(raw: bytes, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Our own pixel check follows at once, with the configured limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as exc:
        # Pillow's guard (Image.MAX_IMAGE_PIXELS, 2x our limit inside DecodeImages) fired
        # while reading the header; its message has the pixel count but not the size.
        found = _PIL_BOMB_PIXELS.search(str(exc))
        pixels = f"{int(found.group(1))} pixels" if found else str(exc)
        raise _reject(
            TOO_MANY_PIXELS, f"{pixels} > limit {max_pixels} (decompression bomb guard, rejected from the header)"
        ) from None
    except UnidentifiedImageError:
        # (Pillow's own message names the BytesIO object's address: not stable across runs.)
        raise _reject(NOT_AN_IMAGE, f"no image format recognised; the file starts with {raw[:20]!r}") from None
    except Exception as exc:  # noqa: BLE001 - any decoder error means "not an image we can read"
        raise _reject(NOT_AN_IMAGE, f"{type(exc).__name__}: {exc}") from None


def decode_image(raw: bytes, params: DecodeParams = DecodeParams()) -> tuple[bytes, int, int]:
    """Return (jpeg_bytes, width, height) of the validated image, or raise ImageRejected."""
    jpeg, width, height, _ = _decode(raw, params)
    return jpeg, width, height


def _decode(raw: bytes, params: DecodeParams) -> tuple[bytes, int, int, Optional[Image.Image]]:
    """decode_image's work; also the RGB image when the output is `raw` itself (a JPEG kept as
    it came), whose pixels are then exactly what `load_rgb(raw)` decodes."""
    if not raw:
        raise _reject(EMPTY, "0 bytes")
    img = _open(raw, params.max_pixels)
    fmt = img.format
    # Header checks: nothing is decoded yet (orientation swaps sides, it changes neither rule).
    width, height = img.size
    if width * height > params.max_pixels:
        raise _reject(
            TOO_MANY_PIXELS,
            f"{width}x{height} = {width * height} pixels > limit {params.max_pixels} "
            f"(decompression bomb guard, rejected from the header)",
        )
    if min(width, height) < params.min_side:
        raise _reject(TOO_SMALL, f"{width}x{height} (min side {params.min_side})")
    aspect = max(width, height) / min(width, height)
    if aspect > params.max_aspect:
        raise _reject(EXTREME_ASPECT, f"{aspect:.1f} ({width}x{height}, max {params.max_aspect})")
    if fmt in ("JPEG", "MPO"):
        problem = jpeg_structure_problem(raw)
        if problem is not None:
            raise _reject(CORRUPT, f"JPEG {problem}")
    try:
        animated = bool(getattr(img, "is_animated", False))
        img.seek(0)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
    except Exception as exc:  # noqa: BLE001 - truncated, corrupt, or over the pixel limit
        raise _reject(CORRUPT, f"the {fmt or 'image'} data does not decode ({type(exc).__name__}: {exc})") from None
    try:
        orientation = img.getexif().get(ORIENTATION_TAG, 1)
        needs_transpose = orientation not in (None, 1)
        if needs_transpose:
            img = ImageOps.exif_transpose(img)
        source_mode = img.mode
        has_key_colour = "transparency" in img.info
        img = _to_rgb(img)
        width, height = img.size
        resized = False
        if params.max_side and max(width, height) > params.max_side:
            scale = params.max_side / max(width, height)
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
            width, height = img.size
            resized = True
        if fmt == "JPEG" and source_mode == "RGB" and not (needs_transpose or resized or animated or has_key_colour):
            return raw, width, height, img
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=params.jpeg_quality, subsampling=0 if params.jpeg_quality >= 90 else 2)
        return buf.getvalue(), width, height, None
    except Exception as exc:  # noqa: BLE001 - an odd mode or EXIF block: a dead letter, never a crash
        raise _reject(UNCONVERTIBLE, f"{fmt or 'image'} in mode {img.mode}: {type(exc).__name__}: {exc}") from None


class DecodedImages:
    """Decode once: the RGB pixels of the JPEGs now flowing through this process, by bytes object.

    A specific sample's JPEG is needed by Decode (to validate it), Caption, Mask, Embed and
    Identity; each used to decode it again (about 30% of the host work per CelebA image, 55%
    for web-size images: `python -m bench.ceiling`). Beam runs these stages fused in one
    process and hands each stage the same `bytes` object, so the image is decoded once and
    looked up by that object: an entry holds a reference to its bytes, so the object's id is
    not reused while the entry lives, and a hit is checked with `is`, never by content. Where
    Beam serialises an element between stages (a fusion break, another process), the bytes
    are a new object: a miss, decoded as before. The pixels are the decoder's own either way,
    so the output does not change (tested: byte-identical with the cache off).

    Memory is bounded by `decoded_cache_mb` per process (least recently used out first; 0 turns
    the cache off). Callers get a copy (a memcpy, well under a decode), so no stage can change
    another's pixels, and the pool threads share nothing mutable.
    """

    def __init__(self, budget_mb: int):
        self._lock = threading.Lock()
        # id(bytes) -> [bytes, pixels, size, reads left (None: unknown, least recently used out)]
        self._entries: OrderedDict[int, list] = OrderedDict()
        self._bytes = 0
        self.configure(budget_mb)
        self.hits = self.misses = 0

    def configure(self, budget_mb: int) -> None:
        with self._lock:
            self._budget = max(0, int(budget_mb)) * 1024 * 1024
            self._evict()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            self.hits = self.misses = 0

    def get(self, jpeg: bytes) -> Optional[Image.Image]:
        with self._lock:
            entry = self._entries.get(id(jpeg))
            if entry is None or entry[0] is not jpeg:
                self.misses += 1
                return None
            self.hits += 1
            image = entry[1]
            if entry[3] is not None:
                entry[3] -= 1
                if entry[3] <= 0:  # its last reader: nobody else holds these pixels, no copy
                    del self._entries[id(jpeg)]
                    self._bytes -= entry[2]
                    return image
            self._entries.move_to_end(id(jpeg))
        return image.copy()

    def put(self, jpeg: bytes, image: Image.Image, reads: Optional[int] = None) -> bool:
        """Keep `image` for `jpeg`; `reads`: how many later stages will read it (the entry goes
        after the last of them; None: kept until the budget pushes it out). True: it was kept."""
        size = image.width * image.height * 4 + len(jpeg)  # PIL keeps RGB as 4 bytes a pixel
        if size > self._budget or (reads is not None and reads < 1):
            return False
        image.load()
        with self._lock:
            old = self._entries.pop(id(jpeg), None)
            if old is not None:
                self._bytes -= old[2]
            self._entries[id(jpeg)] = [jpeg, image, size, reads]
            self._bytes += size
            self._evict()
        return True

    def _evict(self) -> None:
        while self._entries and self._bytes > self._budget:
            _, (_, _, size, _) = self._entries.popitem(last=False)
            self._bytes -= size

    @property
    def held_bytes(self) -> int:
        return self._bytes


DECODED = DecodedImages(DecodeParams.decoded_cache_mb)  # one per process


def load_rgb(jpeg: bytes) -> Image.Image:
    """Open an image that `decode_image` produced (upright RGB; no further fixes needed);
    decoded once per process while it flows through the stages (`DecodedImages`)."""
    cached = DECODED.get(jpeg)
    if cached is not None:
        return cached
    img = Image.open(io.BytesIO(jpeg))
    img.load()
    img = img if img.mode == "RGB" else img.convert("RGB")
    # A kept image is shared with later readers: the caller gets its own copy of it.
    return img.copy() if DECODED.put(jpeg, img) else img


class DecodeImages(beam.DoFn):
    """Sample(raw) -> Sample(image_jpeg, width, height), or a dead letter with the reason.

    The pixels decoded here stay in DECODED for the stages after it, for the domains they reach
    (`keep_pixels`): general-domain images go past every model unless captioned, and would only
    push out the specific ones."""

    SPECIFIC = ("specific",)
    ALL = ("specific", "general")

    def __init__(self, params: DecodeParams = DecodeParams(), keep_pixels: tuple[str, ...] = SPECIFIC,
                 reads: Optional[dict[str, int]] = None, identity_modes: Optional[dict[str, str]] = None,
                 identity_staged: frozenset = frozenset()):
        self._params = params
        self._keep = tuple(keep_pixels)
        # How many later stages read a sample's pixels, by domain, plus the identity stage for
        # the sources whose identity model (`identity_modes`, source kind -> mode) has one
        # (`identity_staged`): the entry leaves the cache after its last reader, so it holds
        # only the images in flight. None: unknown.
        self._reads = dict(reads) if reads is not None else None
        self._identity_modes = dict(identity_modes or {})
        self._identity_staged = frozenset(identity_staged)
        self._ok = counter(STAGE, "ok")
        self._rejected = counter(STAGE, "dead_lettered")

    def setup(self):
        # Explicit, per worker: PIL's own guard is a second line behind our pixel check, and
        # a truncated image must raise (some libraries flip this global to "pad with grey").
        Image.MAX_IMAGE_PIXELS = max(self._params.max_pixels, 1)
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        DECODED.configure(self._params.decoded_cache_mb)

    def process(self, sample: Sample):
        try:
            jpeg, width, height, pixels = _decode(sample.raw or b"", self._params)
        except ImageRejected as exc:
            self._rejected.inc()
            yield dead(DeadLetter.of(sample, STAGE, exc.kind, str(exc)))
            return
        if pixels is not None and sample.domain in self._keep:
            reads = None
            if self._reads is not None:
                reads = self._reads.get(sample.domain, 0)
                if sample.domain == "specific":
                    from prep.transforms.verify import mode_of  # the one rule for a source's identity model

                    reads += int(mode_of(self._identity_modes, sample.source) in self._identity_staged)
            DECODED.put(jpeg, pixels, reads)  # the later stages find it decoded
        self._ok.inc()
        yield sample.with_(raw=None, image_jpeg=jpeg, width=width, height=height)
