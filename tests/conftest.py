"""Shared fixtures: tiny models, demo data and one pipeline run, built once per session."""

from __future__ import annotations

import gc
import os
import tempfile
from pathlib import Path

import pytest

# rembg links custom ONNX models into its home folder: keep the tests' links out of ~.
os.environ.setdefault("REMBG_HOME", tempfile.mkdtemp(prefix="prep-rembg-"))
os.environ.pop("U2NET_HOME", None)
# The weights-hash cache (pipeline/fingerprint.py) of the tests' tiny models stays out of ~.
os.environ.setdefault("PREP_HASH_CACHE", os.path.join(tempfile.mkdtemp(prefix="prep-hash-"), "weights-sha256.json"))
# No hub is reachable here: fail hub look-ups at once instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[2] / "shared"
CELEBA_SHARED = SHARED / "data" / "celeba"
U2NETP = SHARED / "models" / "u2netp.onnx"


@pytest.fixture(autouse=True)
def _heap_not_frozen_across_tests():
    """A model load freezes the heap (transforms/inference.py: settle_heap), as it should in a
    worker; here, one test's objects must not stay out of the collector for the tests after."""
    yield
    gc.unfreeze()


def fn_api_runner():
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    return FnApiRunner()


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny(tiny_cache):
    from prep.models.tiny import ensure_tiny_models

    return ensure_tiny_models(tiny_cache)


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> dict:
    from prep.demo import write_demo_data

    root = tmp_path_factory.mktemp("demo")
    return write_demo_data(
        str(root), identities=6, images_per_identity=4, general_shards=2, general_per_shard=4, seed=1, corrupt=1
    )


def demo_config(demo: dict, out: str, tiny_cache: str, **overrides):
    from prep.pipeline.config import RunConfig

    values = dict(
        inputs=[f"celeba:{demo['celeba_dir']}", f"wds:{demo['general_pattern']}"],
        out=out,
        preset="tiny",
        model_cache=tiny_cache,
        samples_per_shard=7,
        refs_per_sample=2,
        embed_batch_size=4,
        caption_batch_size=4,
    )
    values.update(overrides)
    return RunConfig(**values)


@pytest.fixture(scope="session")
def pipeline_run(demo, tiny, tiny_cache, tmp_path_factory) -> dict:
    """One full `run()` on the demo data with the tiny preset, shared by the pipeline tests."""
    from prep.pipeline.run import run

    out = str(tmp_path_factory.mktemp("run") / "out")
    config = demo_config(demo, out, tiny_cache)
    manifest = run(config, [])
    return {"out": out, "manifest": manifest, "config": config}


def pytest_addoption(parser):
    parser.addoption("--golden-write", action="store_true", help="rewrite tests/golden_demo.json (test_golden.py)")


def assert_same_output(first: str, out: str) -> list[str]:
    """Every file of two runs' outputs byte-identical (the manifest, which names its own folder,
    compared on shards and counts; _run.json is written by run(), not the graph). Returns the
    relative file names compared."""
    import glob
    import json

    names = sorted(
        os.path.relpath(f, first) for f in glob.glob(os.path.join(first, "**", "*"), recursive=True) if os.path.isfile(f)
    )
    for name in names:
        if name in ("manifest.json", "_run.json"):
            continue
        with open(os.path.join(first, name), "rb") as a, open(os.path.join(out, name), "rb") as b:
            assert a.read() == b.read(), name
    m1 = json.load(open(os.path.join(first, "manifest.json")))
    m2 = json.load(open(os.path.join(out, "manifest.json")))
    assert m1["shards"] == m2["shards"] and m1["counts"] == m2["counts"]
    return names
