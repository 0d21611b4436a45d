"""img2dataset-style sidecars: beside every tar a parquet (one row per sample) and a
_stats.json, and per shard folder a wids index; all agree with what the tars hold, and the
bytes are the same on every write."""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from prep.schemas import contract
from prep.transforms.write import (
    PARQUET_SCHEMA,
    ShardRow,
    parquet_bytes,
    parquet_name,
    shard_stats,
    stats_bytes,
    stats_name,
)


def shard_paths(out: str) -> list[str]:
    """Every shard of an output: OUT/<domain>/ and OUT/<split>/<domain>/."""
    return sorted(p for p in glob.glob(os.path.join(out, "**", "*.tar"), recursive=True))


def read_tar(path: str) -> list[dict]:
    with open(path, "rb") as f:
        return [contract.decode_sample(raw) for raw in contract.iter_samples(f)]


@pytest.fixture(scope="module")
def shards(pipeline_run) -> dict[str, list[dict]]:
    paths = shard_paths(pipeline_run["out"])
    assert len(paths) >= 3
    return {p: read_tar(p) for p in paths}


def test_parquet_beside_each_tar_matches_its_samples(shards):
    for path, samples in shards.items():
        folder, name = os.path.split(path)
        table = pq.read_table(os.path.join(folder, parquet_name(name)))
        assert table.schema.names == PARQUET_SCHEMA.names, path
        rows = table.to_pylist()
        assert [r["key"] for r in rows] == [s["__key__"] for s in samples], path
        for row, s in zip(rows, samples, strict=True):
            meta, where = s["json"], f"{path}: {s['__key__']}"
            image = Image.open(io.BytesIO(s["jpg"]))
            assert row["status"] == "success" and row["error_message"] is None, where
            assert row["caption"] == s["txt"] == meta["caption"], where
            assert row["caption_words"] == len(s["txt"].split()), where
            for name_ in ("domain", "source", "identity", "caption_vlm", "caption_attributes", "ref_keys"):
                assert row[name_] == meta[name_], (where, name_)
            assert (row["width"], row["height"]) == image.size == (meta["width"], meta["height"]), where
            assert row["jpg_bytes"] == len(s["jpg"]), where
            assert row["ref_count"] == len(meta["ref_keys"]) == s["refs.npy"].shape[0], where
            assert row["emb_norm"] == pytest.approx(float(np.linalg.norm(s["emb.npy"].astype(np.float64))), abs=1e-12)
            if meta["domain"] == "specific":
                mask = np.asarray(Image.open(io.BytesIO(s["mask.png"])))
                assert row["mask_fraction"] == pytest.approx(np.count_nonzero(mask) / mask.size, abs=1e-12), where
            else:
                assert row["mask_fraction"] is None and row["identity"] is None, where


def test_stats_json_beside_each_tar_agrees_with_tar_and_manifest(shards, pipeline_run):
    out = pipeline_run["out"]
    listed = {}
    for entry in pipeline_run["manifest"]["shards"]:
        split = entry.get("split", "train")
        folder = entry["domain"] if split == "train" else f"{split}/{entry['domain']}"
        listed[f"{folder}/{entry['name']}"] = entry
    for path, samples in shards.items():
        folder, name = os.path.split(path)
        rel = os.path.relpath(path, out)
        stats = json.load(open(os.path.join(folder, stats_name(name))))
        data = open(path, "rb").read()
        sizes = json.load(open(os.path.join(folder, contract.SIZES)))
        domain = samples[0]["json"]["domain"]
        assert stats["shard"] == name and stats["domain"] == domain
        assert stats["count"] == stats["successes"] == len(samples) == sizes[name] == listed[rel]["count"]
        assert stats["status_dict"] == {"success": len(samples)}
        assert stats["domains"] == {domain: len(samples)}
        assert stats["bytes"] == len(data) == listed[rel]["bytes"]
        assert stats["sha256"] == hashlib.sha256(data).hexdigest() == listed[rel]["sha256"]
        assert (stats["first_key"], stats["last_key"]) == (samples[0]["__key__"], samples[-1]["__key__"])
        words = [len(s["txt"].split()) for s in samples]
        assert stats["caption_words"] == {
            "count": len(words), "min": min(words), "max": max(words), "mean": pytest.approx(sum(words) / len(words))
        }
        refs = [len(s["json"]["ref_keys"]) for s in samples]
        assert stats["refs_per_sample"]["total"] == sum(refs) and stats["refs_per_sample"]["max"] == max(refs)
        identities = {s["json"]["identity"] for s in samples if s["json"]["identity"] is not None}
        assert stats["identities"] == len(identities)
        assert stats["jpg_bytes"]["total"] == sum(len(s["jpg"]) for s in samples)
        assert stats["width"]["max"] == max(s["json"]["width"] for s in samples)
        if domain == "specific":
            fractions = []
            for s in samples:
                mask = np.asarray(Image.open(io.BytesIO(s["mask.png"])))
                fractions.append(np.count_nonzero(mask) / mask.size)
            assert stats["mask_fraction"]["count"] == len(samples)
            assert stats["mask_fraction"]["min"] == pytest.approx(min(fractions))
            assert stats["mask_fraction"]["max"] == pytest.approx(max(fractions))
            assert stats["emb_norm"]["min"] == pytest.approx(1.0, abs=1e-4)
        else:
            assert stats["mask_fraction"]["count"] == 0 and stats["emb_norm"]["max"] == 0.0


def test_wids_index_per_folder_lists_the_shards(shards, pipeline_run):
    out = pipeline_run["out"]
    folders = sorted({os.path.dirname(p) for p in shards})
    assert set(pipeline_run["manifest"]["wids_index"].values()) == {
        f"{os.path.relpath(f, out)}/index.wids.json" for f in folders
    }
    for folder in folders:
        index = json.load(open(os.path.join(folder, "index.wids.json")))
        assert index["__kind__"] == "wids-shard-index-v1" and index["wids_version"] == 1
        expected = [
            {"url": os.path.basename(p), "nsamples": len(s), "filesize": os.path.getsize(p)}
            for p, s in sorted(shards.items())
            if os.path.dirname(p) == folder
        ]
        assert index["shardlist"] == expected


def _rows():
    from test_shards import _samples  # the shard round-trip test's samples

    return [ShardRow.of(s) for s in sorted(_samples(), key=lambda s: s.key)]


def test_sidecar_bytes_are_deterministic_across_processes():
    rows = _rows()
    first = parquet_bytes(rows)
    assert parquet_bytes(rows) == first
    stats = stats_bytes(shard_stats(rows, shard="000000.tar", domain="specific", tar_size=1, sha256="0" * 64))
    code = (
        "import sys, hashlib; sys.path.insert(0, {tests!r}); "
        "from test_stats import _rows; from prep.transforms.write import parquet_bytes, shard_stats, stats_bytes; "
        "rows = _rows(); "
        "print(hashlib.sha256(parquet_bytes(rows)).hexdigest()); "
        "print(hashlib.sha256(stats_bytes(shard_stats(rows, shard='000000.tar', domain='specific', "
        "tar_size=1, sha256='0' * 64))).hexdigest())"
    ).format(tests=os.path.dirname(__file__))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == [hashlib.sha256(first).hexdigest(), hashlib.sha256(stats).hexdigest()]


def test_parquet_round_trips_rows():
    rows = _rows()
    table = pq.read_table(io.BytesIO(parquet_bytes(rows)))
    back = table.to_pylist()
    assert [r["key"] for r in back] == [r.key for r in rows]
    assert [tuple(r["ref_keys"]) for r in back] == [r.ref_keys for r in rows]
    assert [r["mask_fraction"] for r in back] == [r.mask_fraction for r in rows]
    assert all(r["status"] == "success" for r in back)
