"""Stage fingerprints (pipeline/reuse.py): each changes with exactly what decides its stage's
output, and embed follows the mask."""

from __future__ import annotations

from prep.pipeline.reuse import STAGE_VERSIONS, stage_fingerprints

CONFIG = {"caption_prompt": None, "caption_max_new_tokens": 30, "caption_num_beams": 1, "caption_on_bad": "drop",
          "caption_batch_size": 8, "device": "auto", "trust_remote_code": False, "mask_threshold": 0.5,
          "mask_batch_size": 8, "mask_fill": [255, 255, 255], "embed_batch_size": 32, "identity_threshold": None,
          "refs_per_sample": 4, "seed": 0}
MODELS = {stage: {"fingerprint": {"path": f"/cache/{stage}", "sha256": stage * 8}} for stage in ("caption", "mask", "embed")}


def changed(config=None, models=None, min_fraction=0.01) -> set[str]:
    base = stage_fingerprints(CONFIG, MODELS, 0.01)
    other = stage_fingerprints({**CONFIG, **(config or {})}, {**MODELS, **(models or {})}, min_fraction)
    return {stage for stage in base if base[stage] != other[stage]}


def test_each_stage_follows_what_decides_it():
    assert changed() == set()
    assert changed({"caption_prompt": "a photo of"}) == {"caption"}
    assert changed({"caption_batch_size": 4}) == {"caption"}  # a padded stage's output may depend on its batch
    assert changed({"mask_threshold": 0.4}) == {"mask", "embed"}  # embed reads the mask
    assert changed(min_fraction=0.05) == {"mask", "embed"}
    assert changed({"mask_fill": [0, 0, 0]}) == {"embed"}
    assert changed({"device": "cuda"}) == {"caption", "mask", "embed"}
    assert changed({"identity_threshold": 0.3, "refs_per_sample": 2, "seed": 1}) == set()  # pairing always reruns
    assert changed(models={"mask": {"fingerprint": {"path": "/other/mask", "sha256": "new" * 8}}}) == {"mask", "embed"}


def test_weights_count_by_sha256_not_by_where_they_are():
    moved = {stage: {"fingerprint": {"path": f"/elsewhere/{stage}", "sha256": stage * 8}} for stage in MODELS}
    assert changed(models=moved) == set()
    unknown = stage_fingerprints(CONFIG, {**MODELS, "caption": {"fingerprint": {}}}, 0.01)
    assert unknown["caption"] is None  # no stable identity: never reused


def test_a_stage_version_bump_changes_its_fingerprint(monkeypatch):
    before = stage_fingerprints(CONFIG, MODELS, 0.01)
    monkeypatch.setitem(STAGE_VERSIONS, "caption", STAGE_VERSIONS["caption"] + 1)
    after = stage_fingerprints(CONFIG, MODELS, 0.01)
    assert before["caption"] != after["caption"] and before["mask"] == after["mask"]
