"""f_a as a network (models/attribute_probe.py, transforms/attribute_predict.py): a probe fit on
stored embeddings, saved and loaded, predicting attribute captions for unlabelled faces, doubting
planted mislabels, refused for another embedding model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from prep.models.attribute_probe import (
    META_FILE,
    WEIGHTS_FILE,
    AttributeProbe,
    balanced_accuracy,
    fit,
    fit_output,
    same_embed_model,
)
from prep.transforms.attribute_predict import doubts


def _synthetic(n: int, d: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    clean = x[:, 0] + 0.2 * x[:, 1] > 0.05  # linear in the embedding
    noisy = (x[:, 2] + 0.3 * rng.normal(size=n)) > 0.0
    rare = np.zeros(n, bool)
    rare[:2] = True  # 2 positives: too few to fit
    return x, np.stack([clean, noisy, rare], axis=1)


def test_fit_is_deterministic_measures_against_the_majority_and_skips_rare_attributes():
    tx, ty = _synthetic(2000, 16, 0)
    vx, vy = _synthetic(600, 16, 1)
    names = ["Clean", "Noisy", "Rare"]
    a, b = fit(tx, ty, vx, vy, names), fit(tx, ty, vx, vy, names)
    for field in ("weights", "bias", "scale", "shift", "thresholds"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert a.report == b.report
    assert a.names == ["Clean", "Noisy"] and "Rare" in a.report["skipped"]
    rows = a.report["attributes"]
    assert rows["Clean"]["balanced_accuracy"] > 0.95 > rows["Noisy"]["balanced_accuracy"] > 0.7
    assert rows["Clean"]["majority_balanced_accuracy"] == 0.5 and rows["Clean"]["held_out"] == 600
    p = a.probabilities(vx)
    assert p.shape == (600, 2) and 0 <= p.min() and p.max() <= 1
    assert balanced_accuracy(vy[:, 0], p[:, 0] >= a.thresholds[0]) == pytest.approx(rows["Clean"]["balanced_accuracy"], abs=1e-4)


def test_save_and_load_round_trip_without_pickles(tmp_path):
    tx, ty = _synthetic(500, 8, 2)
    vx, vy = _synthetic(200, 8, 3)
    probe = fit(tx, ty[:, :2], vx, vy[:, :2], ["A", "B"], embed_model={"path": "/m/clip.safetensors", "sha256": "ab" * 32})
    probe.save(str(tmp_path / "probe"))
    assert sorted(p.name for p in (tmp_path / "probe").iterdir()) == [META_FILE, WEIGHTS_FILE]
    loaded = AttributeProbe.load(str(tmp_path / "probe"))
    assert loaded.names == ["A", "B"] and loaded.embed_model == probe.embed_model and loaded.report == probe.report
    assert np.array_equal(loaded.probabilities(vx), probe.probabilities(vx))
    with pytest.raises(ValueError, match="not a saved attribute probe"):
        AttributeProbe.load(str(tmp_path))


def test_fingerprints_compare_by_sha256_then_by_id():
    assert same_embed_model({"sha256": "a", "path": "/x"}, {"sha256": "a", "path": "/y"})
    assert not same_embed_model({"sha256": "a"}, {"sha256": "b"})
    assert same_embed_model({"id": "ViT-B-32/openai", "sha256": None}, {"id": "ViT-B-32/openai", "sha256": None})
    assert not same_embed_model({"id": "ViT-B-32/openai"}, {"id": "ViT-L-14/openai"})


def test_a_label_is_doubted_only_against_a_confident_probe():
    probabilities = {"Male": 0.99, "Young": 0.97, "Eyeglasses": 0.5, "Smiling": 0.01}
    labels = {"Male": False, "Young": True, "Eyeglasses": False, "Smiling": True}
    assert doubts(labels, probabilities, 0.95) == (
        {"attribute": "Male", "label": False, "probability": 0.99},
        {"attribute": "Smiling", "label": True, "probability": 0.01},
    )
    assert doubts(labels, probabilities, 0.995) == ()


def test_the_probe_leaves_inputs_that_are_not_faces_alone(tmp_path):
    from prep.schemas.records import Sample
    from prep.transforms.attribute_predict import ApplyAttributeProbe

    tx, ty = _synthetic(300, 8, 6)
    vx, vy = _synthetic(100, 8, 7)
    fit(tx, ty[:, :2], vx, vy[:, :2], ["Male", "Young"]).save(str(tmp_path / "probe"))
    fn = ApplyAttributeProbe(str(tmp_path / "probe"), 0.95, ". ")
    fn.setup()
    emb = np.asarray(vx[0], np.float32)
    dog = Sample(key="lsun_a", source="lsun", domain="specific", path="x#a", embedding=emb, caption_vlm="a dog",
                 caption="a dog")
    face = dog.with_(key="folder_a_1", source="folder")
    assert list(fn.process(dog)) == [dog]  # no face attributes on an object
    [out] = fn.process(face)
    assert out.attributes_source == "predicted" and set(out.attributes) == {"Male", "Young"}
    assert out.caption_contradictions == ()  # the VLM-against-labels check is for labels


# ------------------------------------------------------------------------ on real runs


def _run(inputs: list[str], out: Path, tiny_cache: str, **overrides) -> dict:
    from prep.pipeline.config import RunConfig
    from prep.pipeline.run import run

    return run(RunConfig(inputs=inputs, out=str(out), preset="tiny", model_cache=tiny_cache, samples_per_shard=50,
                         **overrides), [])


def _samples(out: Path) -> dict[str, dict]:
    import webdataset as wds

    found = {}
    for tar in sorted(out.rglob("*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False):
            found[s["__key__"]] = {"json": json.loads(s["json"]), "emb": np.load(__import__("io").BytesIO(s["emb.npy"]))}
    return found


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, tiny, tiny_cache):
    """A labelled CelebA-layout output big enough for val identities, and a probe fit on it."""
    from prep.demo import write_demo_data

    root = tmp_path_factory.mktemp("probe-data")
    data = write_demo_data(str(root / "data"), identities=60, images_per_identity=3, general_shards=0,
                           lsun_records=0, seed=5)
    out = root / "out"
    _run([f"celeba:{data['celeba_dir']}"], out, tiny_cache)
    probe = fit_output(str(out), min_count=2)
    probe.save(str(root / "probe"))
    return {"data": data, "out": out, "probe": root / "probe", "fitted": probe}


@pytest.mark.slow
def test_fit_output_measures_on_other_identities(labelled):
    report = labelled["fitted"].report
    assert report["train_samples"] > report["val_samples"] > 0 and report["test_samples"] > 0
    assert labelled["fitted"].embed_model["sha256"]
    again = fit_output(str(labelled["out"]), min_count=2)
    assert again.report == report and np.array_equal(again.weights, labelled["fitted"].weights)


@pytest.mark.slow
def test_unlabelled_faces_get_predicted_attribute_captions(labelled, tiny_cache, tmp_path):
    from prep.schemas.validate import validate_output
    from prep.transforms.attributes import attribute_caption, join_captions

    folder = tmp_path / "faces"
    images = sorted(Path(labelled["data"]["celeba_dir"], "img_align_celeba").glob("*.jpg"))
    for person, picked in (("ann", images[:2]), ("ben", images[3:5])):
        (folder / person).mkdir(parents=True)
        for path in picked:
            shutil.copy(path, folder / person / path.name)
    out = tmp_path / "out"
    _run([f"folder:{folder}"], out, tiny_cache, attribute_model=str(labelled["probe"]))
    probe = AttributeProbe.load(str(labelled["probe"]))
    samples = _samples(out)
    assert len(samples) == 4
    for key, s in samples.items():
        meta = s["json"]
        expected, probabilities = probe.predict(s["emb"])
        assert meta["attributes_source"] == "predicted" and meta["attributes"] == expected, key
        assert meta["attribute_probabilities"] == probabilities
        assert meta["caption_attributes"] == attribute_caption(expected)  # phrased as label-made captions
        assert meta["caption"] == join_captions(meta["caption_vlm"], meta["caption_attributes"])
    assert validate_output(str(out)).ok


@pytest.mark.slow
def test_a_planted_mislabel_is_doubted_and_counted(labelled, tiny_cache, tmp_path):
    """Flip one label the probe is sure of, in a copy of the attribute file: that label, and only
    a label the probe contradicts, is doubted; the labels written are the file's."""
    probe = AttributeProbe.load(str(labelled["probe"]))
    clean = _samples(labelled["out"])
    best = None
    for key, s in sorted(clean.items()):
        _, p = probe.predict(s["emb"])
        for name, value in p.items():
            label = s["json"]["attributes"][name]
            confidence = value if label else 1 - value
            if confidence >= 0.99 and (best is None or confidence > best[0]):
                best = (confidence, key, name, label)
    assert best is not None, "the probe is sure of no label on this data"
    _, key, name, label = best
    data = tmp_path / "celeba"
    shutil.copytree(labelled["data"]["celeba_dir"], data)
    attr_file = data / "list_attr_celeba.txt"
    lines = attr_file.read_text().splitlines()
    names = lines[1].split()
    stem = key.split("_", 1)[1]
    for i, line in enumerate(lines[2:], start=2):
        fields = line.split()
        if fields[0].startswith(stem + "."):
            fields[1 + names.index(name)] = "-1" if label else "1"
            lines[i] = fields[0] + "".join(f" {v:>2}" for v in fields[1:])
    attr_file.write_text("\n".join(lines) + "\n")

    out = tmp_path / "out"
    manifest = _run([f"celeba:{data}"], out, tiny_cache, attribute_model=str(labelled["probe"]))
    samples = _samples(out)
    planted = samples[key]["json"]
    assert planted["attributes"][name] is (not label)  # the file's label, never changed
    assert {"attribute": name, "label": not label, "probability": planted["attribute_probabilities"][name]} \
        in planted["attribute_doubts"]
    for s in samples.values():  # every doubt is a confident contradiction of the sample's own label
        for d in s["json"].get("attribute_doubts", []):
            assert s["json"]["attributes"][d["attribute"]] is d["label"]
            assert (d["probability"] >= 0.95) if not d["label"] else (d["probability"] <= 0.05)
    total = sum(len(s["json"].get("attribute_doubts", [])) for s in samples.values())
    assert sum(manifest["attribute_doubts"].values()) == total and manifest["attribute_doubts"][name] >= 1
    assert all(s["json"]["attributes_source"] == "labels" for s in samples.values())

    from prep.report import inspect_output

    inspect_output(str(out), str(tmp_path / "report.html"), samples=4)
    page = (tmp_path / "report.html").read_text()
    assert '<section id="doubts">' in page and key in page[page.index('<section id="doubts">'):]


def test_a_probe_of_another_embedding_model_is_refused_before_out_is_touched(tmp_path, tiny_cache, demo):
    tx, ty = _synthetic(200, 32, 4)
    vx, vy = _synthetic(100, 32, 5)
    other = fit(tx, ty[:, :2], vx, vy[:, :2], ["Male", "Young"],
                embed_model={"id": "ViT-L-14/openai", "file": "/hub/open_clip_model.safetensors", "sha256": "cd" * 32})
    other.save(str(tmp_path / "probe"))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "prep.cli", "run", "--input", f"celeba:{demo['celeba_dir']}",
                           "--preset", "tiny", "--model-cache", tiny_cache, "--out", str(out),
                           "--attribute-model", str(tmp_path / "probe")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "ViT-L-14/openai" in proc.stderr and "prep-tiny-clip" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()
