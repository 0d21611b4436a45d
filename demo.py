"""A small synthetic dataset in the real input layouts, for demos, tests and benchmarks.

`write_demo_data(out_dir)` writes

    out_dir/celeba/                      CelebA's on-disk layout
        img_align_celeba/000001.jpg ...  178x218 RGB JPEG faces drawn with PIL
        identity_CelebA.txt              "000001.jpg 2880" per line, no header
        list_attr_celeba.txt             count line, 40 names, "000001.jpg -1  1 ..." rows
        list_eval_partition.txt          "000001.jpg 0" (0 train, 1 val, 2 test)
    out_dir/general/000000.tar ...       img2dataset's WebDataset layout: KEY.jpg, KEY.txt, KEY.json
    out_dir/lsun/dog/data.mdb            LSUN's layout: an LMDB database, 40-hex-digit key -> image
                                         (WebP, every fourth one JPEG), plus one undecodable record

The faces are cartoons, but the data has the properties the pipeline relies on:

- Images of one identity share visible traits that are fixed per identity: skin tone, hair
  colour and length, face shape, glasses, facial hair, make-up, jewellery. Background colour,
  a small shift and scale, the mouth and a hat vary per image. A same-identity pair therefore
  looks alike while its two images still differ.
- The attribute rows describe what is drawn. Drawn labels: Male (short vs long hair), Bald,
  Black/Blond/Brown/Gray_Hair, Bangs, Pale_Skin, Oval_Face and Chubby (face shape),
  Eyeglasses, No_Beard, Mustache, Goatee, Bushy_Eyebrows, Narrow_Eyes, Big_Nose, Big_Lips,
  Rosy_Cheeks, Wearing_Lipstick, Wearing_Earrings, Wearing_Necklace, Wearing_Necktie, Blurry
  (per identity), and Smiling, Mouth_Slightly_Open, Wearing_Hat (per image). The remaining
  labels are random per identity and not visible.
- The background is a near-uniform colour chosen far from the skin, hair and clothes colours,
  so a background-removal model can separate the person.
- Images are in split order like the real dataset (train images first, then val, then test;
  identities never cross splits), shuffled within a split, and identity ids are sparse numbers
  in CelebA's range 1..10177, so nothing can rely on identities being contiguous.
- `corrupt=N` appends N files that are JPEG in name and first bytes only, with identity,
  attribute and partition rows like any other image: the reader must dead-letter them when
  decoding, not crash and not pass them on.

Everything is a function of `seed`: the same arguments give byte-identical files (numpy's
`default_rng` streams are stable; PIL's JPEG encoder is deterministic for fixed settings; tar
headers are fixed). Every file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import colorsys
import io
import json
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from prep.atomic import write_atomic
from prep.transforms.attributes import CELEBA_ATTRIBUTES

__all__ = ["write_demo_data", "CELEBA_IMAGE_SIZE", "GENERAL_IMAGE_SIZE", "JPEG_QUALITY"]

CELEBA_IMAGE_SIZE = (178, 218)  # (width, height) of img_align_celeba
GENERAL_IMAGE_SIZE = (256, 192)
JPEG_QUALITY = 90
MAX_CELEBA_IDENTITY = 10177  # identity ids in CelebA run 1..10177
# img2dataset's key: shard index * 10**oom_sample_per_shard + index in shard, zero-padded to
# oom_shard_count + oom_sample_per_shard digits. With its default 10,000 samples per shard and
# up to 99,999 shards that is 9 digits: shard 1, sample 3 -> "000010003".
_KEY_SAMPLES_PER_SHARD = 10_000
_KEY_DIGITS = 9
_SHARD_DIGITS = 6

# Independent random streams (numpy SeedSequence entropy [seed, stream, ...]): adding
# identities, images or shards never changes what the existing ones look like.
_STREAM_LAYOUT, _STREAM_IDENTITY, _STREAM_IMAGE, _STREAM_CORRUPT, _STREAM_GENERAL, _STREAM_LSUN = range(6)
LSUN_IMAGE_SIZE = (160, 128)
LSUN_BAD_RECORDS = 1

RGB = tuple[int, int, int]

_HAIR_RGB: dict[str, RGB] = {
    "Black_Hair": (28, 24, 24),
    "Blond_Hair": (226, 196, 118),
    "Brown_Hair": (112, 70, 38),
    "Gray_Hair": (168, 168, 170),
}
_HAIR_LABELS = tuple(_HAIR_RGB)
_PALE_SKIN: RGB = (250, 229, 216)
_SKIN_LIGHT: RGB = (236, 198, 168)
_SKIN_DARK: RGB = (104, 66, 42)
_FACIAL_HAIR_IF_BALD: RGB = (64, 48, 38)
_LIPSTICK: RGB = (186, 28, 52)
_GOLD: RGB = (232, 190, 40)
_DARK: RGB = (22, 22, 26)

PathLike = Union[str, "os.PathLike[str]"]


# --------------------------------------------------------------------------------------------
# Small helpers


def _chance(rng: np.random.Generator, p: float) -> bool:
    return bool(rng.random() < p)


def _pick(
    rng: np.random.Generator, options: Sequence[Any], weights: Sequence[float] | None = None
) -> Any:
    if weights is None:
        return options[int(rng.integers(len(options)))]
    p = np.asarray(weights, dtype=float)
    return options[int(rng.choice(len(options), p=p / p.sum()))]


def _rgb(values: Sequence[float]) -> RGB:
    r, g, b = (int(np.clip(round(float(v)), 0, 255)) for v in values)
    return (r, g, b)


def _jitter(rng: np.random.Generator, colour: RGB, amount: int) -> RGB:
    return _rgb([c + rng.integers(-amount, amount + 1) for c in colour])


def _scale(colour: RGB, factor: float) -> RGB:
    return _rgb([c * factor for c in colour])


def _mix(a: RGB, b: RGB, t: float) -> RGB:
    return _rgb([x + (y - x) * t for x, y in zip(a, b)])


def _distance(a: RGB, b: RGB) -> int:
    return sum(abs(x - y) for x, y in zip(a, b))


def _hsv(h: float, s: float, v: float) -> RGB:
    return _rgb([c * 255 for c in colorsys.hsv_to_rgb(h, s, v)])


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _tar_bytes(members: dict[str, bytes]) -> bytes:
    """An uncompressed tar of `members`, sorted by name, with fixed headers (reproducible)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(members):
            data = members[name]
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# Faces


@dataclass(frozen=True)
class _Identity:
    """What is fixed for one person: the identity-level labels and the drawing parameters."""

    celeba_id: int
    split: int  # 0 train, 1 val, 2 test
    labels: dict[str, bool]  # every attribute except the per-image ones
    skin: RGB
    hair: RGB | None  # None when bald
    clothes: RGB
    tie: RGB
    face_w: float
    face_h: float


_PER_IMAGE_LABELS = ("Smiling", "Mouth_Slightly_Open", "Wearing_Hat")


def _make_identity(seed: int, index: int, celeba_id: int, split: int) -> _Identity:
    rng = np.random.default_rng([seed, _STREAM_IDENTITY, index])
    labels = {name: False for name in CELEBA_ATTRIBUTES if name not in _PER_IMAGE_LABELS}
    male = _chance(rng, 0.45)
    young = _chance(rng, 0.75)
    labels["Male"] = male
    labels["Young"] = young
    labels["Bald"] = male and not young and _chance(rng, 0.35)

    hair: RGB | None = None
    if not labels["Bald"]:
        weights = (3, 2, 3, 0.5) if young else (2, 1, 2, 3)
        colour_label = _pick(rng, _HAIR_LABELS, weights)
        labels[colour_label] = True
        hair = _jitter(rng, _HAIR_RGB[colour_label], 10)
        texture = _pick(rng, ("Wavy_Hair", "Straight_Hair", None), (0.35, 0.35, 0.3))
        if texture:
            labels[texture] = True
        labels["Bangs"] = _chance(rng, 0.25)
        labels["Receding_Hairline"] = male and _chance(rng, 0.2)

    labels["Pale_Skin"] = _chance(rng, 0.15)
    if labels["Pale_Skin"]:
        skin = _jitter(rng, _PALE_SKIN, 4)
    else:
        skin = _jitter(rng, _mix(_SKIN_LIGHT, _SKIN_DARK, float(rng.uniform(0.0, 1.0))), 6)

    face_w = float(rng.uniform(76, 98))
    face_h = float(rng.uniform(100, 124))
    labels["Chubby"] = face_w >= 92
    labels["Oval_Face"] = face_h / face_w >= 1.3
    labels["Double_Chin"] = labels["Chubby"] and _chance(rng, 0.4)

    labels["Eyeglasses"] = _chance(rng, 0.2)
    labels["Bushy_Eyebrows"] = _chance(rng, 0.2)
    labels["Arched_Eyebrows"] = not male and _chance(rng, 0.4)
    labels["Narrow_Eyes"] = _chance(rng, 0.12)
    labels["Bags_Under_Eyes"] = _chance(rng, 0.2 if young else 0.5)
    labels["Big_Nose"] = _chance(rng, 0.25)
    labels["Pointy_Nose"] = not labels["Big_Nose"] and _chance(rng, 0.3)
    labels["Big_Lips"] = _chance(rng, 0.25)
    labels["High_Cheekbones"] = _chance(rng, 0.45)
    labels["Rosy_Cheeks"] = _chance(rng, 0.1)
    labels["Attractive"] = _chance(rng, 0.5)
    labels["Blurry"] = _chance(rng, 0.08)

    beard = male and _chance(rng, 0.3)
    labels["No_Beard"] = not beard
    labels["Mustache"] = male and _chance(rng, 0.25)
    labels["Goatee"] = male and not beard and _chance(rng, 0.2)
    labels["5_o_Clock_Shadow"] = male and not beard and _chance(rng, 0.25)
    labels["Sideburns"] = male and _chance(rng, 0.15)

    labels["Wearing_Lipstick"] = not male and _chance(rng, 0.55)
    labels["Heavy_Makeup"] = labels["Wearing_Lipstick"] and _chance(rng, 0.6)
    labels["Wearing_Earrings"] = _chance(rng, 0.05 if male else 0.45)
    labels["Wearing_Necklace"] = not male and _chance(rng, 0.2)
    labels["Wearing_Necktie"] = male and _chance(rng, 0.2)

    clothes = _hsv(float(rng.uniform(0, 1)), float(rng.uniform(0.2, 0.7)), float(rng.uniform(0.25, 0.8)))
    tie = _hsv(float(rng.uniform(0, 1)), 0.8, 0.6)
    return _Identity(celeba_id, split, labels, skin, hair, clothes, tie, face_w, face_h)


def _background(rng: np.random.Generator, avoid: Sequence[RGB]) -> RGB:
    """A random colour far (L1 > 150) from every colour in `avoid`, with a deterministic fallback."""
    colour = (40, 90, 200)
    for _ in range(64):
        hue, sat, val = rng.uniform(0, 1), rng.uniform(0.35, 0.9), rng.uniform(0.45, 0.95)
        colour = _hsv(float(hue), float(sat), float(val))
        if all(_distance(colour, other) > 150 for other in avoid):
            return colour
    return colour


def _draw_face(person: _Identity, image_labels: dict[str, bool], rng: np.random.Generator) -> Image.Image:
    """Draw one image of `person`; `image_labels` holds the per-image labels."""
    width, height = CELEBA_IMAGE_SIZE
    labels = {**person.labels, **image_labels}
    hat_colour = _hsv(float(rng.uniform(0, 1)), 0.6, 0.55)
    avoid = [person.skin, person.clothes] + ([person.hair] if person.hair else [])
    if labels["Wearing_Hat"]:
        avoid.append(hat_colour)
    bg = _background(rng, avoid)

    # A near-uniform background: the colour with a faint vertical ramp.
    ramp = np.linspace(-8, 8, height)[:, None, None]
    pixels = np.clip(np.asarray(bg, dtype=float)[None, None, :] + ramp, 0, 255)
    canvas = np.broadcast_to(pixels, (height, width, 3)).astype(np.uint8)
    image = Image.fromarray(np.ascontiguousarray(canvas), "RGB")
    draw = ImageDraw.Draw(image)

    s = float(rng.uniform(0.94, 1.06))
    cx = width / 2 + float(rng.uniform(-6, 6))
    cy = 112 + float(rng.uniform(-6, 6))
    fw, fh = person.face_w * s, person.face_h * s
    left, right, top, bottom = cx - fw / 2, cx + fw / 2, cy - fh / 2, cy + fh / 2
    hair = person.hair
    facial_hair = hair if hair is not None else _FACIAL_HAIR_IF_BALD
    shade = _scale(person.skin, 0.78)

    # Hair behind the head: long for women, a short cap for men.
    if hair is not None:
        if labels["Male"]:
            draw.ellipse((left - 5, top - 9, right + 5, cy + fh * 0.15), fill=hair)
        else:
            draw.rounded_rectangle((left - 15, top - 12, right + 15, bottom + 28), radius=38, fill=hair)

    # Shoulders, neck, necklace, tie.
    draw.ellipse((cx - 88, 188, cx + 88, 330), fill=person.clothes)
    draw.rectangle((cx - fw * 0.22, bottom - 20, cx + fw * 0.22, 196), fill=shade)
    if labels["Wearing_Necklace"]:
        draw.arc((cx - fw * 0.3, bottom - 12, cx + fw * 0.3, 200), 20, 160, fill=_GOLD, width=3)
    if labels["Wearing_Necktie"]:
        tie = [(cx - 6, 194), (cx + 6, 194), (cx + 10, height), (cx - 10, height)]
        draw.polygon(tie, fill=person.tie)

    # Ears, face.
    ear_y = cy - fh * 0.05
    draw.ellipse((left - 7, ear_y, left + 9, ear_y + 24), fill=shade)
    draw.ellipse((right - 9, ear_y, right + 7, ear_y + 24), fill=shade)
    draw.ellipse((left, top, right, bottom), fill=person.skin)
    if labels["Wearing_Earrings"]:
        for x in (left - 1, right + 1):
            draw.ellipse((x - 3, ear_y + 24, x + 3, ear_y + 30), fill=_GOLD)
    if labels["Rosy_Cheeks"]:
        for x in (cx - fw * 0.27, cx + fw * 0.27):
            draw.ellipse((x - 8, cy + fh * 0.06, x + 8, cy + fh * 0.06 + 12), fill=(232, 128, 128))

    # Facial hair, then the mouth on top of it.
    mouth_y, mouth_w = cy + fh * 0.27, fw * 0.17
    if not labels["No_Beard"]:
        draw.chord((left + 2, cy - fh * 0.12, right - 2, bottom + 1), 0, 180, fill=facial_hair)
    if labels["Goatee"]:
        draw.ellipse((cx - mouth_w * 0.5, mouth_y + 6, cx + mouth_w * 0.5, bottom - 1), fill=facial_hair)
    if labels["Mustache"]:
        box = (cx - mouth_w, mouth_y - 10, cx + mouth_w, mouth_y - 4)
        draw.rounded_rectangle(box, radius=3, fill=facial_hair)
    lips = _LIPSTICK if labels["Wearing_Lipstick"] else _mix(person.skin, (150, 40, 50), 0.5)
    lip_width = 5 if labels["Big_Lips"] else 3
    if labels["Mouth_Slightly_Open"]:
        if labels["Smiling"]:
            box = (cx - mouth_w, mouth_y - mouth_w * 0.45, cx + mouth_w, mouth_y + mouth_w * 0.75)
            draw.chord(box, 0, 180, fill=(70, 20, 24), outline=lips, width=lip_width)
        else:
            half = mouth_w * 0.6
            box = (cx - half, mouth_y - mouth_w * 0.25, cx + half, mouth_y + mouth_w * 0.4)
            draw.ellipse(box, fill=(70, 20, 24), outline=lips, width=lip_width)
    elif labels["Smiling"]:
        box = (cx - mouth_w, mouth_y - mouth_w * 0.7, cx + mouth_w, mouth_y + mouth_w * 0.45)
        draw.arc(box, 15, 165, fill=lips, width=lip_width)
    else:
        draw.line((cx - mouth_w * 0.8, mouth_y, cx + mouth_w * 0.8, mouth_y), fill=lips, width=lip_width)

    # Nose.
    eye_y = cy - fh * 0.08
    nose_w = fw * (0.09 if labels["Big_Nose"] else 0.055)
    nose_y = cy + fh * 0.13
    draw.line([(cx, eye_y + 6), (cx - nose_w, nose_y), (cx + nose_w, nose_y)], fill=shade, width=2)

    # Eyes, brows, glasses.
    eye_rx = fw * 0.075
    eye_ry = eye_rx * (0.32 if labels["Narrow_Eyes"] else 0.62)
    brow_colour = _scale(facial_hair, 0.7)
    for ex in (cx - fw * 0.2, cx + fw * 0.2):
        draw.ellipse((ex - eye_rx, eye_y - eye_ry, ex + eye_rx, eye_y + eye_ry), fill=(245, 245, 240))
        pr = min(eye_rx * 0.45, eye_ry)
        draw.ellipse((ex - pr, eye_y - pr, ex + pr, eye_y + pr), fill=(40, 30, 25))
        brow_y = eye_y - fh * 0.09
        draw.line((ex - eye_rx * 1.2, brow_y, ex + eye_rx * 1.2, brow_y), fill=brow_colour,
                  width=5 if labels["Bushy_Eyebrows"] else 2)
        if labels["Eyeglasses"]:
            lens = (ex - eye_rx * 1.6, eye_y - eye_rx * 1.25, ex + eye_rx * 1.6, eye_y + eye_rx * 1.25)
            draw.ellipse(lens, outline=_DARK, width=2)
    if labels["Eyeglasses"]:
        bridge = (cx - fw * 0.2 + eye_rx * 1.6, eye_y, cx + fw * 0.2 - eye_rx * 1.6, eye_y)
        draw.line(bridge, fill=_DARK, width=2)

    # Bangs over the forehead, then the hat over everything.
    if hair is not None and labels["Bangs"]:
        draw.chord((left + 1, top - 2, right - 1, top + fh * 0.46), 180, 360, fill=hair)
    if labels["Wearing_Hat"]:
        draw.rectangle((left + 6, top - 30, right - 6, top + fh * 0.1), fill=hat_colour)
        brim = (left - 16, top + fh * 0.05, right + 16, top + fh * 0.17)
        draw.ellipse(brim, fill=_scale(hat_colour, 0.8))

    if labels["Blurry"]:
        image = image.filter(ImageFilter.GaussianBlur(2.0))
    return image


def _image_labels(rng: np.random.Generator) -> dict[str, bool]:
    return {
        "Smiling": _chance(rng, 0.5),
        "Mouth_Slightly_Open": _chance(rng, 0.45),
        "Wearing_Hat": _chance(rng, 0.2),
    }


def _corrupt_jpeg(rng: np.random.Generator) -> bytes:
    """Bytes that start like a JPEG (SOI + APP0 marker) and then are noise: undecodable."""
    size = int(rng.integers(512, 4096))
    return b"\xff\xd8\xff\xe0" + rng.integers(0, 256, size=size, dtype=np.uint8).tobytes()


def _splits(n: int) -> list[int]:
    """The split of identity 0..n-1: mostly train (0), ~10% val (1) and ~10% test (2), last ones."""
    if n < 3:
        return [0] * n
    held_out = max(1, round(0.1 * n))
    return [0] * (n - 2 * held_out) + [1] * held_out + [2] * held_out


def _attr_row(name: str, labels: dict[str, bool]) -> str:
    # Like the real file: each value right-aligned in width 2 after one space ("-1" / " 1").
    return name + "".join(f" {1 if labels[a] else -1:>2}" for a in CELEBA_ATTRIBUTES)


def _write_celeba(
    root: Path, *, identities: int, images_per_identity: int, corrupt: int, seed: int
) -> tuple[int, int]:
    """Write the CelebA part; returns (real images, corrupt files)."""
    image_dir = root / "img_align_celeba"
    image_dir.mkdir(parents=True, exist_ok=True)

    layout = np.random.default_rng([seed, _STREAM_LAYOUT])
    ids = (layout.choice(MAX_CELEBA_IDENTITY, size=identities, replace=False) + 1).tolist()
    splits = _splits(identities)
    people = [_make_identity(seed, k, int(ids[k]), splits[k]) for k in range(identities)]

    # (identity index, image index within identity) per file number, in split order and
    # shuffled within each split, like the real file numbering.
    order: list[tuple[int, int]] = []
    for split in (0, 1, 2):
        members = [k for k in range(identities) if splits[k] == split]
        slots = [(k, j) for k in members for j in range(images_per_identity)]
        order += [slots[i] for i in layout.permutation(len(slots))]

    identity_lines: list[str] = []
    attr_lines: list[str] = []
    partition_lines: list[str] = []

    def record(filename: str, person: _Identity, labels: dict[str, bool]) -> None:
        identity_lines.append(f"{filename} {person.celeba_id}")
        attr_lines.append(_attr_row(filename, labels))
        partition_lines.append(f"{filename} {person.split}")

    for number, (k, j) in enumerate(order, start=1):
        person = people[k]
        rng = np.random.default_rng([seed, _STREAM_IMAGE, k, j])
        image_labels = _image_labels(rng)
        filename = f"{number:06d}.jpg"
        write_atomic(image_dir / filename, _jpeg(_draw_face(person, image_labels, rng)))
        record(filename, person, {**person.labels, **image_labels})

    for c in range(corrupt):
        number = len(order) + 1 + c
        rng = np.random.default_rng([seed, _STREAM_CORRUPT, c])
        person = people[c % identities]
        filename = f"{number:06d}.jpg"
        write_atomic(image_dir / filename, _corrupt_jpeg(rng))
        record(filename, person, {**person.labels, **_image_labels(rng)})

    total = len(order) + corrupt
    header = [str(total), " ".join(CELEBA_ATTRIBUTES) + " "]  # the original's trailing space
    write_atomic(root / "identity_CelebA.txt", ("\n".join(identity_lines) + "\n").encode())
    write_atomic(root / "list_attr_celeba.txt", ("\n".join(header + attr_lines) + "\n").encode())
    write_atomic(root / "list_eval_partition.txt", ("\n".join(partition_lines) + "\n").encode())
    return len(order), corrupt


# --------------------------------------------------------------------------------------------
# General scenes


_SKIES: dict[str, RGB] = {
    "blue": (104, 168, 236),
    "gray": (158, 164, 174),
    "orange": (244, 156, 88),
    "purple": (146, 116, 190),
}
_GROUNDS: dict[str, RGB] = {
    "green grass": (72, 148, 60),
    "yellow sand": (224, 200, 132),
    "white snow": (238, 240, 246),
}
_HOUSE_COLOURS: dict[str, RGB] = {
    "red": (196, 48, 40),
    "blue": (58, 88, 196),
    "yellow": (232, 198, 58),
    "white": (236, 234, 228),
    "brown": (128, 84, 50),
}
_NUMBERS = {1: "a", 2: "two", 3: "three"}


def _join_and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _draw_scene(rng: np.random.Generator) -> tuple[Image.Image, str]:
    """A simple landscape and the alt-text that describes it."""
    width, height = GENERAL_IMAGE_SIZE
    sky_name = _pick(rng, list(_SKIES))
    ground_name = _pick(rng, list(_GROUNDS))
    sky = _jitter(rng, _SKIES[sky_name], 8)
    ground = _jitter(rng, _GROUNDS[ground_name], 8)
    horizon = int(rng.integers(104, 136))

    rows = np.arange(height, dtype=float)[:, None]
    sky_rows = np.asarray(sky, float) + (rows / horizon) * 30  # lighter towards the horizon
    ground_rows = np.broadcast_to(np.asarray(ground, float), (height, 3))
    column = np.where(rows < horizon, sky_rows, ground_rows)
    pixels = np.broadcast_to(np.clip(column, 0, 255)[:, None, :], (height, width, 3)).astype(np.uint8)
    image = Image.fromarray(np.ascontiguousarray(pixels), "RGB")
    draw = ImageDraw.Draw(image)

    sun = sky_name != "gray" and _chance(rng, 0.6)
    if sun:
        r = int(rng.integers(10, 20))
        x, y = int(rng.integers(r + 4, width - r - 4)), int(rng.integers(r + 4, horizon - r - 20))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(250, 222, 60))

    houses = int(_pick(rng, [0, 1, 1, 2]))
    trees = int(_pick(rng, [0, 1, 2, 3]))
    house_name = _pick(rng, list(_HOUSE_COLOURS))
    slots = rng.permutation(5)  # five columns of the image, one object each
    slot_w = width / 5
    for i in range(houses + trees):
        x0 = slots[i] * slot_w + float(rng.uniform(4, 10))
        base = horizon + float(rng.uniform(8, 40))
        if i < houses:
            w, h = slot_w - 16, float(rng.uniform(26, 40))
            body = _jitter(rng, _HOUSE_COLOURS[house_name], 8)
            draw.rectangle((x0, base - h, x0 + w, base), fill=body)
            roof = [(x0 - 4, base - h), (x0 + w + 4, base - h), (x0 + w / 2, base - h - 22)]
            draw.polygon(roof, fill=(98, 52, 40))
            draw.rectangle((x0 + w / 2 - 5, base - 16, x0 + w / 2 + 5, base), fill=(70, 44, 30))
            draw.rectangle((x0 + 5, base - h + 6, x0 + 13, base - h + 14), fill=(200, 226, 240))
        else:
            trunk_x = x0 + slot_w / 2 - 8
            crown = _jitter(rng, (40, 112, 44), 20)
            r = float(rng.uniform(14, 22))
            draw.rectangle((trunk_x - 3, base - 26, trunk_x + 3, base), fill=(96, 62, 36))
            draw.ellipse((trunk_x - r, base - 26 - 1.6 * r, trunk_x + r, base - 22), fill=crown)

    things = []
    if houses:
        things.append(f"{_NUMBERS[houses]} {house_name} house" + ("s" if houses > 1 else ""))
    if trees:
        things.append(f"{_NUMBERS[trees]} tree" + ("s" if trees > 1 else ""))
    subject = f"{_join_and(things)} on {ground_name}" if things else ground_name
    article = "an" if sky_name[0] in "aeiou" else "a"
    caption = f"{subject} under {article} {sky_name} sky" + (" with the sun" if sun else "")
    return image, caption


def _write_general(root: Path, *, shards: int, per_shard: int, seed: int) -> int:
    """Write img2dataset-style shards 000000.tar ...; returns the number of samples."""
    root.mkdir(parents=True, exist_ok=True)
    width, height = GENERAL_IMAGE_SIZE
    for shard in range(shards):
        members: dict[str, bytes] = {}
        for i in range(per_shard):
            key = f"{shard * _KEY_SAMPLES_PER_SHARD + i:0{_KEY_DIGITS}d}"
            image, caption = _draw_scene(np.random.default_rng([seed, _STREAM_GENERAL, shard, i]))
            meta = {
                "key": key,
                "caption": caption,
                "url": f"https://example.invalid/{key}.jpg",
                "status": "success",
                "error_message": None,
                "width": width,
                "height": height,
                "original_width": width,
                "original_height": height,
            }
            members[f"{key}.jpg"] = _jpeg(image)
            members[f"{key}.txt"] = caption.encode("utf-8")
            members[f"{key}.json"] = json.dumps(meta).encode("utf-8")
        write_atomic(root / f"{shard:0{_SHARD_DIGITS}d}.tar", _tar_bytes(members))
    return shards * per_shard


def _draw_animal(rng: np.random.Generator) -> Image.Image:
    """A four-legged cartoon animal (body, head, ear, tail, legs) in one coat colour on a plain
    background far from it: one object per image, as in LSUN's object categories."""
    width, height = LSUN_IMAGE_SIZE
    coat = _hsv(float(rng.uniform(0.02, 0.12)), float(rng.uniform(0.3, 0.8)), float(rng.uniform(0.25, 0.9)))
    background = _background(rng, [coat])
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    scale = float(rng.uniform(0.7, 1.0))
    cx, cy = width * float(rng.uniform(0.4, 0.6)), height * float(rng.uniform(0.5, 0.6))
    bw, bh = 46 * scale, 22 * scale
    facing = 1 if _chance(rng, 0.5) else -1
    for dx in (-0.7, -0.35, 0.35, 0.7):  # legs
        x = cx + dx * bw
        draw.rectangle((x - 4 * scale, cy, x + 4 * scale, cy + bh + 18 * scale), fill=_scale(coat, 0.85))
    draw.ellipse((cx - bw, cy - bh, cx + bw, cy + bh), fill=coat)
    hx, hy, hr = cx + facing * bw * 1.05, cy - bh * 1.1, 16 * scale
    draw.ellipse((hx - hr, hy - hr, hx + hr, hy + hr), fill=coat)
    draw.polygon([(hx - facing * 4, hy - hr + 2), (hx - facing * 14, hy - hr - 14 * scale), (hx - facing * 16, hy - 2)],
                 fill=_scale(coat, 0.7))  # ear
    draw.ellipse((hx + facing * 6 - 2, hy - 5, hx + facing * 6 + 2, hy - 1), fill=_DARK)  # eye
    tx = cx - facing * bw
    draw.line((tx, cy - 4, tx - facing * 18 * scale, cy - bh - 12 * scale), fill=coat, width=max(2, int(5 * scale)))
    return image


def _write_lsun(folder: Path, *, records: int, seed: int) -> int:
    """An LSUN category folder: data.mdb with `records` images (WebP, every fourth JPEG) and
    LSUN_BAD_RECORDS undecodable values, keyed by 40 hex digits; written in a temporary folder
    and renamed into place. Returns the number of decodable images."""
    import hashlib

    import lmdb

    rows: dict[bytes, bytes] = {}
    for i in range(records):
        image = _draw_animal(np.random.default_rng([seed, _STREAM_LSUN, i]))
        buffer = io.BytesIO()
        if i % 4 == 3:
            image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        else:
            image.save(buffer, format="WEBP", quality=80, method=4)
        rows[hashlib.sha1(f"demo-lsun-{seed}-{i}".encode()).hexdigest().encode("ascii")] = buffer.getvalue()
    for j in range(LSUN_BAD_RECORDS):
        key = hashlib.sha1(f"demo-lsun-{seed}-bad-{j}".encode()).hexdigest().encode("ascii")
        rows[key] = b"RIFF\x00\x00\x00\x00WEBPVP8 not an image"  # a WebP header and nothing after it
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    env = lmdb.open(str(tmp), map_size=max(1 << 20, 4 * sum(len(v) + len(k) for k, v in rows.items())), subdir=True)
    with env.begin(write=True) as txn:
        for key in sorted(rows):
            txn.put(key, rows[key])
    env.sync()
    env.close()
    os.replace(tmp, folder)
    return records


# --------------------------------------------------------------------------------------------
# Entry point


def write_demo_data(
    out_dir: PathLike,
    *,
    identities: int = 8,
    images_per_identity: int = 4,
    general_shards: int = 2,
    general_per_shard: int = 8,
    seed: int = 0,
    corrupt: int = 0,
    lsun_records: int = 12,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the synthetic dataset under `out_dir` (see the module docstring) and describe it.

    Args:
        out_dir: the folder to write into; created if missing.
        identities: number of people (1..10177).
        images_per_identity: images drawn per person (>= 1).
        general_shards: number of general-domain tars (0 for none).
        general_per_shard: samples per general tar (1..10000, img2dataset's key width).
        seed: everything written is a function of the arguments; same seed, same bytes.
        corrupt: number of undecodable "JPEG" files added after the real images, each with
            identity, attribute and partition rows.
        lsun_records: images in the LSUN-layout database `out_dir/lsun/dog` (0 for none); one
            undecodable record is added to them.
        overwrite: when `out_dir/celeba`, `out_dir/general` or `out_dir/lsun` already exist and are not empty,
            remove them first; without it that is an error (stale files from a larger run
            would otherwise mix with the new ones).

    Returns:
        {"celeba_dir", "general_dir", "general_pattern" (a brace pattern for webdataset, None
        when general_shards == 0), "images" (decodable face images), "identities",
        "general_samples", "corrupt", "lsun_dir" (None when lsun_records == 0), "lsun_records",
        "lsun_bad_records"}.
    """
    _check_int("identities", identities, 1, MAX_CELEBA_IDENTITY)
    _check_int("images_per_identity", images_per_identity, 1, None)
    _check_int("general_shards", general_shards, 0, 99_999)  # 9-digit keys
    _check_int("general_per_shard", general_per_shard, 1, _KEY_SAMPLES_PER_SHARD)
    _check_int("corrupt", corrupt, 0, None)
    _check_int("lsun_records", lsun_records, 0, 1_000_000)
    _check_int("seed", seed, 0, None)
    if identities * images_per_identity + corrupt > 999_999:
        raise ValueError("at most 999,999 CelebA files fit CelebA's 6-digit file names")

    out = Path(out_dir)
    celeba_dir, general_dir, lsun_root = out / "celeba", out / "general", out / "lsun"
    for folder in (celeba_dir, general_dir, lsun_root):
        if folder.exists() and any(folder.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{folder} is not empty; pass overwrite=True to replace it")
            shutil.rmtree(folder)

    images, n_corrupt = _write_celeba(
        celeba_dir,
        identities=identities,
        images_per_identity=images_per_identity,
        corrupt=corrupt,
        seed=seed,
    )
    general_samples = 0
    pattern = None
    if general_shards:
        general_samples = _write_general(
            general_dir, shards=general_shards, per_shard=general_per_shard, seed=seed
        )
        last = f"{general_shards - 1:0{_SHARD_DIGITS}d}"
        pattern = f"{general_dir}/{{{'0' * _SHARD_DIGITS}..{last}}}.tar"
    lsun_dir = lsun_root / "dog"
    if lsun_records:
        _write_lsun(lsun_dir, records=lsun_records, seed=seed)
    return {
        "lsun_dir": str(lsun_dir) if lsun_records else None,
        "lsun_records": lsun_records,
        "lsun_bad_records": LSUN_BAD_RECORDS if lsun_records else 0,
        "celeba_dir": str(celeba_dir),
        "general_dir": str(general_dir) if general_shards else None,
        "general_pattern": pattern,
        "images": images,
        "identities": identities,
        "general_samples": general_samples,
        "corrupt": n_corrupt,
    }


def _check_int(name: str, value: int, low: int, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name} must be {bound}, got {value}")
