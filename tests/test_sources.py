"""Tests for prep.transforms.sources: spec parsing, CelebA/folder/wds planning, reading DoFns."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from prep.schemas.records import DeadLetter, DeadLetterKind, SourceItem, is_valid_key
from prep.transforms.common import DEAD
from prep.transforms.sources import (
    ReadImageBytes,
    ReadWdsShard,
    find_annotation,
    parse_input_spec,
    plan_celeba,
    plan_folder,
    plan_wds,
    read_attribute_file,
    read_identity_file,
    read_partition_file,
)

SHARED_CELEBA = Path(__file__).resolve().parents[2] / "shared" / "data" / "celeba"
REAL_IDENTITY = SHARED_CELEBA / "identity_CelebA.txt.gz"
REAL_ATTRIBUTES = SHARED_CELEBA / "list_attr_celeba.txt.gz"

needs_shared = pytest.mark.skipif(
    not (REAL_IDENTITY.exists() and REAL_ATTRIBUTES.exists()),
    reason=f"real CelebA annotation files not found under {SHARED_CELEBA}",
)

ATTR_NAMES = ["Male", "Smiling", "Young"]


def jpeg_bytes(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def write_jpeg(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = jpeg_bytes(color)
    path.write_bytes(data)
    return data


def sha(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha1(data).hexdigest()


def run_pipeline_with(build):
    """Run `build(p)` in a local FnApiRunner TestPipeline (no Prism download)."""
    with BeamTestPipeline(runner=FnApiRunner()) as p:
        build(p)


# --------------------------------------------------------------------------------------
# parse_input_spec
# --------------------------------------------------------------------------------------


def test_parse_input_spec_kinds_and_colons():
    assert parse_input_spec("celeba:/data/celeba") == ("celeba", "/data/celeba")
    assert parse_input_spec("folder:rel/dir") == ("folder", "rel/dir")
    assert parse_input_spec("wds:gs://bucket/{000..009}.tar") == ("wds", "gs://bucket/{000..009}.tar")


@pytest.mark.parametrize(
    "spec, message",
    [("/data/celeba", "no ':'"), ("imagenet:/x", "unknown kind 'imagenet'"), ("celeba:", "empty location")],
)
def test_parse_input_spec_errors(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_input_spec(spec)
    assert "celeba, folder, wds" in str(info.value)


# --------------------------------------------------------------------------------------
# Annotation parsers on small inputs
# --------------------------------------------------------------------------------------


def test_identity_file_quirks_plain_and_gzip(tmp_path):
    text = (
        "image identity\r\n"
        "000001.jpg 12\r\n"
        "\n"
        "000002.jpg\t\t7\n"
        "000003.jpg abc\n"
        "000004.jpg\n"
        "000001.jpg 99\n"
        "000005.jpg   0031\n"
    )
    plain = tmp_path / "identity_CelebA.txt"
    plain.write_text(text)
    zipped = tmp_path / "identity_CelebA.txt.gz"
    zipped.write_bytes(gzip.compress(text.encode()))
    for source in (plain, str(zipped), io.BytesIO(text.encode()), io.StringIO(text)):
        ids, warnings = read_identity_file(source)
        assert ids == {"000001.jpg": "12", "000002.jpg": "7", "000005.jpg": "31"}
        assert len(warnings) == 3
        assert "header line 1" in warnings[0] and "'image identity'" in warnings[0]
        assert "skipped 2 line(s)" in warnings[1] and "lines 5, 6" in warnings[1]
        assert "1 duplicate" in warnings[2] and "000001.jpg" in warnings[2]
    # Without a header the first row is data.
    ids, warnings = read_identity_file(io.BytesIO(b"000009.jpg 3\n"))
    assert ids == {"000009.jpg": "3"} and warnings == []


def test_attribute_file_quirks(tmp_path):
    path = tmp_path / "list_attr_celeba.txt"
    path.write_text(
        "10\n"
        "Male Smiling Young \n"
        "000001.jpg -1  1  1\n"
        "000002.jpg  1 -1 -1\n"
        "000003.jpg  1  0 -1\n"  # 0 is not a value: skipped
        "000004.jpg  1 -1\n"  # a column short: skipped
        "000002.jpg -1 -1 -1\n"  # duplicate: first kept
        "000005.jpg 1 1 -1"  # no final newline
    )
    names, rows, warnings = read_attribute_file(str(path))
    assert names == ATTR_NAMES
    assert rows == {
        "000001.jpg": {"Male": False, "Smiling": True, "Young": True},
        "000002.jpg": {"Male": True, "Smiling": False, "Young": False},
        "000005.jpg": {"Male": True, "Smiling": True, "Young": False},
    }
    joined = "\n".join(warnings)
    assert "declares 10 images but the file holds 6 rows" in joined
    assert "skipped 1 row(s) without 4 columns (e.g. 000004.jpg)" in joined
    assert "skipped 1 row(s) with a value other than 1/-1 (e.g. 000003.jpg)" in joined
    assert "1 duplicate image name(s)" in joined


def test_partition_file(tmp_path):
    path = tmp_path / "list_eval_partition.txt"
    path.write_text("000001.jpg 0\n000002.jpg 1\n000003.jpg 2\n000004.jpg 3\n")
    splits, warnings = read_partition_file(str(path))
    assert splits == {"000001.jpg": "train", "000002.jpg": "val", "000003.jpg": "test"}
    assert len(warnings) == 1 and "lines 4" in warnings[0]


def test_find_annotation(tmp_path):
    assert find_annotation(str(tmp_path), "identity_CelebA") is None
    (tmp_path / "identity_CelebA.txt.gz").write_bytes(gzip.compress(b"x 1\n"))
    assert find_annotation(str(tmp_path), "identity_CelebA") == str(tmp_path / "identity_CelebA.txt.gz")
    (tmp_path / "identity_CelebA.txt").write_text("x 1\n")
    assert find_annotation(str(tmp_path), "identity_CelebA") == str(tmp_path / "identity_CelebA.txt")


# --------------------------------------------------------------------------------------
# The real annotation files
# --------------------------------------------------------------------------------------


@needs_shared
def test_real_identity_file():
    ids, warnings = read_identity_file(str(REAL_IDENTITY))
    assert len(ids) == 202_599
    assert len(set(ids.values())) == 10_177
    assert ids["000001.jpg"] == "2880"
    assert ids["200426.jpg"] == "9386"
    assert ids["119900.jpg"] == "416"
    assert len(warnings) == 1 and "header line" in warnings[0]


@needs_shared
def test_real_attribute_file():
    names, rows, warnings = read_attribute_file(str(REAL_ATTRIBUTES))
    assert len(names) == 40
    assert names[0] == "5_o_Clock_Shadow" and names[-1] == "Young"
    assert len(rows) == 20_000
    assert rows["000001.jpg"]["Smiling"] is True
    assert rows["000001.jpg"]["Male"] is False
    assert rows["000001.jpg"]["5_o_Clock_Shadow"] is False
    assert rows["000001.jpg"]["Young"] is True
    assert "020000.jpg" in rows and "020001.jpg" not in rows  # last row, no final newline
    assert len(warnings) == 1
    assert "202599" in warnings[0] and "20000" in warnings[0]


# --------------------------------------------------------------------------------------
# plan_celeba
# --------------------------------------------------------------------------------------


def build_celeba(root: Path) -> None:
    images = root / "img_align_celeba"
    for i, stem in enumerate(["000001", "000002", "000003", "000004", "000008"]):
        write_jpeg(images / f"{stem}.jpg", (40 * i, 80, 120))
    (images / "notes.txt").write_text("not an image")
    (images / ".hidden.jpg").write_bytes(b"")
    (root / "identity_CelebA.txt").write_text(
        "image identity\n"
        "000001.jpg 10\n"
        "000002.jpg 10\n"
        "000003.jpg 20\n"
        # 000004.jpg has no identity line
        "000008.jpg twenty\n"  # a line without a numeric id
        "000005.jpg 30\n"  # not on disk
        "000006.jpg 30\n"  # not on disk
    )
    (root / "list_attr_celeba.txt").write_text(
        "202599\n"
        "Male Smiling Young\n"
        "000001.jpg -1  1  1\n"
        "000002.jpg  1 -1 -1\n"
        "000005.jpg  1  1  1\n"  # not on disk
        "000007.jpg -1 -1 -1"  # not on disk, only in this file
    )
    (root / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg 1\n000003.jpg 2\n000004.jpg 0\n")


def test_plan_celeba(tmp_path):
    root = tmp_path / "celeba"
    build_celeba(root)
    items, dead_letters, report = plan_celeba(str(root))

    images = root / "img_align_celeba"
    assert [i.key for i in items] == ["celeba_000001", "celeba_000002", "celeba_000003"]
    assert all(i.source == "celeba" and i.domain == "specific" for i in items)
    assert [i.path for i in items] == [str(images / f"00000{n}.jpg") for n in (1, 2, 3)]
    assert [i.identity for i in items] == ["10", "10", "20"]
    assert items[0].attributes == {"Male": False, "Smiling": True, "Young": True}
    assert items[1].attributes == {"Male": True, "Smiling": False, "Young": False}
    assert items[2].attributes is None
    assert [i.split for i in items] == ["train", "val", "test"]

    assert dead_letters == [
        DeadLetter(
            key="celeba_000004",
            source="celeba",
            stage="ingest",
            kind=DeadLetterKind.NO_IDENTITY_LINE,
            reason="no identity line: 000004.jpg is not in identity_CelebA.txt",
            path=str(images / "000004.jpg"),
        ),
        DeadLetter(
            key="celeba_000008",
            source="celeba",
            stage="ingest",
            kind=DeadLetterKind.BAD_IDENTITY_LINE,
            reason=(
                "bad identity line: line 5 of identity_CelebA.txt is '000008.jpg twenty', "
                "not '<image> <numeric identity id>'"
            ),
            path=str(images / "000008.jpg"),
        ),
    ]

    assert report.kind == "celeba" and report.spec == f"celeba:{root}"
    assert report.items == 3
    assert report.missing_on_disk == 3
    assert report.missing_examples == ["000005.jpg", "000006.jpg", "000007.jpg"]
    assert report.stats["images_on_disk"] == 5
    assert report.stats["identities"] == 2
    assert report.stats["identities_in_file"] == 3
    assert report.stats["attribute_rows"] == 4
    assert report.stats["images_with_attributes"] == 2
    assert report.stats["images_without_attributes"] == 1
    assert report.stats["splits"] == {"test": 1, "train": 1, "val": 1}
    assert report.stats["dead_letters"] == 2
    joined = "\n".join(report.warnings)
    assert "identity_CelebA.txt: skipped 1 line(s) without a valid '<image> <identity id>' pair (lines 5)" in joined
    assert "header line" in joined
    assert "declares 202599 images but the file holds 4 rows" in joined
    assert "1 of 3 images have no row in list_attr_celeba.txt" in joined
    assert "3 annotated images are not on disk" in joined
    assert report.to_json()["items"] == 3


def test_plan_celeba_without_identity_file(tmp_path):
    write_jpeg(tmp_path / "img_align_celeba" / "000001.jpg")
    with pytest.raises(FileNotFoundError, match="identity file not found"):
        plan_celeba(str(tmp_path))


@needs_shared
def test_plan_celeba_real_annotations_two_images(tmp_path):
    images = tmp_path / "img_align_celeba"
    images.mkdir()
    for name in ("200426.jpg", "119900.jpg"):
        shutil.copy(SHARED_CELEBA / "img_align_celeba" / name, images / name)
    shutil.copy(REAL_IDENTITY, tmp_path / REAL_IDENTITY.name)
    shutil.copy(REAL_ATTRIBUTES, tmp_path / REAL_ATTRIBUTES.name)

    items, dead_letters, report = plan_celeba(str(tmp_path))
    assert dead_letters == []
    assert [(i.key, i.identity, i.attributes, i.split) for i in items] == [
        ("celeba_119900", "416", None, None),
        ("celeba_200426", "9386", None, None),
    ]
    assert report.items == 2
    assert report.missing_on_disk == 202_597
    assert 0 < len(report.missing_examples) <= 10
    assert report.missing_examples[0] == "000001.jpg"
    assert report.stats["images_without_attributes"] == 2
    assert any("2 of 2 images have no row in list_attr_celeba.txt.gz" in w for w in report.warnings)
    assert any("202599" in w and "20000" in w for w in report.warnings)


# --------------------------------------------------------------------------------------
# plan_folder
# --------------------------------------------------------------------------------------


def test_plan_folder(tmp_path):
    write_jpeg(tmp_path / "alice" / "a.jpg")
    write_jpeg(tmp_path / "alice" / "a.png")  # same key as a.jpg: dead letter
    write_jpeg(tmp_path / "alice" / "B.JPEG")
    write_jpeg(tmp_path / "bob smith" / "photo 1.jpg")
    write_jpeg(tmp_path / "bob smith" / "photo_1.jpg")
    write_jpeg(tmp_path / "bob smith" / "élan.webp")
    (tmp_path / "bob smith" / "readme.md").write_text("x")
    (tmp_path / "bob smith" / ".DS_Store").write_bytes(b"x")
    write_jpeg(tmp_path / ".cache" / "c.jpg")
    write_jpeg(tmp_path / "stray.jpg")

    items, dead_letters, report = plan_folder(str(tmp_path))

    by_path = {Path(i.path).relative_to(tmp_path).as_posix(): i for i in items}
    assert sorted(by_path) == [
        "alice/B.JPEG",
        "alice/a.jpg",
        "bob smith/photo 1.jpg",
        "bob smith/photo_1.jpg",
        "bob smith/élan.webp",
    ]
    assert by_path["alice/a.jpg"].key == "folder_alice_a"
    assert by_path["alice/B.JPEG"].key == "folder_alice_B"
    assert by_path["alice/a.jpg"].identity == "alice"
    assert by_path["bob smith/élan.webp"].identity == "bob smith"
    keys = [i.key for i in items]
    assert keys == sorted(keys)
    assert len(set(keys)) == len(keys)
    assert all(is_valid_key(k) for k in keys)
    assert by_path["bob smith/photo 1.jpg"].key != by_path["bob smith/photo_1.jpg"].key
    assert all(i.source == "folder" and i.domain == "specific" for i in items)

    assert len(dead_letters) == 1
    letter = dead_letters[0]
    assert (letter.key, letter.stage, letter.path) == ("folder_alice_a", "ingest", str(tmp_path / "alice" / "a.png"))
    assert letter.reason == f"duplicate key: folder_alice_a is also produced by {tmp_path / 'alice' / 'a.jpg'}"

    assert report.items == 5
    assert report.stats["identities"] == 2
    assert report.stats["non_image_files"] == 1
    assert report.stats["files_in_root"] == 1
    assert report.stats["hidden_files"] == 2
    joined = "\n".join(report.warnings)
    assert "stray.jpg" in joined and "directly in" in joined
    assert "bob smith/readme.md" in joined


def test_plan_folder_empty(tmp_path):
    (tmp_path / "alice").mkdir()
    with pytest.raises(FileNotFoundError, match="no images found"):
        plan_folder(str(tmp_path))


# --------------------------------------------------------------------------------------
# plan_wds
# --------------------------------------------------------------------------------------


def test_plan_wds(tmp_path):
    for i in range(4):
        (tmp_path / f"{i:06d}.tar").write_bytes(b"")
    urls, report = plan_wds(str(tmp_path / "{000000..000002}.tar"))
    assert urls == [str(tmp_path / f"{i:06d}.tar") for i in range(3)]
    assert report.items == 3 and report.missing_on_disk == 0

    urls, report = plan_wds(str(tmp_path / "{000002..000005}.tar"))
    assert urls == [str(tmp_path / "000002.tar"), str(tmp_path / "000003.tar")]
    assert report.missing_on_disk == 2
    assert report.missing_examples == [str(tmp_path / "000004.tar"), str(tmp_path / "000005.tar")]

    urls, _ = plan_wds(str(tmp_path / "00000[13].tar"))
    assert urls == [str(tmp_path / "000001.tar"), str(tmp_path / "000003.tar")]
    urls, _ = plan_wds(str(tmp_path / "*.tar"))
    assert len(urls) == 4

    with pytest.raises(FileNotFoundError, match="no tar file matches"):
        plan_wds(str(tmp_path / "nothing-{0..3}.tar"))
    with pytest.raises(FileNotFoundError, match="no tar file matches"):
        plan_wds(str(tmp_path / "*.tgz"))


# --------------------------------------------------------------------------------------
# ReadImageBytes
# --------------------------------------------------------------------------------------


def test_read_image_bytes(tmp_path):
    good = tmp_path / "a.jpg"
    good_bytes = write_jpeg(good)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    items = [
        SourceItem("folder_x_a", "folder", "specific", str(good), identity="x", split="train"),
        SourceItem("folder_x_missing", "folder", "specific", str(tmp_path / "missing.jpg"), identity="x"),
        SourceItem("folder_x_empty", "folder", "specific", str(empty), identity="x"),
    ]

    def build(p):
        out = p | beam.Create(items) | beam.ParDo(ReadImageBytes()).with_outputs(DEAD, main="ok")
        assert_that(
            out.ok | "OkView" >> beam.Map(lambda s: (s.key, s.identity, s.split, sha(s.raw))),
            equal_to([("folder_x_a", "x", "train", sha(good_bytes))]),
            label="CheckOk",
        )
        assert_that(
            out[DEAD] | "DeadView" >> beam.Map(lambda d: (d.key, d.stage, d.reason.split(":")[0], d.path)),
            equal_to(
                [
                    ("folder_x_missing", "read", "cannot read file", str(tmp_path / "missing.jpg")),
                    ("folder_x_empty", "read", "empty file", str(empty)),
                ]
            ),
            label="CheckDead",
        )

    run_pipeline_with(build)


def test_read_image_bytes_refuses_files_over_the_limit(tmp_path):
    """A file bigger than max_bytes is a dead letter; only max_bytes + 1 bytes are ever read."""
    small, big = tmp_path / "small.jpg", tmp_path / "big.jpg"
    small.write_bytes(b"x" * 10)
    big.write_bytes(b"x" * 11)
    items = [
        SourceItem("folder_x_small", "folder", "specific", str(small), identity="x"),
        SourceItem("folder_x_big", "folder", "specific", str(big), identity="x"),
    ]

    def build(p):
        out = p | beam.Create(items) | beam.ParDo(ReadImageBytes(max_bytes=10)).with_outputs(DEAD, main="ok")
        ok = out.ok | "OkView" >> beam.Map(lambda s: (s.key, len(s.raw)))
        assert_that(ok, equal_to([("folder_x_small", 10)]), label="Ok")
        assert_that(
            out[DEAD] | "DeadView" >> beam.Map(lambda d: (d.key, d.stage, d.reason)),
            equal_to([("folder_x_big", "read", "file too large: more than 10 bytes")]),
            label="Dead",
        )

    run_pipeline_with(build)


# --------------------------------------------------------------------------------------
# ReadWdsShard
# --------------------------------------------------------------------------------------


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def member_offset(tar: bytes, name: str) -> int:
    """Byte offset of a member's data inside an uncompressed tar."""
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        return t.getmember(name).offset_data


def test_read_wds_shard(tmp_path):
    img = [jpeg_bytes((i * 50, 0, 0)) for i in range(4)]
    good = tar_bytes(
        [
            ("000000000.jpg", img[0]),
            ("000000000.txt", "  a red square \n".encode()),
            ("000000000.json", json.dumps({"url": "http://x/0.jpg", "width": 8}).encode()),
            ("000000001.png", img[1]),
            ("000000001.json", b"{not json"),
            ("000000001.pyd", b"\x80\x04 never decoded"),
            ("000000002.txt", b"caption without image"),
            ("000000002.json", b"{}"),
            ("000000003.jpg", img[3]),
            ("000000003.txt", "café ☕".encode()),
        ]
    )
    good_url = tmp_path / "000007.tar"
    good_url.write_bytes(good)

    full = tar_bytes(
        [
            ("100000000.jpg", img[0]),
            ("100000000.txt", b"first"),
            ("100000001.jpg", img[1]),
            ("100000001.txt", b"second"),
            ("100000002.jpg", img[2]),
            ("100000002.txt", b"third"),
        ]
    )
    cut = member_offset(full, "100000002.jpg") + len(img[2]) // 2  # in the middle of a member
    truncated_url = tmp_path / "000008.tar"
    truncated_url.write_bytes(full[:cut])

    unsafe = tar_bytes(
        [
            ("200000000.jpg", img[0]),
            ("200000000.jpg", img[1]),  # the same member twice: that sample is a dead letter
            ("200000001.jpg", img[2]),
            ("../evil.txt", b"x"),  # unsafe name: the tar stops here
        ]
    )
    unsafe_url = tmp_path / "000009.tar"
    unsafe_url.write_bytes(unsafe)

    def build(p):
        out = (
            p
            | beam.Create([str(good_url), str(truncated_url), str(unsafe_url)])
            | beam.ParDo(ReadWdsShard()).with_outputs(DEAD, main="ok")
        )
        assert_that(
            out.ok
            | "OkView"
            >> beam.Map(lambda s: (s.key, s.source, s.domain, s.path, sha(s.raw), s.text)),
            equal_to(
                [
                    (
                        "wds_000000000",
                        "wds",
                        "general",
                        f"{good_url}#000000000",
                        sha(img[0]),
                        "a red square",
                    ),
                    ("wds_000000001", "wds", "general", f"{good_url}#000000001", sha(img[1]), None),
                    ("wds_000000003", "wds", "general", f"{good_url}#000000003", sha(img[3]), "café ☕"),
                    ("wds_100000000", "wds", "general", f"{truncated_url}#100000000", sha(img[0]), "first"),
                ]
            ),
            label="CheckOk",
        )
        assert_that(
            out[DEAD] | "DeadView" >> beam.Map(lambda d: (d.key, d.source, d.stage, d.reason.split(":")[0], d.path)),
            equal_to(
                [
                    ("wds_000000002", "wds", "read", "no image member", f"{good_url}#000000002"),
                    # The tar breaks off inside 100000002.jpg; the error does not say whether the
                    # sample being collected (100000001) had all its members, so it is not passed on.
                    ("wds_100000001", "wds", "read", "incomplete tar sample", f"{truncated_url}#100000001"),
                    ("wds_000008_tar_error", "wds", "read", "unreadable tar", str(truncated_url)),
                    ("wds_200000000", "wds", "read", "duplicate member", f"{unsafe_url}#200000000"),
                    ("wds_200000001", "wds", "read", "incomplete tar sample", f"{unsafe_url}#200000001"),
                    ("wds_000009_tar_error", "wds", "read", "unreadable tar", str(unsafe_url)),
                ]
            ),
            label="CheckDead",
        )

    run_pipeline_with(build)


def test_read_wds_shard_cut_inside_a_caption_passes_nothing_on_without_it(tmp_path):
    """The image of the sample in progress is complete but its caption is cut: that sample is a
    dead letter saying so (not a general sample without text), beside the tar's own letter."""
    img = jpeg_bytes()
    full = tar_bytes(
        [
            ("000000000.jpg", img),
            ("000000000.txt", b"first caption"),
            ("000000001.jpg", img),
            ("000000001.txt", b"a caption that the cut goes through"),
        ]
    )
    url = tmp_path / "000003.tar"
    url.write_bytes(full[: member_offset(full, "000000001.txt") + 10])

    def build(p):
        out = p | beam.Create([str(url)]) | beam.ParDo(ReadWdsShard()).with_outputs(DEAD, main="ok")
        ok = out.ok | "OkView" >> beam.Map(lambda s: (s.key, s.text))
        assert_that(ok, equal_to([("wds_000000000", "first caption")]), label="Ok")
        assert_that(
            out[DEAD] | "DeadView" >> beam.Map(lambda d: (d.key, d.stage, d.reason.split(" (ReadError")[0], d.path)),
            equal_to(
                [
                    (
                        "wds_000000001",
                        "read",
                        f"incomplete tar sample: reading {url} failed in or right after sample 000000001 "
                        f"(members read: jpg), so members of it may be missing",
                        f"{url}#000000001",
                    ),
                    (
                        "wds_000003_tar_error",
                        "read",
                        f"unreadable tar: {url} failed after 1 complete sample",
                        str(url),
                    ),
                ]
            ),
            label="Dead",
        )

    run_pipeline_with(build)
