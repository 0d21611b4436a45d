"""The bad-input corpus: every kind of broken, odd or hostile input the pipeline must survive.

`write_bad_corpus(root)` writes, from code (no binary file is committed), the inputs

    root/celeba/img_align_celeba/*           images in CelebA's layout (one per image case)
    root/celeba/identity_CelebA.txt          with a line without an id and one with a word for an id
    root/celeba/list_attr_celeba.txt         40 attributes; one row with the wrong column count
    root/folder/<identity>/<image>           unicode, spaces, glob characters, animations
    root/folder_more/dup/same.jpg            a second folder source that repeats a key of the first
    root/wds/000000.tar .. 000002.tar        img2dataset shards: a key in two tars, a truncated tar

and returns {case name: Expected}: what the pipeline must do with each case -- process it
(into which domain, at what size, with which pixel colours where), dead-letter it (at which
stage, with which reason class), or not count it as an input at all (an annotation row
whose image is not on disk). `corpus_inputs(root)` gives the matching `--input` specs.

Everything is deterministic: the same root gets the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image

from prep.schemas.records import GENERAL, SPECIFIC, make_key
from prep.transforms.attributes import CELEBA_ATTRIBUTES

PROCESSED = "processed"
DEAD_LETTERED = "dead_lettered"
NOT_AN_INPUT = "not_an_input"

W, H = 64, 48  # the size of every ordinary image in the corpus (landscape, so rotations show)
RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 200, 0), (0, 0, 255), (255, 255, 0)
WHITE, GREY = (255, 255, 255), (128, 128, 128)

RGB = tuple[int, int, int]
Probe = tuple[float, float, RGB]  # (x, y) as fractions of the shard image's size, expected colour

# Left half / right half probes.
LEFT, RIGHT = (0.2, 0.5), (0.8, 0.5)


@dataclass(frozen=True)
class Expected:
    """What must become of one input."""

    what: str  # the case in words
    key: str  # the sample key the pipeline gives the input
    outcome: str  # PROCESSED, DEAD_LETTERED or NOT_AN_INPUT
    # Processed: where, how big, with which pixels.
    domain: Optional[str] = None
    size: Optional[tuple[int, int]] = None  # (width, height) in the shard
    identity: Optional[str] = None
    has_attributes: Optional[bool] = None  # specific: attributes read from the file, or None
    text: Optional[str] = None  # general: the caption (the tar's text)
    pixels: tuple[Probe, ...] = ()
    source_sha256: Optional[str] = None  # the shard's jpg must be the input file, byte for byte
    # Dead-lettered: where and why.
    stage: Optional[str] = None
    reason: Optional[str] = None  # the reason class: the text before the first colon
    reason_has: Optional[str] = None  # and a piece of the details
    path_has: Optional[str] = None  # tells apart two inputs with one key (duplicates)
    # The source report must carry this (a missing-on-disk name, a warning).
    missing_name: Optional[str] = None
    warning_has: Optional[str] = None


# --------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _halves(left: RGB, right: RGB, mode: str = "RGB", size: tuple[int, int] = (W, H)) -> Image.Image:
    img = Image.new(mode, size, left)
    img.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return img


def upright_marker_image() -> Image.Image:
    """Grey, a red block top-left and a blue block top-right: each of the 8 EXIF orientations
    moves the pair somewhere else, so a wrong transpose cannot pass for the right one."""
    img = Image.new("RGB", (W, H), GREY)
    img.paste(RED, (0, 0, 24, 20))
    img.paste(BLUE, (40, 0, W, 20))
    return img


UPRIGHT_PROBES: tuple[Probe, ...] = ((0.15, 0.2, RED), (0.85, 0.2, BLUE), (0.5, 0.8, GREY), (0.15, 0.8, GREY))

# EXIF orientation -> the transpose that makes an upright image look like the stored one
# (the inverse of what the decoder must apply).
STORE_FOR_ORIENTATION = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def exif_rotated_jpeg(orientation: int, quality: int = 95) -> bytes:
    """The upright marker image, stored so that only applying `orientation` shows it upright."""
    stored = upright_marker_image()
    transpose = STORE_FOR_ORIENTATION[orientation]
    if transpose is not None:
        stored = stored.transpose(transpose)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(stored, "JPEG", quality=quality, exif=exif)


def plain_jpeg(left: RGB = RED, right: RGB = GREEN, size: tuple[int, int] = (W, H)) -> bytes:
    return _encode(_halves(left, right, size=size), "JPEG", quality=95, subsampling=0)


def cmyk_jpeg() -> bytes:
    """Adobe-style CMYK JPEG: left red (C0 M255 Y255 K0), right blue (C255 M255 Y0 K0)."""
    return _encode(_halves((0, 255, 255, 0), (255, 255, 0, 0), mode="CMYK"), "JPEG", quality=95)


def grey16_png() -> bytes:
    """16-bit greyscale: left 16384 (8-bit 64), right 49152 (8-bit 191)."""
    arr = np.full((H, W), 16384, dtype=np.uint16)
    arr[:, W // 2 :] = 49152
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    return _encode(img, "PNG")


def palette_png_with_transparency() -> bytes:
    """Palette PNG: index 0 (green in the palette) is transparent -> white; index 1 blue."""
    img = Image.new("P", (W, H), 0)
    img.putpalette([0, 255, 0, 0, 0, 255] + [0] * (254 * 3))
    img.paste(1, (W // 2, 0, W, H))
    return _encode(img, "PNG", transparency=0)


def rgba_png() -> bytes:
    """RGBA: left fully transparent red (-> white), right opaque blue."""
    arr = np.zeros((H, W, 4), dtype=np.uint8)
    arr[:, : W // 2] = (255, 0, 0, 0)
    arr[:, W // 2 :] = (0, 0, 255, 255)
    return _encode(Image.fromarray(arr, "RGBA"), "PNG")


def animated(fmt: str, first: RGB, second: RGB) -> bytes:
    frames = [Image.new("RGB", (W, H), first), Image.new("RGB", (W, H), second)]
    extra = {"lossless": True} if fmt == "WEBP" else {}
    return _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **extra)


def _png(width: int, height: int, idat: bytes) -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB pixels, with almost no pixel data: a
    decompression bomb's shape in under 100 bytes."""
    return _png(width, height, zlib.compress(b"\0" * 64))


def png_zero_bomb(width: int, height: int) -> bytes:
    """A real decompression bomb: width x height black RGB pixels, all there, compressed about
    1000:1 (10000x10000: 290 KB on disk, 300 MB decoded). Written a block of rows at a time."""
    compressor = zlib.compressobj(9)
    rows_per_block = max(1, (8 << 20) // (1 + 3 * width))
    block = (b"\0" * (1 + 3 * width)) * rows_per_block  # filter byte 0 + the row's pixels
    parts = [compressor.compress(block) for _ in range(height // rows_per_block)]
    parts.append(compressor.compress(block[: (height % rows_per_block) * (1 + 3 * width)]))
    parts.append(compressor.flush())
    return _png(width, height, b"".join(parts))


def _scan_start(jpeg: bytes) -> int:
    """Offset of the first byte of entropy-coded data (after the SOS header)."""
    sos = jpeg.index(b"\xff\xda")
    return sos + 2 + int.from_bytes(jpeg[sos + 2 : sos + 4], "big")


def jpeg_with_garbage_in_scan(jpeg: bytes) -> bytes:
    """Bytes overwritten inside the scan data, holding an invalid marker (0xFF05)."""
    at = (_scan_start(jpeg) + len(jpeg)) // 2
    garbage = b"\xff\x05" + bytes(range(0x10, 0x30))
    return jpeg[:at] + garbage + jpeg[at + len(garbage) :]


def jpeg_with_zeroed_tail(jpeg: bytes) -> bytes:
    """The second half zero-filled (an interrupted write into a preallocated file): Pillow
    decodes it without an error, grey and smeared below the cut."""
    half = len(jpeg) // 2
    return jpeg[:half] + b"\0" * (len(jpeg) - half)


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    return data[: int(len(data) * keep)]


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _member_offset(tar: bytes, name: str) -> int:
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        return t.getmember(name).offset_data


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------------------

PathLike = Union[str, "os.PathLike[str]"]

CASE_NAMES = (
    # CelebA images
    "plain_rgb_jpeg",
    "plain_rgb_jpeg_same_identity",
    "corrupt_jpeg_header",
    "corrupt_jpeg_scan_data",
    "jpeg_zero_filled_tail",
    "truncated_jpeg",
    "truncated_png",
    "zero_byte_file",
    "text_file_named_jpg",
    "png_named_jpg",
    "cmyk_jpeg",
    "grey16_png",
    "palette_png_transparency",
    "rgba_png",
    "exif_rotated_jpeg",
    "decompression_bomb_100000x100000",
    "over_pixel_limit_10000x10000",
    "image_1x1",
    "image_20000x50",
    # CelebA annotations
    "identity_line_without_id",
    "identity_line_non_numeric_id",
    "no_identity_line",
    "attribute_row_wrong_column_count",
    "annotated_but_missing_on_disk",
    "annotated_dangling_symlink",
    # folder:
    "unicode_and_space_name",
    "unicode_identity_and_name",
    "glob_characters_in_name",
    "animated_gif",
    "animated_webp",
    "same_key_two_folder_sources_first",
    "same_key_two_folder_sources_second",
    # wds:
    "wds_plain_sample",
    "same_key_two_tars_first",
    "same_key_two_tars_second",
    "wds_other_tar_sample",
    "truncated_tar_sample_before_cut",
    "truncated_tar_sample_cut",
    "truncated_tar",
    "empty_tar",
)


def corpus_inputs(root: PathLike) -> list[str]:
    """The `--input` specs that read the whole corpus."""
    root = Path(root)
    return [
        f"celeba:{root / 'celeba'}",
        f"folder:{root / 'folder'}",
        f"folder:{root / 'folder_more'}",
        f"wds:{root / 'wds'}/{{000000..000003}}.tar",
    ]


def write_bad_corpus(root: PathLike) -> dict[str, Expected]:
    """Write the corpus under `root` and return {case name: Expected}."""
    root = Path(root)
    cases: dict[str, Expected] = {}
    cases.update(_write_celeba(root / "celeba"))
    cases.update(_write_folders(root / "folder", root / "folder_more"))
    cases.update(_write_wds(root / "wds"))
    assert tuple(cases) == CASE_NAMES, sorted(set(cases) ^ set(CASE_NAMES))
    return cases


def _write_celeba(celeba: Path) -> dict[str, Expected]:
    images = celeba / "img_align_celeba"
    images.mkdir(parents=True, exist_ok=True)
    cases: dict[str, Expected] = {}
    identity_lines: list[str] = []
    attribute_rows: list[str] = []
    attr_values = " ".join("1" if i % 3 == 0 else "-1" for i in range(len(CELEBA_ATTRIBUTES)))

    def add(case: str, name: str, data: Optional[bytes], expected: dict, *, identity: Optional[str] = "7",
            identity_line: Optional[str] = None, attribute_row: Optional[str] = None) -> None:
        if data is not None:
            (images / name).write_bytes(data)
        if identity_line is not None:
            identity_lines.append(identity_line)
        elif identity is not None:
            identity_lines.append(f"{name} {identity}")
        attribute_rows.append(attribute_row if attribute_row is not None else f"{name} {attr_values}")
        key = make_key("celeba", name.rsplit(".", 1)[0])
        if expected.get("outcome") == PROCESSED:
            expected = {"domain": SPECIFIC, "identity": identity, "has_attributes": True, **expected}
        cases[case] = Expected(key=key, **expected)

    def processed(what: str, size=(W, H), **kw) -> dict:
        return dict(what=what, outcome=PROCESSED, size=size, **kw)

    def dead(what: str, stage: str, reason: str, reason_has: Optional[str] = None) -> dict:
        return dict(what=what, outcome=DEAD_LETTERED, stage=stage, reason=reason, reason_has=reason_has)

    plain = plain_jpeg()
    # Fine texture, so that most of the file is scan data and a cut at half lands inside it.
    noise = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    textured = _encode(Image.fromarray(noise), "JPEG", quality=95)
    png = _encode(_halves(RED, BLUE), "PNG")
    png_textured = _encode(Image.fromarray(noise), "PNG")
    add("plain_rgb_jpeg", "plain.jpg", plain,
        processed("an RGB JPEG that needs no change: passed through byte for byte",
                  pixels=((*LEFT, RED), (*RIGHT, GREEN)), source_sha256=_sha256(plain)))
    add("plain_rgb_jpeg_same_identity", "plain_two.jpg", plain_jpeg(BLUE, YELLOW),
        processed("a second image of the same identity", pixels=((*LEFT, BLUE), (*RIGHT, YELLOW))))
    add("corrupt_jpeg_header", "corrupt_header.jpg", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4,
        dead("JPEG start-of-image marker followed by garbage", "decode", "not a decodable image"))
    add("corrupt_jpeg_scan_data", "corrupt_scan.jpg", jpeg_with_garbage_in_scan(textured),
        dead("garbage with an invalid marker inside the scan data", "decode", "truncated or corrupt image",
             "invalid marker 0xFF05"))
    add("jpeg_zero_filled_tail", "zero_tail.jpg", jpeg_with_zeroed_tail(textured),
        dead("second half zero-filled (Pillow alone decodes it silently)", "decode", "truncated or corrupt image",
             "no end-of-image marker"))
    add("truncated_jpeg", "truncated_jpeg.jpg", truncated(textured),
        dead("JPEG cut in half", "decode", "truncated or corrupt image", "JPEG"))
    add("truncated_png", "truncated_png.png", truncated(png_textured, 0.6),
        dead("PNG cut inside its pixel data", "decode", "truncated or corrupt image", "PNG"))
    add("zero_byte_file", "empty.jpg", b"",
        dead("a zero-byte file", "read", "empty file"))
    add("text_file_named_jpg", "error_page.jpg", b"<html><body>404 Not Found</body></html>\n",
        dead("an HTML error page saved as .jpg", "decode", "not a decodable image", "starts with b'<html><body>404"))
    add("png_named_jpg", "png_inside.jpg", png,
        processed("PNG data in a file named .jpg (the content decides)", pixels=((*LEFT, RED), (*RIGHT, BLUE))))
    add("cmyk_jpeg", "cmyk.jpg", cmyk_jpeg(),
        processed("CMYK JPEG", pixels=((*LEFT, RED), (*RIGHT, BLUE))))
    add("grey16_png", "grey16.png", grey16_png(),
        processed("16-bit greyscale PNG, scaled to 8 bits", pixels=((*LEFT, (64, 64, 64)), (*RIGHT, (191, 191, 191)))))
    add("palette_png_transparency", "palette.png", palette_png_with_transparency(),
        processed("palette PNG with a transparent entry, composited onto white",
                  pixels=((*LEFT, WHITE), (*RIGHT, BLUE))))
    add("rgba_png", "rgba.png", rgba_png(),
        processed("RGBA PNG, composited onto white", pixels=((*LEFT, WHITE), (*RIGHT, BLUE))))
    add("exif_rotated_jpeg", "exif_rotated.jpg", exif_rotated_jpeg(6),
        processed("JPEG stored rotated with EXIF orientation 6: comes out upright", pixels=UPRIGHT_PROBES))
    add("decompression_bomb_100000x100000", "bomb.png", png_header_only(100_000, 100_000),
        dead("PNG header declaring 100000x100000 pixels, under 100 bytes on disk", "decode", "too many pixels",
             "decompression bomb"))
    add("over_pixel_limit_10000x10000", "over_limit.png", png_zero_bomb(10_000, 10_000),
        dead("10000x10000 = 100M black pixels (limit 64M), 290 KB on disk, 300 MB decoded", "decode",
             "too many pixels", "10000x10000"))
    add("image_1x1", "one_pixel.png", _encode(Image.new("RGB", (1, 1), RED), "PNG"),
        dead("a 1x1 image", "decode", "too small", "1x1"))
    add("image_20000x50", "strip.png", _encode(Image.new("RGB", (20_000, 50), RED), "PNG"),
        dead("a 20000x50 strip", "decode", "extreme aspect ratio", "20000x50"))

    add("identity_line_without_id", "no_id_value.jpg", plain_jpeg(GREEN, RED),
        dead("identity line with the image name only", "ingest", "bad identity line", "'no_id_value.jpg'"),
        identity_line="no_id_value.jpg")
    add("identity_line_non_numeric_id", "word_id.jpg", plain_jpeg(GREEN, BLUE),
        dead("identity line with a word for an id", "ingest", "bad identity line", "'word_id.jpg alice'"),
        identity_line="word_id.jpg alice")
    add("no_identity_line", "no_identity.jpg", plain_jpeg(YELLOW, RED),
        dead("an image on disk with no identity line", "ingest", "no identity line",
             "no_identity.jpg is not in identity_CelebA.txt"),
        identity=None)
    add("attribute_row_wrong_column_count", "short_row.jpg", plain_jpeg(RED, YELLOW),
        processed("attribute row with 3 of 40 values: processed without attributes, with a warning",
                  has_attributes=False, warning_has="short_row.jpg"),
        attribute_row="short_row.jpg 1 -1 1")
    add("annotated_but_missing_on_disk", "ghost.jpg", None,
        dict(what="identity and attribute rows for an image that is not on disk", outcome=NOT_AN_INPUT,
             missing_name="ghost.jpg"))
    os.symlink(str(celeba / "no-such-target.jpg"), images / "dangling.jpg")
    add("annotated_dangling_symlink", "dangling.jpg", None,
        dict(what="a symlink to nothing, with an identity row", outcome=NOT_AN_INPUT, missing_name="dangling.jpg"))

    (celeba / "identity_CelebA.txt").write_text("\n".join(identity_lines) + "\n", encoding="utf-8")
    (celeba / "list_attr_celeba.txt").write_text(
        f"{len(attribute_rows)}\n" + " ".join(CELEBA_ATTRIBUTES) + "\n" + "\n".join(attribute_rows) + "\n",
        encoding="utf-8",
    )
    return cases


def _write_folders(folder: Path, folder_more: Path) -> dict[str, Expected]:
    cases: dict[str, Expected] = {}

    def add(case: str, root: Path, identity: str, name: str, data: bytes, **expected) -> None:
        path = root / identity / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if expected["outcome"] == PROCESSED:
            expected = {"domain": SPECIFIC, "identity": identity, "has_attributes": False, "size": (W, H), **expected}
        namespace = "folder" if root == folder else "folder1"  # the second unnamed folder input
        cases[case] = Expected(key=make_key(namespace, identity, name.rsplit(".", 1)[0]), **expected)

    add("unicode_and_space_name", folder, "bob smith", "élan 1.jpg", plain_jpeg(RED, BLUE),
        what="accented name with a space, identity folder with a space", outcome=PROCESSED,
        pixels=((*LEFT, RED), (*RIGHT, BLUE)))
    add("unicode_identity_and_name", folder, "Zoë", "写真 2.png", _encode(_halves(GREEN, RED), "PNG"),
        what="non-Latin file name in a non-ASCII identity folder", outcome=PROCESSED,
        pixels=((*LEFT, GREEN), (*RIGHT, RED)))
    add("glob_characters_in_name", folder, "bob smith", "photo [1]*.jpg", plain_jpeg(BLUE, RED),
        what="a file name with glob characters", outcome=PROCESSED, pixels=((*LEFT, BLUE), (*RIGHT, RED)))
    add("animated_gif", folder, "anim", "blink.gif", animated("GIF", RED, GREEN),
        what="animated GIF (red, then green): the first frame", outcome=PROCESSED, pixels=((*LEFT, RED), (*RIGHT, RED)))
    add("animated_webp", folder, "anim", "blink_webp.webp", animated("WEBP", BLUE, YELLOW),
        what="animated WebP (blue, then yellow): the first frame", outcome=PROCESSED,
        pixels=((*LEFT, BLUE), (*RIGHT, BLUE)))
    add("same_key_two_folder_sources_first", folder, "dup", "same.jpg", plain_jpeg(GREEN, GREEN),
        what="dup/same.jpg in the first folder source: kept", outcome=PROCESSED,
        pixels=((*LEFT, GREEN), (*RIGHT, GREEN)))
    add("same_key_two_folder_sources_second", folder_more, "dup", "same.jpg", plain_jpeg(RED, RED),
        what="dup/same.jpg in the second folder source: its own key (namespace folder1), kept too",
        outcome=PROCESSED, pixels=((*LEFT, RED), (*RIGHT, RED)))
    return cases


def _write_wds(wds: Path) -> dict[str, Expected]:
    wds.mkdir(parents=True, exist_ok=True)
    cases: dict[str, Expected] = {}

    def sample(key: str, left: RGB, right: RGB, text: str) -> list[tuple[str, bytes]]:
        return [
            (f"{key}.jpg", plain_jpeg(left, right)),
            (f"{key}.json", f'{{"key": "{key}", "status": "success"}}'.encode()),
            (f"{key}.txt", text.encode("utf-8")),
        ]

    def processed(what: str, key: str, text: str, left: RGB, right: RGB) -> Expected:
        return Expected(what=what, key=make_key("wds", key), outcome=PROCESSED, domain=GENERAL, size=(W, H),
                        text=text, pixels=((*LEFT, left), (*RIGHT, right)))

    first, second = wds / "000000.tar", wds / "000001.tar"
    first.write_bytes(_tar(sample("000000000", RED, BLUE, "a red and blue flag")
                           + sample("000000001", GREEN, YELLOW, "green and yellow")))
    second.write_bytes(_tar(sample("000000001", RED, RED, "the same key in another tar")
                            + sample("000010000", YELLOW, BLUE, "yellow and blue")))
    cases["wds_plain_sample"] = processed("an img2dataset sample", "000000000", "a red and blue flag", RED, BLUE)
    cases["same_key_two_tars_first"] = processed("key 000000001 in 000000.tar: kept (smaller path)", "000000001",
                                                 "green and yellow", GREEN, YELLOW)
    cases["same_key_two_tars_second"] = Expected(
        what="key 000000001 again in 000001.tar", key="wds_000000001", outcome=DEAD_LETTERED, stage="ingest",
        reason="duplicate key", reason_has=f"{first}#000000001", path_has=f"{second}#000000001")
    cases["wds_other_tar_sample"] = processed("the other sample of 000001.tar", "000010000", "yellow and blue",
                                              YELLOW, BLUE)

    cut_tar = wds / "000002.tar"
    full = _tar(sample("000020000", BLUE, GREEN, "before the cut")
                + sample("000020001", GREEN, BLUE, "a caption the cut goes through"))
    cut_tar.write_bytes(full[: _member_offset(full, "000020001.txt") + 8])
    cases["truncated_tar_sample_before_cut"] = processed("the sample before the cut", "000020000", "before the cut",
                                                         BLUE, GREEN)
    cases["truncated_tar_sample_cut"] = Expected(
        what="the sample whose caption the cut goes through (its image is whole)", key="wds_000020001",
        outcome=DEAD_LETTERED, stage="read", reason="incomplete tar sample", reason_has="members read: jpg, json")
    cases["truncated_tar"] = Expected(
        what="a tar cut short", key="wds_000002_tar_error", outcome=DEAD_LETTERED, stage="read",
        reason="unreadable tar", reason_has="after 1 complete sample")
    empty = wds / "000003.tar"
    empty.write_bytes(_tar([]))
    cases["empty_tar"] = Expected(
        what="a valid tar with no member at all", key="wds_000003_empty_tar", outcome=DEAD_LETTERED, stage="read",
        reason="empty tar", reason_has="holds no sample", path_has=str(empty))
    return cases
