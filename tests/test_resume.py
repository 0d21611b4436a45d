"""Kills and reruns: a run killed with SIGKILL mid-write, rerun, gives output byte-identical to
an uninterrupted run; a partial run of another config is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import demo_config
from prep.pipeline.run import OutputExists, run
from prep.schemas.validate import validate_output


def _cli_args(demo: dict, out: Path, tiny_cache: str) -> list[str]:
    """The same run as conftest.demo_config, through the CLI."""
    return [
        sys.executable, "-m", "prep.cli", "run",
        "--input", f"celeba:{demo['celeba_dir']}", "--input", f"wds:{demo['general_pattern']}",
        "--preset", "tiny", "--model-cache", tiny_cache, "--out", str(out),
        "--samples-per-shard", "7", "--refs-per-sample", "2", "--embed-batch-size", "4", "--caption-batch-size", "4",
        "--no-progress", "--workers", "1",  # PREP_FAULT kills the process that runs the DoFns: keep it this one
    ]


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in ("manifest.json", "_run.json")  # these name the output folder
    }


@pytest.mark.parametrize("fault", ["write.after_tar:2", "write.before_rename:3"])
def test_sigkilled_run_resumes_to_byte_identical_output(fault, pipeline_run, demo, tiny_cache, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "PREP_FAULT": fault}
    proc = subprocess.run(_cli_args(demo, out, tiny_cache), env=env, capture_output=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not (out / "manifest.json").exists()
    left = [p.name for p in out.rglob("*") if p.is_file()]
    assert any(n.endswith(".tar") or ".tmp-" in n for n in left), left  # it died while writing

    manifest = run(demo_config(demo, str(out), tiny_cache), [])  # no --overwrite: resumes
    if fault.startswith("write.after_tar"):
        assert manifest["resumed"]["kept_shards"] >= 1  # the first complete shard was not redone
    clean = Path(pipeline_run["out"])
    assert _files(out) == _files(clean)
    ours, theirs = json.loads((out / "manifest.json").read_text()), json.loads((clean / "manifest.json").read_text())
    assert ours["shards"] == theirs["shards"] and ours["counts"] == theirs["counts"]
    assert validate_output(str(out)).ok


def test_partial_run_of_another_config_is_refused(demo, tiny_cache, tmp_path):
    out = tmp_path / "partial"
    env = {**os.environ, "PREP_FAULT": "write.after_tar:1"}
    proc = subprocess.run(_cli_args(demo, out, tiny_cache), env=env, capture_output=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL
    with pytest.raises(OutputExists, match=r"partial run that differs: --refs-per-sample 2 -> 3;"):
        run(demo_config(demo, str(out), tiny_cache, refs_per_sample=3), [])
    manifest = run(demo_config(demo, str(out), tiny_cache, refs_per_sample=3, overwrite=True), [])
    assert manifest["reconciled"] and "resumed" not in manifest


def test_retry_dead_letter_redoes_only_failed_inputs_and_merges_them(demo, tiny_cache, tmp_path):
    import shutil

    from test_pipeline import read_domain

    celeba = tmp_path / "celeba"
    shutil.copytree(demo["celeba_dir"], celeba)
    images = sorted((celeba / "img_align_celeba").glob("*.jpg"))
    broken = {p: p.read_bytes() for p in images[:2]}  # two "half-downloaded" files
    for path in broken:
        path.write_bytes(b"\xff\xd8\xff\xe0 cut short")
    out = tmp_path / "out"

    def config(**kw):
        return demo_config(demo, str(out), tiny_cache, inputs=[f"celeba:{celeba}", f"wds:{demo['general_pattern']}"], **kw)

    first = run(config(), [])
    assert first["counts"]["dead_lettered"] == 2 + demo["corrupt"]
    shards_before = {(s["split"], s["domain"], s["name"]): s["sha256"] for s in first["shards"]}

    for path, data in broken.items():  # re-downloaded
        path.write_bytes(data)
    with pytest.raises(OutputExists, match="retry-dead-letter"):
        run(config(), [])
    second = run(config(), [], retry_dead_letter=True)
    assert second["retried"] == 2 + demo["corrupt"]
    assert second["counts"]["inputs"] == first["counts"]["inputs"]
    assert second["counts"]["dead_lettered"] == demo["corrupt"]  # the really corrupt one stays dead
    assert second["counts"]["specific"] == first["counts"]["specific"] + 2
    assert second["reconciled"]
    after = {(s["split"], s["domain"], s["name"]): s["sha256"] for s in second["shards"]}
    assert all(after[k] == v for k, v in shards_before.items())  # existing shards untouched
    assert len(after) > len(shards_before)  # the retried samples are in new shards
    dead = [json.loads(l) for l in (out / "dead_letter" / "000000.jsonl").read_text().splitlines()]
    assert len(dead) == demo["corrupt"]
    retried_keys = {f"celeba_{p.stem}" for p in broken}
    found = {}
    for folder in (out, out / "val", out / "test"):
        found.update(read_domain(str(folder), "specific"))
    assert retried_keys <= set(found)
    for key in retried_keys:
        for ref in found[key]["json"]["ref_keys"]:
            assert found[ref]["json"]["identity"] == found[key]["json"]["identity"]
    assert validate_output(str(out)).ok, validate_output(str(out)).problems


def _broken_copy(demo, tmp_path):
    import shutil

    celeba = tmp_path / "celeba"
    shutil.copytree(demo["celeba_dir"], celeba)
    images = sorted((celeba / "img_align_celeba").glob("*.jpg"))
    broken = {p: p.read_bytes() for p in images[:2]}
    for path in broken:
        path.write_bytes(b"\xff\xd8\xff\xe0 cut short")
    return celeba, broken


def test_a_killed_retry_reruns_to_the_same_result(demo, tiny_cache, tmp_path):
    """The retry rewrites the dead letters before its manifest: killed in between, a rerun of
    the retry must still redo the same inputs (its plan is saved), losing nothing."""
    celeba, broken = _broken_copy(demo, tmp_path)
    out = tmp_path / "out"
    config = demo_config(demo, str(out), tiny_cache, inputs=[f"celeba:{celeba}", f"wds:{demo['general_pattern']}"])
    first = run(config, [])
    for path, data in broken.items():
        path.write_bytes(data)
    args = _cli_args(demo, out, tiny_cache)
    args[args.index(f"celeba:{demo['celeba_dir']}")] = f"celeba:{celeba}"
    proc = subprocess.run(args + ["--retry-dead-letter"], env={**os.environ, "PREP_FAULT": "manifest.before_write:1"},
                          capture_output=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert (out / "_retry.json").exists()
    second = run(config, [], retry_dead_letter=True)
    assert second["retried"] == 2 + demo["corrupt"]
    assert second["counts"]["specific"] == first["counts"]["specific"] + 2
    assert second["counts"]["dead_lettered"] == demo["corrupt"] and second["reconciled"]
    assert not (out / "_retry.json").exists()
    assert validate_output(str(out)).ok


def test_retry_leaves_duplicate_key_letters_alone(demo, tiny_cache, tmp_path):
    import shutil

    general = tmp_path / "general"
    shutil.copytree(os.path.dirname(demo["general_pattern"]), general)
    shutil.copy(general / "000000.tar", general / "000002.tar")  # every key of 000000 twice
    out = tmp_path / "out"
    config = demo_config(demo, str(out), tiny_cache, inputs=[f"wds:{general}/{{000000..000002}}.tar"])
    first = run(config, [])
    duplicates = first["counts"]["dead_lettered"]
    assert duplicates > 0 and first["reconciled"]
    second = run(config, [], retry_dead_letter=True)
    assert second["retried"] == 0
    assert second["counts"] == first["counts"] and second["reconciled"]
    assert validate_output(str(out)).ok


def test_resume_refuses_when_a_kept_shard_would_change(tiny_cache, tmp_path):
    """A sample that failed in the killed run but passes on resume shifts the shard boundaries:
    resume must refuse to overwrite a completed shard rather than corrupt it."""
    import numpy as np
    from PIL import Image

    from prep.pipeline.config import RunConfig

    root = tmp_path / "objects" / "dog"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in "abcdef":
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / f"{name}.jpg")
    first = (root / "a.jpg").read_bytes()
    (root / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")  # fails in the killed run
    out = tmp_path / "out"
    args = [sys.executable, "-m", "prep.cli", "run", "--input", f"folder:{root.parent}", "--preset", "tiny",
            "--model-cache", tiny_cache, "--out", str(out), "--samples-per-shard", "2", "--no-progress",
            "--workers", "1"]
    proc = subprocess.run(args, env={**os.environ, "PREP_FAULT": "write.after_tar:2"}, capture_output=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert any(p.name.endswith("_stats.json") for p in (out / "specific").iterdir())  # one shard completed
    (root / "a.jpg").write_bytes(first)  # ... and now it passes
    config = RunConfig(inputs=[f"folder:{root.parent}"], out=str(out), preset="tiny", model_cache=tiny_cache,
                       samples_per_shard=2)
    with pytest.raises(Exception, match="rerun with --overwrite"):
        run(config, [])
    manifest = run(RunConfig(**{**config.__dict__, "overwrite": True}), [])
    assert manifest["counts"]["specific"] == 6 and manifest["reconciled"]
