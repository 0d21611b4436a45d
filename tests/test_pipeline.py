"""Level 2: the whole pipeline on the DirectRunner's in-memory runner with the tiny preset,
asserting the values in the shards, not just that the run finished."""

from __future__ import annotations

import glob
import io
import json
import os

import numpy as np
import pytest
import torch
from apache_beam.testing.test_pipeline import TestPipeline
from PIL import Image

from conftest import assert_same_output, demo_config, fn_api_runner
from prep.pipeline.build import build_pipeline, plan_run
from prep.pipeline.run import OutputExists, run
from prep.schemas import contract
from prep.schemas.validate import validate_output
from prep.transforms.attributes import attribute_caption, join_captions
from prep.transforms.embed import load_clip
from prep.transforms.mask import load_mask, masked_image


def read_domain(out: str, domain: str) -> dict[str, dict]:
    samples = {}
    for path in sorted(glob.glob(os.path.join(out, domain, "*.tar"))):
        with open(path, "rb") as f:
            for raw in contract.iter_samples(f):
                samples[raw["__key__"]] = contract.decode_sample(raw)
    return samples


@pytest.fixture(scope="module")
def shards(pipeline_run):
    out = pipeline_run["out"]
    return read_domain(out, "specific"), read_domain(out, "general")


def test_output_is_valid_and_counts_reconcile(pipeline_run, demo):
    report = validate_output(pipeline_run["out"])
    assert report.ok, report.problems
    counts = pipeline_run["manifest"]["counts"]
    expected_specific = demo["images"]  # decodable images only
    assert counts == {
        "inputs": demo["images"] + demo["corrupt"] + demo["general_samples"],
        "specific": expected_specific,
        "general": demo["general_samples"],
        "dead_lettered": demo["corrupt"],
    }
    assert pipeline_run["manifest"]["reconciled"] is True
    # The demo's partition file puts 4 identities in train, 1 in val, 1 in test (4 images
    # each); samples_per_shard=7: train 16 -> shards of 7, 7, 2.
    sizes = {
        split: json.load(open(os.path.join(pipeline_run["out"], *sub, "specific", "sizes.json")))
        for split, sub in (("train", ()), ("val", ("val",)), ("test", ("test",)))
    }
    assert {k: list(v.values()) for k, v in sizes.items()} == {"train": [7, 7, 2], "val": [4], "test": [4]}
    assert pipeline_run["manifest"]["splits"] == {"test": 4, "train": 17, "val": 4}  # + the corrupt image


def test_splits_hold_whole_identities_from_the_partition_file(pipeline_run, demo):
    out = pipeline_run["out"]
    partition = dict(line.split() for line in open(os.path.join(demo["celeba_dir"], "list_eval_partition.txt")))
    names = {"0": "train", "1": "val", "2": "test"}
    identities = {}
    for split, folder in (("train", out), ("val", os.path.join(out, "val")), ("test", os.path.join(out, "test"))):
        for key, s in read_domain(folder, "specific").items():
            assert names[partition[key.split("_", 1)[1] + ".jpg"]] == split, key
            identities.setdefault(s["json"]["identity"], set()).add(split)
            for ref in s["json"]["ref_keys"]:
                assert names[partition[ref.split("_", 1)[1] + ".jpg"]] == split  # refs stay in the split
    assert len(identities) == 6 and all(len(v) == 1 for v in identities.values())
    assert {s["split"] for s in pipeline_run["manifest"]["shards"] if s["domain"] == "specific"} == {"train", "val", "test"}


def test_corrupt_image_is_dead_lettered_with_reason(pipeline_run):
    lines = [json.loads(l) for l in open(os.path.join(pipeline_run["out"], "dead_letter", "000000.jsonl"))]
    assert len(lines) == 1
    (letter,) = lines
    assert letter["stage"] == "decode" and letter["source"] == "celeba"
    assert letter["reason"].startswith("not a decodable image")
    assert letter["key"].startswith("celeba_")
    assert pipeline_run["manifest"]["dead_letter_reasons"] == {"decode: not a decodable image": 1}


def test_embedding_equals_open_clip_on_masked_shard_image(shards, tiny):
    specific, _ = shards
    net, preprocess = load_clip(tiny.clip_config, tiny.clip_weights)
    for key in sorted(specific)[:6]:
        s = specific[key]
        image = Image.open(io.BytesIO(s["jpg"])).convert("RGB")
        x = preprocess(masked_image(image, load_mask(s["mask.png"]), (255, 255, 255))).unsqueeze(0)
        with torch.inference_mode():
            expected = torch.nn.functional.normalize(net.encode_image(x), dim=-1)[0].numpy()
        np.testing.assert_allclose(s["emb.npy"], expected, atol=1e-5, err_msg=key)


def test_masks_are_binary_and_image_sized(shards):
    specific, _ = shards
    for key, s in specific.items():
        mask = Image.open(io.BytesIO(s["mask.png"]))
        image = Image.open(io.BytesIO(s["jpg"]))
        assert mask.mode == "L" and mask.size == image.size, key
        assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}, key


def test_refs_are_same_identity_never_self_and_equal_embeddings(pipeline_run):
    out = pipeline_run["out"]
    specific = {**read_domain(out, "specific"), **read_domain(os.path.join(out, "val"), "specific"),
                **read_domain(os.path.join(out, "test"), "specific")}
    assert len(specific) == 24
    per_identity: dict[str, int] = {}
    for s in specific.values():
        per_identity[s["json"]["identity"]] = per_identity.get(s["json"]["identity"], 0) + 1
    for key, s in specific.items():
        meta = s["json"]
        ref_keys = meta["ref_keys"]
        assert key not in ref_keys
        assert len(ref_keys) == len(set(ref_keys)) == min(2, per_identity[meta["identity"]] - 1)
        assert s["refs.npy"].shape == (len(ref_keys), s["emb.npy"].shape[0])
        for row, ref in zip(s["refs.npy"], ref_keys):
            assert specific[ref]["json"]["identity"] == meta["identity"]
            assert np.array_equal(row, specific[ref]["emb.npy"])


def test_captions_join_vlm_and_attribute_parts(shards):
    specific, _ = shards
    for key, s in specific.items():
        meta = s["json"]
        assert meta["attributes"] is not None and len(meta["attributes"]) == 40
        assert meta["caption_attributes"] == attribute_caption(meta["attributes"])
        assert meta["caption_vlm"]
        assert meta["caption"] == join_captions(meta["caption_vlm"], meta["caption_attributes"]) == s["txt"]


def test_general_samples_get_null_embedding_and_their_text(shards, demo):
    import webdataset as wds

    _, general = shards
    given = {}
    for sample in wds.WebDataset(demo["general_pattern"], shardshuffle=False, empty_check=False):
        given["wds_" + sample["__key__"]] = sample["txt"].decode("utf-8").strip()
    assert set(general) == set(given)
    for key, s in general.items():
        assert not s["emb.npy"].any() and s["emb.npy"].dtype == np.float32
        assert s["refs.npy"].shape == (0, s["emb.npy"].shape[0])
        assert "mask.png" not in s
        assert s["txt"] == given[key] and s["json"]["identity"] is None and s["json"]["caption_vlm"] is None


def test_manifest_records_models_sources_and_shards(pipeline_run, tiny):
    m = pipeline_run["manifest"]
    assert m["schema_version"] == 1 and m["embedding_dim"] == 32
    assert m["models"]["caption"]["model"] == tiny.captioner
    assert len(m["models"]["embed"]["fingerprint"]["sha256"]) == 64
    assert m["config"]["refs_per_sample"] == 2
    celeba = [s for s in m["sources"] if s["kind"] == "celeba"][0]
    assert celeba["items"] == 25  # 24 images + 1 corrupt, all with identity lines
    assert {s["domain"] for s in m["shards"]} == {"specific", "general"}


def test_testpipeline_rerun_is_byte_identical(pipeline_run, demo, tiny_cache, tmp_path):
    """The same input and config, built on a TestPipeline, give byte-identical shards."""
    out = str(tmp_path / "again")
    plan = plan_run(demo_config(demo, out, tiny_cache))
    with TestPipeline(runner=fn_api_runner()) as p:
        build_pipeline(p, plan)
    first = pipeline_run["out"]
    names = assert_same_output(first, out)
    assert any(n.endswith(".tar") for n in names)


def test_existing_output_is_refused_without_overwrite(pipeline_run, demo, tiny_cache):
    with pytest.raises(OutputExists, match="--overwrite"):
        run(demo_config(demo, pipeline_run["out"], tiny_cache), [])


def test_folder_source_and_max_side(tmp_path, tiny_cache, tiny):
    """folder:DIR identities from subfolders; --max-side downscales what models and shards see."""
    root = tmp_path / "objects"
    rng = np.random.default_rng(3)
    for ident in ("dog_a", "dog_b"):
        (root / ident).mkdir(parents=True)
        for i in range(2):
            arr = rng.integers(0, 255, (120, 200, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / ident / f"img {i}.png")
    out = str(tmp_path / "out")
    from prep.pipeline.config import RunConfig

    manifest = run(
        RunConfig(inputs=[f"folder:{root}"], out=out, preset="tiny", model_cache=tiny_cache, max_side=64,
                  embed_batch_size=2, caption_batch_size=2),
        [],
    )
    assert manifest["counts"]["specific"] == 4 and manifest["reconciled"]
    specific = read_domain(out, "specific")
    for key, s in specific.items():
        assert s["json"]["identity"] in ("dog_a", "dog_b")
        assert (s["json"]["width"], s["json"]["height"]) == (64, 38)
        assert s["json"]["attributes"] is None and s["json"]["caption_attributes"] is None
        assert s["txt"] == s["json"]["caption_vlm"]
        assert len(s["json"]["ref_keys"]) == 1
    assert validate_output(out).ok


def test_items_staged_in_files_give_the_same_shards(pipeline_run, demo, tiny_cache, tmp_path, monkeypatch):
    """A plan too large to inline reads its items from OUT/_plan/*.jsonl: same output."""
    import prep.pipeline.items as items

    monkeypatch.setattr(items, "INLINE_ITEMS", 3)
    out = tmp_path / "staged"
    run(demo_config(demo, str(out), tiny_cache), [])
    assert sorted(p.name for p in (out / "_plan").iterdir()) == ["items-00000.jsonl"]
    first = pipeline_run["out"]
    for tar in sorted(glob.glob(os.path.join(first, "**", "*.tar"), recursive=True)):
        rel = os.path.relpath(tar, first)
        assert open(tar, "rb").read() == open(os.path.join(out, rel), "rb").read(), rel
    assert validate_output(str(out)).ok
