"""`prep diff A B` (report/diff.py) on outputs that differ in captions, refs and membership, and
on two identical ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prep.cli import app
from prep.report.diff import diff_outputs, format_diff

cli = CliRunner()


def test_identical_outputs_say_so_in_one_line(pipeline_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(pipeline_run["out"], copy)
    result = cli.invoke(app, ["diff", pipeline_run["out"], str(copy)])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    total = pipeline_run["manifest"]["counts"]["specific"] + pipeline_run["manifest"]["counts"]["general"]
    assert len(lines) == 1 and f"are identical: {total} samples" in lines[0]


@pytest.fixture(scope="module")
def other_run(demo, tiny_cache, tmp_path_factory):
    """The demo again with a caption prompt, other refs (seed) and a dropped input tar: captions,
    refs and membership all change."""
    from conftest import demo_config
    from prep.pipeline.run import run

    out = tmp_path_factory.mktemp("diff-other") / "out"
    general = sorted(Path(demo["general_pattern"]).parent.glob("*.tar"))
    assert len(general) == 2
    manifest = run(demo_config(demo, str(out), tiny_cache, caption_prompt="a photo of", seed=5, caption_on_bad="keep",
                               inputs=[f"celeba:{demo['celeba_dir']}", f"wds:{general[0]}"]), [])
    assert manifest["reconciled"]
    return out


def test_captions_refs_and_membership_that_changed_are_reported(pipeline_run, other_run):
    report = diff_outputs(pipeline_run["out"], str(other_run))
    assert not report.identical
    # The second general tar is gone: its samples are removed, nothing is added.
    assert report.removed and all(k.startswith("wds_") for k in report.removed) and report.added == []
    assert report.counts["general"]["a"] - report.counts["general"]["b"] == len(report.removed)
    assert report.counts["specific"]["a"] == report.counts["specific"]["b"]
    # The prompt changes the VLM caption (and so the joined caption and txt) of specific samples.
    for name in ("json.caption_vlm", "json.caption", "txt"):
        assert report.changed.get(name, 0) > 0, (name, report.changed)
    example = report.examples["json.caption_vlm"][0]
    assert example["a"] != example["b"] and example["key"].startswith("celeba_")
    # Another seed picks other refs for some samples: ref_keys and the refs array change together.
    assert report.changed.get("json.ref_keys", 0) > 0 and report.changed.get("refs.npy", 0) >= report.changed["json.ref_keys"]
    # What did not change is not reported: the images and embeddings are the same.
    assert "jpg" not in report.changed and "emb.npy" not in report.changed
    text = format_diff(report)
    assert "changed caption_vlm:" in text and "removed: wds_" in text and "general" in text


def test_diff_json_and_exit_codes(pipeline_run, other_run, tmp_path):
    result = cli.invoke(app, ["diff", pipeline_run["out"], str(other_run), "--json", "--examples", "1"])
    assert result.exit_code == 1
    data = json.loads(result.output)
    assert data["identical"] is False and data["removed"] and all(len(v) <= 1 for v in data["examples"].values())
    missing = cli.invoke(app, ["diff", pipeline_run["out"], str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "not an output of `prep run`" in missing.output
