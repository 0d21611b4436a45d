"""The demo run's output against recordings, on every platform.

Two recordings of the same run (the conftest's `pipeline_run`: demo data, tiny preset):

- `golden_demo.json`: every file's sha256, per platform (CPU vendor, model and torch's CPU
  capability). On a platform that has one, the output must match it byte for byte.
- `golden_demo_values.json`: every file as values (tests/golden.py): checked on *every*
  platform, with the rules stated there: files no model reaches (general shards, dead
  letters) byte for byte; captions and every string, int and key exactly; embeddings, refs
  and distances within 1e-4; masks by IoU >= 0.99. The model stages' floats depend on the
  CPU's kernels (MKL, oneDNN and onnxruntime pick code by CPU: seen 2026-12-02, an AVX-512
  host differed in all 16 specific-domain files' bytes), which is what the tolerances are for.

Three files name the run's own folders (pytest tmp folders): in manifest.json, _run.json and
the dead-letter lines those are replaced by <DEMO>, <MODELS> and <OUT>; _run.json's digest (a
hash over those absolute paths) is checked on a fixed config (test_run_digest_is_unchanged).

Record (a deliberate contract change, or a new platform's bytes):
  python -m pytest -q tests/test_golden.py --golden-write
writes both recordings for this platform (others' byte recordings are kept) and *skips*: a
run that writes never checks; run the test again without the flag to check.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from golden import compare, view

GOLDEN = Path(__file__).with_name("golden_demo.json")
GOLDEN_VALUES = Path(__file__).with_name("golden_demo_values.json")
_NAMES_FOLDERS = ("manifest.json", "_run.json", "000000.jsonl")


def _placeholders(out: Path, demo_root: str, models: str) -> dict[str, str]:
    return {str(out): "<OUT>", demo_root: "<DEMO>", models: "<MODELS>"}


def normalised_digests(out: Path, demo_root: str, models: str) -> dict[str, str]:
    digests = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out).as_posix()
        data = path.read_bytes()
        if path.name in _NAMES_FOLDERS:
            for real, placeholder in _placeholders(out, demo_root, models).items():
                data = data.replace(real.encode("utf-8"), placeholder.encode("utf-8"))
        if path.name == "_run.json":
            data = re.sub(rb'\n "digest": "[0-9a-f]{64}",', b"", data)
        digests[rel] = hashlib.sha256(data).hexdigest()
    return digests


def values_of(out: Path, demo_root: str, models: str) -> dict:
    found = view(out, _placeholders(out, demo_root, models))
    found["_run.json"].pop("digest", None)
    return found


def _fixed_digest() -> str:
    from prep.pipeline.config import RunConfig
    from prep.pipeline.resume import run_digest
    from prep.schemas.records import SourceItem

    config = RunConfig(inputs=["celeba:/data/celeba", "wds:/data/{0..1}.tar"], out="/out", preset="tiny", seed=3)
    items = [SourceItem(key="celeba_000001", source="celeba", domain="specific", path="/data/celeba/1.jpg",
                        identity="7", split="val")]
    fingerprints = {"caption": {"sha256": "ab"}, "embed": {"id": "hub:x"}, "mask": {}}
    return run_digest(config, items, ["/data/0.tar", "/data/1.tar"], fingerprints)


def platform() -> dict[str, str]:
    """What the model stages' float results depend on, as far as this test can tell."""
    import torch

    info = {"vendor": "?", "model": "?"}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == "vendor_id":
                    info["vendor"] = value.strip()
                elif name.strip() == "model name":
                    info["model"] = value.strip()
                    break
    except OSError:
        pass
    info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return info


def model_free(name: str) -> bool:
    """Files no model output reaches: general-domain shards (no caption, mask or object
    embedding) and the dead letters (all from decoding)."""
    return name.startswith(("general/", "val/general/", "test/general/", "dead_letter/"))


@pytest.fixture(scope="module")
def recorded_run(pipeline_run, demo, tiny_cache, request):
    out, demo_root = Path(pipeline_run["out"]), str(Path(demo["celeba_dir"]).parent)
    digests = normalised_digests(out, demo_root, tiny_cache)
    values = values_of(out, demo_root, tiny_cache)
    if request.config.getoption("--golden-write"):
        golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {"recordings": []}
        others = [r for r in golden["recordings"] if r["platform"] != platform()]
        GOLDEN.write_text(json.dumps({"recordings": others + [{"platform": platform(), "files": digests}],
                                      "run_digest": _fixed_digest()}, indent=1, sort_keys=True) + "\n")
        GOLDEN_VALUES.write_text(json.dumps({"platform": platform(), "files": values}, sort_keys=True) + "\n")
        pytest.skip("recorded (--golden-write): run again without it to check")
    return digests, values


def test_demo_output_matches_recorded_values_on_every_platform(recorded_run):
    digests, values = recorded_run
    expected = json.loads(GOLDEN_VALUES.read_text())["files"]
    assert sorted(values) == sorted(expected)  # the same files
    problems = compare(expected, values)
    assert problems == [], "\n".join(problems[:40])
    # Files no model reaches are byte-identical everywhere.
    for recording in json.loads(GOLDEN.read_text())["recordings"]:
        assert {k: v for k, v in digests.items() if model_free(k) and recording["files"][k] != v} == {}


def test_demo_output_is_byte_identical_where_this_platform_was_recorded(recorded_run):
    digests, _ = recorded_run
    recordings = json.loads(GOLDEN.read_text())["recordings"]
    mine = [r for r in recordings if r["platform"] == platform()]
    if not mine:
        pytest.skip(f"no byte recording for this platform ({platform()}); the values test compared every file")
    assert {k: v for k, v in digests.items() if mine[0]["files"].get(k) != v} == {}


def test_the_comparison_catches_what_it_must():
    """compare() is not vacuous: a caption word, an embedding past the tolerance, a mask past
    the IoU floor, a missing member and a changed weights digest are each caught; a float
    within the tolerance and a shard's byte size are not."""
    import numpy as np

    from golden import _rle

    mask = np.zeros((20, 20), np.uint8)
    mask[5:15, 5:15] = 255
    moved = np.roll(mask, 2, axis=1)
    base = {"s.tar": {"k": {"txt": "a man", "emb.npy": {"values": [0.5, 0.25]},
                            "mask.png": {"shape": [20, 20], "mask_rle": _rle(mask)}}},
            "manifest.json": {"shards": [{"bytes": 10, "sha256": "a"}],
                              "models": {"embed": {"fingerprint": {"sha256": "w1"}}}}}

    def changed(path, value):
        import copy

        other = copy.deepcopy(base)
        node = other
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return compare(base, other)

    assert changed(["s.tar", "k", "txt"], "a woman")
    assert changed(["s.tar", "k", "emb.npy", "values"], [0.5, 0.2502])
    assert not changed(["s.tar", "k", "emb.npy", "values"], [0.5, 0.25005])
    assert changed(["s.tar", "k", "mask.png"], {"shape": [20, 20], "mask_rle": _rle(moved)})
    assert changed(["s.tar", "k"], {"txt": "a man", "emb.npy": {"values": [0.5, 0.25]}})
    assert changed(["manifest.json", "models", "embed", "fingerprint", "sha256"], "w2")
    assert not changed(["manifest.json", "shards"], [{"bytes": 12, "sha256": "b"}])


def test_run_digest_is_unchanged(request):
    """A resume after upgrading prep must still recognise a partial run of the same config."""
    if request.config.getoption("--golden-write"):  # (the recording just wrote it: a check now could not fail)
        pytest.skip("recorded (--golden-write): run again without it to check")
    assert _fixed_digest() == json.loads(GOLDEN.read_text())["run_digest"]
