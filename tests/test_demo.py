"""Tests for prep.demo: the synthetic CelebA + img2dataset data set."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from prep.demo import CELEBA_IMAGE_SIZE, GENERAL_IMAGE_SIZE, write_demo_data
from prep.transforms.attributes import CELEBA_ATTRIBUTES

IDENTITIES = 8
PER_IDENTITY = 4
CORRUPT = 2
SHARDS = 2
PER_SHARD = 8
PER_IMAGE_LABELS = {"Smiling", "Mouth_Slightly_Open", "Wearing_Hat"}


def _write(out: Path, **overrides) -> dict:
    kwargs = dict(
        identities=IDENTITIES,
        images_per_identity=PER_IDENTITY,
        general_shards=SHARDS,
        general_per_shard=PER_SHARD,
        seed=0,
        corrupt=CORRUPT,
    )
    kwargs.update(overrides)
    return write_demo_data(out, **kwargs)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    return out, _write(out)


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _read_identities(celeba: Path) -> dict[str, str]:
    rows = {}
    for line in (celeba / "identity_CelebA.txt").read_text().splitlines():
        name, identity = line.split(" ")
        rows[name] = identity
    return rows


def _read_attributes(celeba: Path) -> tuple[int, list[str], dict[str, dict[str, bool]]]:
    text = (celeba / "list_attr_celeba.txt").read_text()
    assert text.endswith("\n")
    lines = text.split("\n")[:-1]
    count = int(lines[0])
    assert lines[1].endswith(" ") and not lines[1].endswith("  "), "header keeps one trailing space"
    names = lines[1].split()
    rows = {}
    for line in lines[2:]:
        # Exactly the real file's layout: each value right-aligned in width 2 after one space.
        assert re.fullmatch(r"\d{6}\.jpg(?: -1|  1){40}", line), line
        fields = line.split()
        assert len(fields) == 41
        rows[fields[0]] = {n: v == "1" for n, v in zip(names, fields[1:])}
    return count, names, rows


def _load(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32)


def test_return_value(demo):
    out, info = demo
    assert info == {
        "celeba_dir": str(out / "celeba"),
        "general_dir": str(out / "general"),
        "general_pattern": f"{out}/general/{{000000..000001}}.tar",
        "images": IDENTITIES * PER_IDENTITY,
        "identities": IDENTITIES,
        "general_samples": SHARDS * PER_SHARD,
        "corrupt": CORRUPT,
        "lsun_dir": str(out / "lsun" / "dog"),
        "lsun_records": 12,
        "lsun_bad_records": 1,
    }


def test_celeba_files_and_counts(demo):
    out, info = demo
    celeba = Path(info["celeba_dir"])
    total = IDENTITIES * PER_IDENTITY + CORRUPT
    files = sorted(p.name for p in (celeba / "img_align_celeba").iterdir())
    assert files == [f"{n:06d}.jpg" for n in range(1, total + 1)]
    assert not list(out.rglob("*.tmp"))

    identities = _read_identities(celeba)
    assert list(identities) == files
    assert len(set(identities.values())) == IDENTITIES
    assert all(1 <= int(i) <= 10177 for i in identities.values())
    real = files[: IDENTITIES * PER_IDENTITY]
    per_identity = defaultdict(int)
    for name in real:
        per_identity[identities[name]] += 1
    assert set(per_identity.values()) == {PER_IDENTITY}

    count, names, rows = _read_attributes(celeba)
    assert count == total
    assert tuple(names) == CELEBA_ATTRIBUTES
    assert list(rows) == files


def test_real_images_are_rgb_jpegs_of_celeba_size(demo):
    _, info = demo
    folder = Path(info["celeba_dir"]) / "img_align_celeba"
    for n in range(1, info["images"] + 1):
        with Image.open(folder / f"{n:06d}.jpg") as image:
            assert image.format == "JPEG"
            assert image.mode == "RGB"
            assert image.size == CELEBA_IMAGE_SIZE
            image.load()


def test_eval_partition_by_identity(demo):
    _, info = demo
    celeba = Path(info["celeba_dir"])
    identities = _read_identities(celeba)
    partition = {}
    for line in (celeba / "list_eval_partition.txt").read_text().splitlines():
        name, split = line.split(" ")
        partition[name] = int(split)
    assert list(partition) == list(identities)
    split_of_identity: dict[str, set[int]] = defaultdict(set)
    for name, split in partition.items():
        split_of_identity[identities[name]].add(split)
    assert all(len(s) == 1 for s in split_of_identity.values()), "an identity crosses splits"
    counts = [sum(1 for s in split_of_identity.values() if s == {k}) for k in (0, 1, 2)]
    assert counts == [6, 1, 1]
    real = list(partition.values())[: info["images"]]
    assert real == sorted(real), "real images are numbered in split order, like CelebA"


def test_labels_are_consistent_per_identity(demo):
    _, info = demo
    celeba = Path(info["celeba_dir"])
    identities = _read_identities(celeba)
    _, _, rows = _read_attributes(celeba)
    by_identity: dict[str, list[dict[str, bool]]] = defaultdict(list)
    for name, labels in rows.items():
        by_identity[identities[name]].append(labels)
    for images in by_identity.values():
        for name in CELEBA_ATTRIBUTES:
            if name not in PER_IMAGE_LABELS:
                assert len({labels[name] for labels in images}) == 1, name
    for labels in rows.values():
        hair_colours = sum(labels[n] for n in ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair"))
        assert hair_colours == (0 if labels["Bald"] else 1)
        assert not (labels["Wavy_Hair"] and labels["Straight_Hair"])
        if not labels["Male"]:
            assert labels["No_Beard"] and not labels["Mustache"] and not labels["Goatee"]
    # Per-image labels do vary within the data set.
    for name in PER_IMAGE_LABELS:
        assert len({labels[name] for labels in rows.values()}) == 2, name


def test_same_identity_images_look_alike(demo):
    _, info = demo
    celeba = Path(info["celeba_dir"])
    identities = _read_identities(celeba)
    names = [f"{n:06d}.jpg" for n in range(1, info["images"] + 1)]
    # The central face region (eyes, nose, mouth, cheeks), away from the varying background.
    crops = np.stack([_load(celeba / "img_align_celeba" / n)[80:150, 59:119] for n in names])
    distance = np.abs(crops[:, None] - crops[None]).mean(axis=(2, 3, 4))
    ids = np.array([identities[n] for n in names])
    same = ids[:, None] == ids[None, :]
    off_diagonal = ~np.eye(len(names), dtype=bool)
    intra = distance[same & off_diagonal].mean()
    inter = distance[~same].mean()
    assert intra < 0.5 * inter, (intra, inter)
    # And same-identity images are not copies of each other.
    assert distance[same & off_diagonal].min() > 1.0


def test_background_is_near_uniform(demo):
    _, info = demo
    folder = Path(info["celeba_dir"]) / "img_align_celeba"
    for n in range(1, info["images"] + 1):
        pixels = _load(folder / f"{n:06d}.jpg")
        corner = pixels[2:30, 2:30].reshape(-1, 3)
        assert corner.std(axis=0).max() < 8.0


def test_corrupt_files_do_not_decode(demo):
    _, info = demo
    folder = Path(info["celeba_dir"]) / "img_align_celeba"
    for n in range(info["images"] + 1, info["images"] + CORRUPT + 1):
        path = folder / f"{n:06d}.jpg"
        assert path.read_bytes().startswith(b"\xff\xd8\xff\xe0")
        with pytest.raises((OSError, SyntaxError, ValueError)):
            with Image.open(path) as image:
                image.load()


def test_general_shards_read_with_webdataset(demo):
    _, info = demo
    samples = list(wds.WebDataset(info["general_pattern"], shardshuffle=False))
    assert len(samples) == info["general_samples"] == SHARDS * PER_SHARD
    keys = [s["__key__"] for s in samples]
    expected = [f"{shard * 10000 + i:09d}" for shard in range(SHARDS) for i in range(PER_SHARD)]
    assert keys == expected
    for sample in samples:
        assert {"jpg", "txt", "json"} <= set(sample)
        meta = json.loads(sample["json"])
        caption = sample["txt"].decode("utf-8")
        assert meta["key"] == sample["__key__"]
        assert meta["caption"] == caption
        assert meta["url"] == f"https://example.invalid/{sample['__key__']}.jpg"
        assert meta["status"] == "success"
        assert (meta["width"], meta["height"]) == GENERAL_IMAGE_SIZE
        assert re.fullmatch(r"[a-z ,]+ under an? \w+ sky( with the sun)?", caption), caption
        with Image.open(io.BytesIO(sample["jpg"])) as image:
            assert image.format == "JPEG"
            assert image.size == GENERAL_IMAGE_SIZE


def test_general_tar_headers_are_fixed(demo):
    _, info = demo
    with tarfile.open(Path(info["general_dir"]) / "000000.tar") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names)
    assert len(names) == 3 * PER_SHARD
    for m in members:
        assert (m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname) == (0, 0o644, 0, 0, "", "")
        assert m.isfile()


def test_same_seed_same_bytes_other_seed_other_bytes(demo, tmp_path):
    out, _ = demo
    again = tmp_path / "again"
    _write(again)
    first = _digests(out)
    assert first == _digests(again)

    other = tmp_path / "other"
    _write(other, seed=1)
    second = _digests(other)
    assert second.keys() == first.keys()
    changed = [name for name in first if first[name] != second[name]]
    assert len(changed) > len(first) // 2


def test_existing_output_needs_overwrite(tmp_path):
    small = dict(identities=3, images_per_identity=2, general_shards=1, general_per_shard=2, corrupt=0)
    write_demo_data(tmp_path, **small)
    with pytest.raises(FileExistsError):
        write_demo_data(tmp_path, **small)
    before = _digests(tmp_path)
    info = write_demo_data(
        tmp_path, overwrite=True, identities=2, images_per_identity=2, general_shards=0
    )
    assert info["general_pattern"] is None and info["general_samples"] == 0
    after = _digests(tmp_path)
    assert not any(name.startswith("general") for name in after)
    assert len([n for n in after if n.endswith(".jpg")]) == 4
    assert before != after


@pytest.mark.parametrize(
    "kwargs",
    [
        {"identities": 0},
        {"identities": 10178},
        {"images_per_identity": 0},
        {"general_shards": -1},
        {"general_per_shard": 10001},
        {"corrupt": -1},
        {"identities": 2.5},
    ],
)
def test_bad_arguments_are_rejected(tmp_path, kwargs):
    with pytest.raises((ValueError, TypeError)):
        write_demo_data(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())
