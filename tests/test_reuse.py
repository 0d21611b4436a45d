"""`--reuse PREV_OUT` (pipeline/reuse.py): for each kind of change, the shards are byte-identical
to a fresh run of the new configuration, and only what changed is computed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import assert_same_output, demo_config
from prep.pipeline.run import run

pytestmark = pytest.mark.slow


def _stages(manifest: dict) -> dict:
    return {stage: (s["reused"], s["computed"]) for stage, s in manifest["reused_from"]["stages"].items()}


def _run_both(demo, tiny_cache, tmp_path, prev: str, **changes) -> tuple[dict, dict]:
    fresh = run(demo_config(demo, str(tmp_path / "fresh"), tiny_cache, **changes), [])
    reused = run(demo_config(demo, str(tmp_path / "reused"), tiny_cache, reuse=prev, **changes), [])
    assert_same_output(str(tmp_path / "fresh"), str(tmp_path / "reused"))
    assert reused["counts"] == fresh["counts"] and reused["reconciled"]
    return fresh, reused


def test_nothing_changed_reuses_every_stage(pipeline_run, demo, tiny_cache, tmp_path):
    out = tmp_path / "again"
    manifest = run(demo_config(demo, str(out), tiny_cache, reuse=pipeline_run["out"]), [])
    assert_same_output(pipeline_run["out"], str(out))
    n = manifest["counts"]["specific"]
    assert _stages(manifest) == {"caption": (n, 0), "mask": (n, 0), "embed": (n, 0)}
    prev = json.loads((Path(pipeline_run["out"]) / "manifest.json").read_bytes())
    assert manifest["reused_from"]["out"] == pipeline_run["out"] and len(manifest["reused_from"]["manifest_sha256"]) == 64
    assert prev["stage_fingerprints"] == manifest["stage_fingerprints"]
    written = json.loads((out / "manifest.json").read_text())
    assert written["reused_from"] == manifest["reused_from"]


def test_a_new_caption_prompt_recomputes_captions_only(pipeline_run, demo, tiny_cache, tmp_path):
    _, reused = _run_both(demo, tiny_cache, tmp_path, pipeline_run["out"], caption_prompt="a picture showing",
                          caption_on_bad="keep")
    n = reused["counts"]["specific"]
    assert _stages(reused) == {"caption": (0, n), "mask": (n, 0), "embed": (n, 0)}


def test_a_new_mask_setting_recomputes_mask_and_embed(pipeline_run, demo, tiny_cache, tmp_path):
    _, reused = _run_both(demo, tiny_cache, tmp_path, pipeline_run["out"], mask_threshold=0.4)
    n = reused["counts"]["specific"]
    assert _stages(reused) == {"caption": (n, 0), "mask": (0, n), "embed": (0, n)}


def test_a_replaced_input_is_recomputed_and_the_rest_reused(pipeline_run, demo, tiny_cache, tmp_path):
    data = tmp_path / "celeba"
    shutil.copytree(demo["celeba_dir"], data)
    images = sorted((data / "img_align_celeba").glob("*.jpg"))
    first, second = images[0].read_bytes(), images[1].read_bytes()
    images[0].write_bytes(second)  # two inputs replaced by other pictures
    images[1].write_bytes(first)
    changed = {**demo, "celeba_dir": str(data)}
    _, reused = _run_both(changed, tiny_cache, tmp_path, pipeline_run["out"])
    n = reused["counts"]["specific"]
    assert _stages(reused) == {"caption": (n - 2, 2), "mask": (n - 2, 2), "embed": (n - 2, 2)}


def test_a_damaged_or_older_prev_out_is_recomputed_never_reused(pipeline_run, demo, tiny_cache, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(pipeline_run["out"], damaged)
    shard = sorted((damaged / "specific").glob("*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[: len(shard.read_bytes()) // 3])  # truncated mid-tar
    out = tmp_path / "from-damaged"
    manifest = run(demo_config(demo, str(out), tiny_cache, reuse=str(damaged)), [])
    assert_same_output(pipeline_run["out"], str(out))
    stages = _stages(manifest)
    assert all(computed > 0 and reused + computed == manifest["counts"]["specific"] for reused, computed in stages.values())

    older = tmp_path / "older"
    shutil.copytree(pipeline_run["out"], older)
    prev = json.loads((older / "manifest.json").read_text())
    del prev["stage_fingerprints"]  # as written before fingerprints were recorded
    (older / "manifest.json").write_text(json.dumps(prev))
    out = tmp_path / "from-older"
    manifest = run(demo_config(demo, str(out), tiny_cache, reuse=str(older)), [])
    assert_same_output(pipeline_run["out"], str(out))
    assert all(reused == 0 for reused, _ in _stages(manifest).values())
    assert any("before stage fingerprints" in note for note in manifest["reused_from"]["notes"])


def test_a_new_identity_threshold_recomputes_only_verification_and_pairing(pipeline_run, demo, tiny_cache, tmp_path):
    fresh, reused = _run_both(demo, tiny_cache, tmp_path, pipeline_run["out"], identity_threshold=0.3)
    n = reused["counts"]["specific"]
    assert _stages(reused) == {"caption": (n, 0), "mask": (n, 0), "embed": (n, 0)}
    assert fresh["identity"]["totals"] != pipeline_run["manifest"]["identity"]["totals"]  # the threshold mattered


def test_reusing_the_output_itself_replaces_it_only_once_complete(pipeline_run, demo, tiny_cache, tmp_path):
    from prep.pipeline.run import IN_PLACE_SUFFIX, OutputExists

    out = tmp_path / "out"
    shutil.copytree(pipeline_run["out"], out)
    changes = dict(caption_prompt="a picture showing", caption_on_bad="keep")
    fresh = tmp_path / "fresh"
    run(demo_config(demo, str(fresh), tiny_cache, **changes), [])
    manifest = run(demo_config(demo, str(out), tiny_cache, reuse=str(out), **changes), [])
    assert_same_output(str(fresh), str(out))
    n = manifest["counts"]["specific"]
    assert _stages(manifest) == {"caption": (0, n), "mask": (n, 0), "embed": (n, 0)}
    written = json.loads((out / "manifest.json").read_text())
    assert written["config"]["out"] == str(out) and written["reused_from"]["in_place"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "out"]  # no staging folder left
    assert not Path(str(out) + IN_PLACE_SUFFIX).exists()

    (out / "notes.txt").write_text("mine")  # a file of the user's would not follow the rename
    with pytest.raises(OutputExists, match="not prep's"):
        run(demo_config(demo, str(out), tiny_cache, reuse=str(out)), [])


def test_reuse_of_an_object_store_output_in_place_is_refused(demo, tiny_cache):
    config = demo_config(demo, "gs://bucket/out", tiny_cache, reuse="gs://bucket/out")
    with pytest.raises(ValueError, match="local folders only"):
        config.validate()
