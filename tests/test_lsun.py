"""`lsun:DIR`: LSUN's LMDB layout read as it ships (transforms/sources/lsun.py), on generated
databases: WebP, JPEG and PNG records, an undecodable and an empty record, keys in order, two
workers byte-identical to one, resume after SIGKILL, a folder without data.mdb refused before
OUT is touched."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_same_output
from PIL import Image

from prep.schemas.records import DeadLetterKind
from prep.transforms.sources.lsun import HEX_PREFIX, key_bytes, key_text, plan_lsun


def _image(fmt: str, seed: int, size=(96, 80)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.zeros((size[1], size[0], 3), np.uint8) + rng.integers(0, 255, 3, dtype=np.uint8)
    pixels[20:60, 20:70] = rng.integers(0, 255, 3, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def write_db(folder: Path, rows: dict[bytes, bytes]) -> Path:
    import lmdb

    folder.mkdir(parents=True)
    env = lmdb.open(str(folder), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, value in rows.items():
            txn.put(key, value)
    env.close()
    return folder


def sha(i: int) -> bytes:
    return hashlib.sha1(f"record-{i}".encode()).hexdigest().encode("ascii")


@pytest.fixture(scope="module")
def lsun_db(tmp_path_factory) -> tuple[Path, dict]:
    """9 images (WebP, JPEG, PNG), one empty value, one undecodable value."""
    rows: dict[bytes, bytes] = {}
    formats = ["WEBP", "WEBP", "JPEG", "WEBP", "PNG", "WEBP", "JPEG", "WEBP", "WEBP"]
    for i, fmt in enumerate(formats):
        rows[sha(i)] = _image(fmt, i, size=(96 + 8 * i, 80))
    rows[sha(100)] = b""
    rows[sha(101)] = b"\x00\x01not an image at all"
    folder = write_db(tmp_path_factory.mktemp("lsun") / "dog", rows)
    return folder, {"rows": rows, "formats": formats, "empty": sha(100).decode(), "bad": sha(101).decode()}


def test_plan_lists_every_record_in_key_order_as_its_own_object(lsun_db):
    folder, info = lsun_db
    items, letters, report = plan_lsun(str(folder), "lsun")
    keys = sorted(k.decode() for k in info["rows"])
    assert [i.origin["key"] for i in items] == keys
    assert [i.key for i in items] == [f"lsun_{k}" for k in keys]
    assert all(i.identity == i.origin["key"] and i.source == "lsun" and i.domain == "specific" for i in items)
    assert all(i.path == f"{folder}#{i.origin['key']}" and i.attributes is None for i in items)
    assert letters == [] and report.items == 11 and report.stats["first_key"] == keys[0]


def test_keys_that_are_not_printable_ascii_round_trip_as_hex():
    for raw in (b"abc", bytes([0, 255, 3]), "é".encode(), b"a#b", b"hex:00", b"a\nb"):
        text = key_text(raw)
        assert key_bytes(text) == raw
        assert "#" not in text and text.isprintable()
    assert key_text(bytes([0, 255])) == HEX_PREFIX + "00ff"


def test_a_folder_without_data_mdb_is_refused_in_the_preflight_and_out_is_untouched(tmp_path, tiny_cache):
    empty = tmp_path / "dog"
    empty.mkdir()
    (empty / "readme.txt").write_text("not a database")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "prep.cli", "run", "--input", f"lsun:{empty}", "--preset", "tiny",
                           "--model-cache", tiny_cache, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "holds no data.mdb" in proc.stderr and "readme.txt" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def _config(folder: Path, out: Path, tiny_cache: str, **overrides):
    from prep.pipeline.config import RunConfig

    values = dict(inputs=[f"lsun:{folder}"], out=str(out), preset="tiny", model_cache=tiny_cache,
                  samples_per_shard=4, embed_batch_size=4, caption_batch_size=4)
    values.update(overrides)
    return RunConfig(**values)


@pytest.fixture(scope="module")
def lsun_run(lsun_db, tiny, tiny_cache, tmp_path_factory) -> dict:
    from prep.pipeline.run import run

    folder, info = lsun_db
    out = tmp_path_factory.mktemp("lsun-run") / "out"
    manifest = run(_config(folder, out, tiny_cache), [])
    return {"out": out, "manifest": manifest, "folder": folder, **info}


@pytest.mark.slow
def test_records_decode_and_bad_records_are_dead_letters_naming_their_key(lsun_run):
    from prep.schemas.validate import validate_output

    out, manifest = lsun_run["out"], lsun_run["manifest"]
    assert manifest["reconciled"]
    assert manifest["counts"]["inputs"] == 11 and manifest["counts"]["specific"] == 9
    letters = [json.loads(line) for f in sorted((out / "dead_letter").glob("*.jsonl")) for line in f.read_text().splitlines()]
    by_key = {letter["key"]: letter for letter in letters}
    empty, bad = by_key[f"lsun_{lsun_run['empty']}"], by_key[f"lsun_{lsun_run['bad']}"]
    assert (empty["stage"], empty["kind"]) == ("read", DeadLetterKind.EMPTY_FILE.value)
    assert lsun_run["empty"] in empty["reason"] and empty["path"].endswith("#" + lsun_run["empty"])
    assert (bad["stage"], bad["kind"]) == ("decode", DeadLetterKind.NOT_AN_IMAGE.value)
    assert bad["path"] == f"{lsun_run['folder']}#{lsun_run['bad']}"

    import webdataset as wds

    samples = {}
    for tar in sorted((out / "specific").glob("*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False):
            samples[s["__key__"]] = json.loads(s["json"])
    assert len(samples) == 9
    for i, fmt in enumerate(lsun_run["formats"]):  # every format decoded, at its own size
        meta = samples[f"lsun_{sha(i).decode()}"]
        assert (meta["width"], meta["height"]) == (96 + 8 * i, 80), fmt
        assert meta["origin"] == {"input": 0, "key": sha(i).decode()}
        assert meta["identity"] == sha(i).decode()  # its own object: no second photo, so its refs are
        key = f"lsun_{sha(i).decode()}"           # two augmented views of itself (the default for lsun:)
        assert meta["ref_keys"] == [f"{key}#aug0", f"{key}#aug1"] and meta["ref_kinds"] == ["augmented"] * 2
    assert validate_output(str(out)).ok


@pytest.mark.slow
@pytest.mark.parametrize("split", [{"workers": 2}, {"chunk_inputs": 4}], ids=["two workers", "chunks of 4"])
def test_split_runs_are_byte_identical_to_one_worker(lsun_run, tiny_cache, tmp_path, split):
    from prep.pipeline.run import run

    out = tmp_path / "split"
    run(_config(lsun_run["folder"], out, tiny_cache, **split), [])
    assert_same_output(str(lsun_run["out"]), str(out))


@pytest.mark.slow
def test_a_sigkilled_run_resumes_to_the_same_output(lsun_run, tiny_cache, tmp_path):
    from prep.pipeline.run import run

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "prep.cli", "run", "--input", f"lsun:{lsun_run['folder']}", "--preset", "tiny",
           "--model-cache", tiny_cache, "--out", str(out), "--samples-per-shard", "4", "--embed-batch-size", "4",
           "--caption-batch-size", "4", "--no-progress", "--workers", "1"]
    proc = subprocess.run(cmd, env={**os.environ, "PREP_FAULT": "write.after_tar:2"}, capture_output=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not (out / "manifest.json").exists()
    manifest = run(_config(lsun_run["folder"], out, tiny_cache), [])
    assert manifest["resumed"]["kept_shards"] >= 1
    assert_same_output(str(lsun_run["out"]), str(out))


def test_the_demo_database_is_lsun_shaped(tmp_path):
    from prep.demo import write_demo_data

    info = write_demo_data(str(tmp_path), identities=1, images_per_identity=1, general_shards=0, lsun_records=5)
    items, _, report = plan_lsun(info["lsun_dir"])
    assert report.items == 6 and info["lsun_bad_records"] == 1
    assert all(len(i.origin["key"]) == 40 for i in items)
    again = write_demo_data(str(tmp_path / "again"), identities=1, images_per_identity=1, general_shards=0, lsun_records=5)
    from prep.transforms.sources.lsun import open_env

    def rows(folder):
        with open_env(folder).begin() as txn:
            return list(txn.cursor())

    first = rows(info["lsun_dir"])
    assert first == rows(again["lsun_dir"])  # same seed, same records
    kinds = sorted(Image.open(io.BytesIO(v)).format for _, v in first if not v.startswith(b"RIFF\x00"))
    assert kinds.count("WEBP") == 4 and kinds.count("JPEG") == 1
