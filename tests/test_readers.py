"""Other readers read the shards unchanged: webdataset (streaming), wids (indexed, through the
index.wids.json the run writes) and Hugging Face `datasets` (its "webdataset" builder, offline)
give the same keys and values as the contract's own reader. None of them unpickles anything.

Each test skips cleanly when its library is not installed.
"""

from __future__ import annotations

import glob
import io
import os

import numpy as np
import pytest
from PIL import Image

from prep.schemas import contract

# `datasets` reads this when it is imported: no hub look-ups, ever.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

NPY = (contract.EXT_EMB, contract.EXT_REFS)


def folders_of(out: str) -> list[str]:
    """Shard folders relative to OUT: "specific", "general", and "<split>/<domain>" ones."""
    tars = glob.glob(os.path.join(out, "**", "*.tar"), recursive=True)
    return sorted({os.path.relpath(os.path.dirname(t), out) for t in tars})


@pytest.fixture(scope="module")
def ours(pipeline_run) -> dict[str, list[dict]]:
    """folder -> samples in shard order, as contract.iter_samples/decode_sample read them."""
    out = pipeline_run["out"]
    result = {}
    for folder in folders_of(out):
        samples = []
        for path in sorted(glob.glob(os.path.join(out, folder, "*.tar"))):
            with open(path, "rb") as f:
                samples.extend(contract.decode_sample(raw) for raw in contract.iter_samples(f))
        result[folder] = samples
    assert {"specific", "general"} <= set(result)
    return result


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def members(sample: dict) -> set[str]:
    return {k for k in sample if not k.startswith("__")}


def assert_same_values(mine: dict, theirs: dict, where: str) -> None:
    """`theirs`: ext -> decoded value (json object, str, ndarray, or image pixels)."""
    assert theirs[contract.EXT_JSON] == mine[contract.EXT_JSON], where
    assert theirs[contract.EXT_TEXT] == mine[contract.EXT_TEXT], where
    for ext in NPY:
        expected = mine[ext]
        got = np.asarray(theirs[ext], dtype=expected.dtype).reshape(expected.shape)
        assert np.array_equal(got, expected), (where, ext)
    for ext in (contract.EXT_IMAGE, contract.EXT_MASK):
        if ext not in mine:
            continue
        got = theirs[ext]
        if isinstance(got, Image.Image):  # webdataset's "pil" decoder gives RGB: compare in its mode
            expected = np.asarray(Image.open(io.BytesIO(mine[ext])).convert(got.mode))
        else:
            expected = pixels(mine[ext])
        assert np.array_equal(np.asarray(got), expected), (where, ext)


def test_webdataset_reads_the_shards_unchanged(pipeline_run, ours, monkeypatch):
    wds = pytest.importorskip("webdataset")
    from webdataset import autodecode

    def no_pickles(data):
        raise AssertionError("webdataset tried to unpickle a member")

    for ext in ("pkl", "pickle", "pyd", "pth"):
        monkeypatch.setitem(autodecode.decoders, ext, no_pickles)
    out = pipeline_run["out"]
    for folder, samples in ours.items():
        urls = sorted(glob.glob(os.path.join(out, folder, "*.tar")))
        ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil", handler=wds.reraise_exception)
        got = list(ds)
        assert [g["__key__"] for g in got] == [s["__key__"] for s in samples], folder
        for mine, theirs in zip(samples, got, strict=True):
            assert members(theirs) == members(mine), mine["__key__"]
            assert_same_values(mine, theirs, f"{folder}/{mine['__key__']}")
            assert isinstance(theirs[contract.EXT_EMB], np.ndarray) and theirs[contract.EXT_EMB].dtype == np.float32


def test_wids_indexed_access_through_the_written_index(pipeline_run, ours, tmp_path):
    wids = pytest.importorskip("wids")
    out = pipeline_run["out"]
    for folder, samples in ours.items():
        ds = wids.ShardListDataset(
            os.path.join(out, folder, "index.wids.json"),
            cache_dir=str(tmp_path / folder.replace("/", "_")),  # wids copies shards here by base name
            transformations=[],  # raw members; decoded below without pickle
        )
        assert len(ds) == len(samples), folder
        order = list(range(len(ds)))[::-1]  # random access, not a stream
        for i in order:
            raw = ds[i]
            mine = samples[i]
            assert raw["__key__"] == mine["__key__"], (folder, i)
            data = {k[1:]: v.read() for k, v in raw.items() if k.startswith(".")}
            assert set(data) == members(mine), mine["__key__"]
            theirs = {
                contract.EXT_JSON: contract.decode_sample({"__key__": "", "json": data["json"]})["json"],
                contract.EXT_TEXT: data[contract.EXT_TEXT].decode("utf-8"),
                **{ext: np.load(io.BytesIO(data[ext]), allow_pickle=False) for ext in NPY},
                **{ext: pixels(data[ext]) for ext in (contract.EXT_IMAGE, contract.EXT_MASK) if ext in data},
            }
            assert_same_values(mine, theirs, f"{folder}[{i}]")
            assert data[contract.EXT_IMAGE] == mine[contract.EXT_IMAGE]  # the very bytes
        ds.close()


def test_hugging_face_datasets_loads_the_shards_offline(pipeline_run, ours, tmp_path):
    datasets = pytest.importorskip("datasets")
    assert datasets.config.HF_HUB_OFFLINE, "datasets must run offline here (HF_DATASETS_OFFLINE=1)"
    out = pipeline_run["out"]
    for folder in ("specific", "general"):  # one builder per folder: the domains' members differ
        samples = ours[folder]
        files = sorted(glob.glob(os.path.join(out, folder, "*.tar")))
        ds = datasets.load_dataset(
            "webdataset", data_files={"train": files}, split="train", cache_dir=str(tmp_path / "hf" / folder)
        )
        image_columns = [c for c in (contract.EXT_IMAGE, contract.EXT_MASK) if c in ds.column_names]
        for column in image_columns:  # the stored bytes, not a re-decoded image
            ds = ds.cast_column(column, datasets.Image(decode=False))
        assert len(ds) == len(samples)
        assert [r["__key__"] for r in ds] == [s["__key__"] for s in samples]
        for mine, row in zip(samples, ds, strict=True):
            assert {c for c in row if not c.startswith("__")} == members(mine), mine["__key__"]
            for column in image_columns:
                assert row[column]["bytes"] == mine[column], (mine["__key__"], column)
            theirs = {**row, **{c: pixels(row[c]["bytes"]) for c in image_columns}}
            # datasets unifies the JSON column's schema over the rows: a field only some samples
            # carry (caption_contradictions, caption_flags) reads as None where it is absent.
            only_some = set(contract.JSON_CAPTION_FIELDS) - set(mine[contract.EXT_JSON])
            assert all(theirs[contract.EXT_JSON].get(f) is None for f in only_some)
            theirs[contract.EXT_JSON] = {k: v for k, v in theirs[contract.EXT_JSON].items() if k not in only_some}
            assert_same_values(mine, theirs, f"{folder}/{mine['__key__']}")
