"""decode_image on each kind of input, directly: mode, size, orientation, colours, pass-through,
downscaling, and a readable, stable reason for everything it rejects."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from apache_beam.pvalue import TaggedOutput
from PIL import Image, ImageFile

import prep.transforms.decode as decode_module
from bad_inputs import (
    BLUE,
    GREEN,
    GREY,
    RED,
    UPRIGHT_PROBES,
    WHITE,
    YELLOW,
    H,
    W,
    animated,
    cmyk_jpeg,
    exif_rotated_jpeg,
    grey16_png,
    jpeg_with_garbage_in_scan,
    jpeg_with_zeroed_tail,
    palette_png_with_transparency,
    plain_jpeg,
    png_header_only,
    rgba_png,
    truncated,
)
from prep.schemas.records import Sample
from prep.transforms.common import DEAD
from prep.transforms.decode import (
    DecodeImages,
    DecodeParams,
    ImageRejected,
    decode_image,
    jpeg_structure_problem,
    load_rgb,
)

TOLERANCE = 24
LEFT, RIGHT = (0.2, 0.5), (0.8, 0.5)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def textured(size=(W, H), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def decoded(raw: bytes, **params) -> Image.Image:
    jpeg, width, height = decode_image(raw, DecodeParams(**params))
    img = Image.open(io.BytesIO(jpeg))
    assert img.format == "JPEG" and img.mode == "RGB"
    assert img.size == (width, height)
    assert img.getexif().get(0x0112, 1) == 1, "the output still carries an EXIF rotation"
    return img


def assert_pixels(img: Image.Image, probes) -> None:
    arr = np.asarray(img).astype(int)
    for fx, fy, colour in probes:
        x, y = int(fx * img.width), int(fy * img.height)
        assert np.abs(arr[y, x] - np.array(colour)).max() <= TOLERANCE, (x, y, tuple(arr[y, x]), colour)


def rejected(raw: bytes, **params) -> str:
    with pytest.raises(ImageRejected) as info:
        decode_image(raw, DecodeParams(**params))
    return str(info.value)


# --------------------------------------------------------------------------------------
# Accepted kinds
# --------------------------------------------------------------------------------------


def test_rgb_jpeg_passes_through_byte_for_byte():
    raw = plain_jpeg(RED, GREEN)
    assert decode_image(raw) == (raw, W, H)


def test_rgb_jpeg_with_orientation_1_passes_through():
    raw = exif_rotated_jpeg(1)
    assert decode_image(raw) == (raw, W, H)
    assert_pixels(load_rgb(raw), UPRIGHT_PROBES)


@pytest.mark.parametrize("orientation", range(2, 9))
def test_every_exif_orientation_comes_out_upright(orientation):
    raw = exif_rotated_jpeg(orientation)
    stored = Image.open(io.BytesIO(raw))
    assert stored.size == ((H, W) if orientation >= 5 else (W, H))
    img = decoded(raw)
    assert img.size == (W, H)
    assert_pixels(img, UPRIGHT_PROBES)
    assert decode_image(raw)[0] != raw  # re-encoded upright, without the tag


def test_cmyk_jpeg_becomes_rgb():
    img = decoded(cmyk_jpeg())
    assert img.size == (W, H)
    assert_pixels(img, [(*LEFT, RED), (*RIGHT, BLUE)])


def test_greyscale_jpeg_becomes_rgb():
    raw = encode(Image.new("L", (W, H), 100), "JPEG", quality=95)
    assert_pixels(decoded(raw), [(*LEFT, (100, 100, 100))])


def test_16_bit_greyscale_png_is_scaled_not_clipped():
    img = decoded(grey16_png())
    assert_pixels(img, [(*LEFT, (64, 64, 64)), (*RIGHT, (191, 191, 191))])


def test_palette_png_transparency_is_composited_on_white():
    assert_pixels(decoded(palette_png_with_transparency()), [(*LEFT, WHITE), (*RIGHT, BLUE)])


def test_rgba_png_is_composited_on_white():
    assert_pixels(decoded(rgba_png()), [(*LEFT, WHITE), (*RIGHT, BLUE)])


def test_half_transparent_la_png_is_composited_on_white():
    img = Image.new("LA", (W, H), (0, 128))  # black at half opacity over white
    assert_pixels(decoded(encode(img, "PNG")), [(*LEFT, (127, 127, 127))])


def test_rgb_png_colour_key_transparency_is_composited_on_white():
    img = Image.new("RGB", (W, H), GREEN)
    img.paste(BLUE, (W // 2, 0, W, H))
    assert_pixels(decoded(encode(img, "PNG", transparency=GREEN)), [(*LEFT, WHITE), (*RIGHT, BLUE)])


def test_png_with_jpeg_name_is_read_by_content():
    img = Image.new("RGB", (W, H), RED)
    assert_pixels(decoded(encode(img, "PNG")), [(*LEFT, RED)])


@pytest.mark.parametrize("fmt, first, second", [("GIF", RED, GREEN), ("WEBP", BLUE, YELLOW)])
def test_animations_keep_their_first_frame(fmt, first, second):
    raw = animated(fmt, first, second)
    assert Image.open(io.BytesIO(raw)).n_frames == 2
    img = decoded(raw)
    assert img.size == (W, H)
    assert_pixels(img, [(*LEFT, first), (*RIGHT, first)])


@pytest.mark.parametrize(
    "size, max_side, expected",
    [((200, 120), 64, (64, 38)), ((120, 200), 64, (38, 64)), ((200, 120), 200, (200, 120)), ((50, 40), 64, (50, 40))],
)
def test_max_side_downscales_keeping_the_aspect_ratio(size, max_side, expected):
    raw = encode(Image.new("RGB", size, BLUE), "JPEG", quality=95)
    jpeg, width, height = decode_image(raw, DecodeParams(max_side=max_side))
    assert (width, height) == expected == Image.open(io.BytesIO(jpeg)).size
    assert (jpeg == raw) == (expected == size)  # only an unchanged image keeps its bytes


def test_max_side_applies_after_the_exif_rotation():
    img = decoded(exif_rotated_jpeg(6), max_side=32)
    assert img.size == (32, 24)
    assert_pixels(img, UPRIGHT_PROBES)


def test_jpeg_structure_accepts_what_real_encoders_write():
    base = textured((160, 120))
    exif = Image.Exif()
    exif[0x0112] = 1
    variants = {
        "baseline": encode(base, "JPEG", quality=90),
        "progressive": encode(base, "JPEG", progressive=True),
        "optimized": encode(base, "JPEG", optimize=True),
        "restart markers": encode(base, "JPEG", restart_marker_blocks=1),
        "exif and icc": encode(base, "JPEG", exif=exif, icc_profile=b"\0" * 70_000),
        "greyscale": encode(base.convert("L"), "JPEG"),
        "cmyk": encode(base.convert("CMYK"), "JPEG"),
        "trailer after EOI": encode(base, "JPEG") + b"camera trailer \xff\x12\x00",
        "mpo": encode(base, "MPO", save_all=True, append_images=[base]),
    }
    for name, raw in variants.items():
        assert jpeg_structure_problem(raw) is None, name
        decoded(raw)


def test_the_real_celeba_images_decode(tmp_path):
    folder = Path(__file__).resolve().parents[2] / "shared" / "data" / "celeba" / "img_align_celeba"
    paths = sorted(folder.glob("*.jpg"))
    if not paths:
        pytest.skip(f"no real CelebA images under {folder}")
    for path in paths:
        raw = path.read_bytes()
        assert jpeg_structure_problem(raw) is None, path
        decoded(raw)


# --------------------------------------------------------------------------------------
# Rejected kinds: a reason class, then the details
# --------------------------------------------------------------------------------------

_TEXTURED_JPEG = encode(textured(), "JPEG", quality=95)
_TEXTURED_PNG = encode(textured(), "PNG")

_CORRUPT = "truncated or corrupt image: "
_BOMB = "(decompression bomb guard, rejected from the header)"
REJECTED = {  # kind: (bytes, how the reason starts)
    "empty": (b"", "empty file: 0 bytes"),
    "html page": (
        b"<html>404 Not Found</html>",
        "not a decodable image: no image format recognised; the file starts with b'<html>404 Not Found<'",
    ),
    "jpeg header garbage": (b"\xff\xd8\xff\xe0" + bytes(range(256)), "not a decodable image: "),
    "garbage in scan": (
        jpeg_with_garbage_in_scan(_TEXTURED_JPEG),
        _CORRUPT + "JPEG has an invalid marker 0xFF05 inside its scan data",
    ),
    "zero-filled tail": (
        jpeg_with_zeroed_tail(_TEXTURED_JPEG),
        _CORRUPT + "JPEG has no end-of-image marker after its scan data",
    ),
    "truncated jpeg": (truncated(_TEXTURED_JPEG), _CORRUPT + "JPEG has no end-of-image marker"),
    "jpeg without its last 2 bytes": (_TEXTURED_JPEG[:-2], _CORRUPT + "JPEG has no end-of-image marker"),
    "truncated png": (
        truncated(_TEXTURED_PNG, 0.6),
        _CORRUPT + "the PNG data does not decode (OSError: image file is truncated",
    ),
    "1x1": (encode(Image.new("RGB", (1, 1)), "PNG"), "too small: 1x1 (min side 16)"),
    "15x100": (encode(Image.new("RGB", (15, 100)), "PNG"), "too small: 15x100 (min side 16)"),
    "20000x50": (encode(Image.new("RGB", (20_000, 50)), "PNG"), "extreme aspect ratio: 400.0 (20000x50, max 10.0)"),
    "over our limit": (
        png_header_only(10_000, 10_000),
        f"too many pixels: 10000x10000 = 100000000 pixels > limit 64000000 {_BOMB}",
    ),
    "over pillow's guard": (
        png_header_only(100_000, 100_000),
        f"too many pixels: 10000000000 pixels > limit 64000000 {_BOMB}",
    ),
}


@pytest.mark.parametrize("kind", REJECTED)
def test_rejected_with_a_stable_readable_reason(kind):
    raw, reason_start = REJECTED[kind]
    reason = rejected(raw)
    assert reason.startswith(reason_start), reason
    assert rejected(raw) == reason  # no object addresses or other run-dependent text
    assert "0x7f" not in reason


def test_truncation_is_caught_even_when_pillow_is_told_to_pad(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    assert rejected(truncated(_TEXTURED_JPEG)).startswith("truncated or corrupt image: JPEG")
    DecodeImages().setup()  # what every worker does first
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert rejected(truncated(_TEXTURED_PNG, 0.6)).startswith("truncated or corrupt image: the PNG data")


def test_size_rules_use_the_params():
    raw = encode(Image.new("RGB", (40, 30), RED), "PNG")
    assert rejected(raw, min_side=32) == "too small: 40x30 (min side 32)"
    assert rejected(raw, max_pixels=1000).startswith("too many pixels: 40x30 = 1200 pixels > limit 1000")
    wide = encode(Image.new("RGB", (100, 30)), "PNG")
    assert rejected(wide, max_aspect=3.0) == "extreme aspect ratio: 3.3 (100x30, max 3.0)"


def test_an_unexpected_failure_after_decoding_is_a_rejection_not_a_crash(monkeypatch):
    def broken(img):
        raise KeyError("odd mode")

    monkeypatch.setattr(decode_module, "_to_rgb", broken)
    assert rejected(encode(Image.new("L", (W, H)), "PNG")).startswith("cannot convert image: PNG in mode L: KeyError")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
def test_a_bomb_is_rejected_without_allocating_its_pixels():
    """In a fresh process, with its peak RSS (VmHWM) reset just before: rejecting a
    100000x100000 header and a real 10000x10000 bomb (290 KB that decode to 300 MB) costs no
    pixel memory. The control, the same bomb decoded with every guard off, shows that the
    measure would see it."""
    script = textwrap.dedent(
        f"""
        import io, json, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
        from bad_inputs import png_header_only, png_zero_bomb
        from prep.transforms.decode import DecodeParams, ImageRejected, decode_image
        from PIL import Image

        def status_kib(field):
            with open("/proc/self/status") as f:
                return int(f.read().split(field + ":")[1].split()[0])

        def reset_peak():
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS

        bombs = [png_header_only(100_000, 100_000), png_zero_bomb(10_000, 10_000)]
        warm = io.BytesIO()
        Image.new("RGB", (32, 32)).save(warm, "PNG")
        decode_image(warm.getvalue())  # load the plugins and the encoder first
        Image.MAX_IMAGE_PIXELS = 64_000_000  # as DecodeImages.setup sets it
        reset_peak()
        before = status_kib("VmRSS")
        reasons = []
        for bomb in bombs:
            try:
                decode_image(bomb)
            except ImageRejected as exc:
                reasons.append(str(exc))
        guarded = status_kib("VmHWM") - before
        Image.MAX_IMAGE_PIXELS = None
        reset_peak()
        before = status_kib("VmRSS")
        try:
            decode_image(bombs[1], DecodeParams(max_pixels=10**9))
            control = "decoded"
        except ImageRejected as exc:
            control = str(exc)
        unguarded = status_kib("VmHWM") - before
        print(json.dumps(dict(guarded=guarded, unguarded=unguarded, control=control, reasons=reasons,
                              sizes=[len(b) for b in bombs])))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["sizes"][0] < 200 and report["sizes"][1] < 400_000
    assert [r.split(":")[0] for r in report["reasons"]] == ["too many pixels", "too many pixels"], report
    assert report["guarded"] < 16 * 1024, report
    assert report["control"] == "decoded" and report["unguarded"] > 250 * 1024, report  # the measure sees a decode


# --------------------------------------------------------------------------------------
# The DoFn
# --------------------------------------------------------------------------------------


def test_decode_images_dofn_passes_on_or_dead_letters():
    fn = DecodeImages(DecodeParams())
    fn.setup()
    good = Sample(key="celeba_a", source="celeba", domain="specific", path="/a.jpg", raw=plain_jpeg(RED, GREY))
    (out,) = list(fn.process(good))
    assert isinstance(out, Sample)
    assert (out.raw, out.image_jpeg, out.width, out.height) == (None, good.raw, W, H)

    bad = good.with_(key="celeba_b", path="/b.jpg", raw=b"not an image")
    (letter,) = list(fn.process(bad))
    assert isinstance(letter, TaggedOutput) and letter.tag == DEAD
    assert (letter.value.key, letter.value.stage, letter.value.path) == ("celeba_b", "decode", "/b.jpg")
    assert letter.value.reason.startswith("not a decodable image: ")
