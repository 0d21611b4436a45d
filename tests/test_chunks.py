"""Chunked local runs (pipeline/chunks.py): the chunk planner, and a chunked run's output
byte-identical to one job's for several chunk sizes, after a SIGKILL and a resume, and with an
exact duplicate across identities that land in different chunks."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import assert_same_output, demo_config
from prep.pipeline import quiet
from prep.pipeline.chunks import Chunk, plan_chunks, read_chunk_plan
from prep.pipeline.run import run
from prep.schemas import contract
from prep.schemas.records import GENERAL, SPECIFIC, SourceItem
from prep.schemas.validate import validate_output
from test_resume import _cli_args


def _items(sizes: dict[str, int]) -> list[SourceItem]:
    return [SourceItem(key=f"celeba_{ident}_{n:03d}", source="celeba", domain=SPECIFIC, path=f"{ident}/{n}.jpg",
                       identity=ident) for ident, size in sizes.items() for n in range(size)]


def test_chunk_planner_keeps_identities_whole_and_is_deterministic():
    items = _items({"a": 3, "b": 5, "c": 1, "d": 7, "e": 2}) + [
        SourceItem(key=f"general_{n}", source="folder", domain=GENERAL, path=f"g/{n}.jpg") for n in range(3)]
    tars = ["/d/t1.tar", "/d/t0.tar"]
    chunks = plan_chunks(items, tars, 6, tar_samples=lambda url: 4)
    shuffled = list(items)
    random.Random(0).shuffle(shuffled)
    assert plan_chunks(shuffled, list(reversed(tars)), 6, tar_samples=lambda url: 4) == chunks  # order-free
    identity_of = {i.key: i.identity for i in items}
    where: dict[str, int] = {}
    for n, chunk in enumerate(chunks):
        for key in chunk.keys:
            if identity_of[key] is not None:
                assert where.setdefault(identity_of[key], n) == n  # every image of an identity in one chunk
    assert sorted(k for c in chunks for k in c.keys) == sorted(i.key for i in items)  # each item exactly once
    assert sorted(u for c in chunks for u in c.wds) == sorted(tars)
    # packed in order (identity name, then general keys, then tars), at most 6 unless one unit is larger
    assert [len(c.keys) + 4 * len(c.wds) for c in chunks] == [3, 6, 7, 5, 4, 4]
    assert chunks[2] == Chunk(tuple(f"celeba_d_{n:03d}" for n in range(7)), ())  # 7 > 6: alone
    assert plan_chunks(items, tars, 1000, tar_samples=lambda url: 4) == [
        Chunk(tuple(sorted(i.key for i in items if i.domain == SPECIFIC)) + tuple(f"general_{n}" for n in range(3)),
              ("/d/t0.tar", "/d/t1.tar"))]


def _same_manifest(a: dict, b: dict) -> None:
    for name in ("counts", "shards", "dead_letter_reasons", "identity", "splits", "reconciled", "sources", "wids_index"):
        assert a.get(name) == b.get(name), name


@pytest.mark.parametrize("chunk_inputs", [9, 13])
def test_chunked_run_is_byte_identical_to_one_job(chunk_inputs, pipeline_run, demo, tiny_cache, tmp_path):
    out = str(tmp_path / "chunked")
    from prep.pipeline import chunks

    planned = chunks.chunks_for(str(tmp_path / "plan-only"), _plan(demo, tiny_cache, tmp_path, chunk_inputs), True)
    assert planned is not None and len(planned) >= 3
    manifest = run(demo_config(demo, out, tiny_cache, chunk_inputs=chunk_inputs), [])
    names = assert_same_output(pipeline_run["out"], out)
    assert set(names) == {str(p.relative_to(out)) for p in Path(out).rglob("*") if p.is_file()}  # nothing more
    assert any(n.startswith("val/") for n in names) and contract.DEAD_LETTER_FILE in names
    _same_manifest(manifest, pipeline_run["manifest"])
    assert not (Path(out) / contract.CHUNKS_DIR).exists()
    assert validate_output(out).ok


def _plan(demo, tiny_cache, tmp_path, chunk_inputs):
    from prep.pipeline.build import plan_run

    return plan_run(demo_config(demo, str(tmp_path / "unused"), tiny_cache, chunk_inputs=chunk_inputs))


@pytest.mark.parametrize("fault", ["write.after_tar:3", "manifest.before_write:4"])
def test_killed_chunked_run_resumes_to_byte_identical_output(fault, pipeline_run, demo, tiny_cache, tmp_path):
    """Killed inside a chunk (its third tar), or in the stitch (after every chunk's manifest),
    then rerun with another --chunk-inputs: the saved chunks are kept and the output is one job's."""
    out = tmp_path / "killed"
    args = _cli_args(demo, out, tiny_cache) + ["--chunk-inputs", "9"]
    proc = subprocess.run(args, env={**os.environ, "PREP_FAULT": fault}, capture_output=True, timeout=900)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not (out / "manifest.json").exists()
    saved = read_chunk_plan(str(out))
    assert saved is not None and len(saved) >= 3
    done = [p for p in (out / contract.CHUNKS_DIR).glob("*/_done")]
    if fault.startswith("write"):
        assert len(done) < len(saved)  # it died inside a chunk
    manifest = run(demo_config(demo, str(out), tiny_cache, chunk_inputs=0), [])  # resumes the saved chunks
    assert_same_output(pipeline_run["out"], str(out))
    _same_manifest(manifest, pipeline_run["manifest"])
    assert not (out / contract.CHUNKS_DIR).exists()


def test_exact_duplicate_across_chunks_is_found(demo, tiny_cache, tmp_path):
    """A pixel-equal copy of one identity's image filed under another identity that lands in
    another chunk: the chunked run lists the same exact-duplicate set as one job, and the same
    verdicts (the copy is an outlier of its new identity, dropped)."""
    root = tmp_path / "celeba"
    shutil.copytree(demo["celeba_dir"], root)
    images = root / "img_align_celeba"
    rows = [line.split() for line in open(root / "identity_CelebA.txt") if len(line.split()) == 2]
    identities = sorted({ident for _, ident in rows}, key=lambda i: f"celeba:{i}")
    first_name = sorted(name for name, ident in rows if ident == identities[0])[0]
    shutil.copy(images / first_name, images / "900001.jpg")
    with open(root / "identity_CelebA.txt", "a") as f:
        f.write(f"\n900001.jpg {identities[-1]}\n")
    data = {"celeba_dir": str(root), "general_pattern": demo["general_pattern"]}
    options = dict(identity_model="clip", identity_threshold=0.45, identity_outliers="drop")
    one = run(demo_config(data, str(tmp_path / "one"), tiny_cache, chunk_inputs=0, **options), [])
    out = str(tmp_path / "chunked")
    chunked = run(demo_config(data, out, tiny_cache, chunk_inputs=9, **options), [])
    groups = one["identity"]["exact_duplicates"]["groups"]
    assert groups == [[f"celeba_{first_name.rsplit('.', 1)[0]}", "celeba_900001"]]
    assert chunked["identity"]["exact_duplicates"] == one["identity"]["exact_duplicates"]
    assert_same_output(str(tmp_path / "one"), out)
    _same_manifest(chunked, one)


def test_chunks_on_two_worker_processes_are_byte_identical_to_one_job(pipeline_run, demo, tiny_cache, tmp_path,
                                                                       monkeypatch):
    """`--workers 2` on a chunked run: two long-lived chunk processes, each taking chunks as it
    finishes the last (pipeline/chunks.py: chunk_pool). Same bytes as one job; the stage counters
    are every chunk's, summed; both processes ran chunks, and each loaded its models once."""
    progress = tmp_path / "progress"
    progress.mkdir()
    monkeypatch.setenv("PREP_PROGRESS", str(progress))  # each process leaves its counts there
    out = str(tmp_path / "pool")
    manifest = run(demo_config(demo, out, tiny_cache, chunk_inputs=5, workers=2), [])
    assert_same_output(pipeline_run["out"], out)
    _same_manifest(manifest, pipeline_run["manifest"])
    sequential = run(demo_config(demo, str(tmp_path / "sequential"), tiny_cache, chunk_inputs=5, workers=1), [])
    assert manifest["stage_counters"] == sequential["stage_counters"]
    per_sample = lambda counters: {k: v for k, v in counters.items() if not k.endswith("_shards")}  # noqa: E731
    assert per_sample(manifest["stage_counters"]) == per_sample(pipeline_run["manifest"]["stage_counters"])
    reports = [json.loads(p.read_text()) for p in progress.glob("*.json")]
    workers = [r for r in reports if r["pid"] != os.getpid() and r["counts"]]
    assert len(workers) == 2
    assert sum(w["counts"].get("embed.ok", 0) for w in workers) == manifest["stage_counters"]["embed.ok"]
    planned = read_chunk_plan(out)
    assert planned is None  # removed after the stitch


def test_a_chunked_run_loads_each_model_once_per_process(demo, tiny_cache, tmp_path, monkeypatch):
    """Sequential chunks share this process's models (transforms/inference.py: keep_models)."""
    from prep.transforms import embed, mask

    loads = []
    for module, name in ((mask, "new_rembg_session"), (embed, "load_clip")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _o=original, _n=name, **k: loads.append(_n) or _o(*a, **k))
    run(demo_config(demo, str(tmp_path / "out"), tiny_cache, chunk_inputs=5), [])
    assert sorted(loads) == ["load_clip", "new_rembg_session"]  # not once per chunk (there are more than 3)


def test_a_chunk_worker_keeps_its_models_for_its_whole_life(monkeypatch):
    """The pool's initializer (run in each chunk worker) leaves the model cache on, also after a
    garbage collection (a generator context entered and dropped would have switched it off)."""
    import gc

    from prep.transforms import inference

    monkeypatch.setattr(inference, "_kept", None)
    quiet.chunk_worker_init()
    gc.collect()
    assert inference._kept == {}
