"""The demo run's output, byte for byte, against recorded hashes: a refactor must not change
an output byte.

First recorded from the code at 2abca99, before the "one home for each rule" refactor (issue
#10), which left every byte as it was. Re-recorded once since, deliberately, for the identity
step (issue #12): identity fields, lineage and the KEY.face.npy member in the shards, their
columns in the sidecars, the manifest's "identity" section and the new config fields (which
also enter the resume digest).

Every file of the run is hashed. Three files name the run's own folders (the demo data, the
model cache and OUT are pytest tmp folders): in manifest.json, _run.json and the dead-letter
lines those absolute folders are replaced by <DEMO>, <MODELS> and <OUT> before hashing, and
_run.json's digest (a hash over those absolute paths) is checked separately on a fixed
config (test_run_digest_is_unchanged). Dead-letter lines are compared with their `kind`
removed: the kind is contract v1's one documented addition since 2abca99.

Regenerate (only for a deliberate contract change):
  PYTHONPATH=... python -m pytest -q tests/test_golden.py --golden-write
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

GOLDEN = Path(__file__).with_name("golden_demo.json")
_KIND = re.compile(rb', "kind": "[^"]*"')
_NAMES_FOLDERS = ("manifest.json", "_run.json", "000000.jsonl")


def normalised_digests(out: Path, demo_root: str, models: str) -> dict[str, str]:
    digests = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out).as_posix()
        data = path.read_bytes()
        if path.name in _NAMES_FOLDERS:
            for real, placeholder in ((str(out), "<OUT>"), (demo_root, "<DEMO>"), (models, "<MODELS>")):
                data = data.replace(real.encode("utf-8"), placeholder.encode("utf-8"))
        if path.name == "_run.json":
            data = re.sub(rb'\n "digest": "[0-9a-f]{64}",', b"", data)
        if rel.startswith("dead_letter/"):
            data = _KIND.sub(b"", data)
        digests[rel] = hashlib.sha256(data).hexdigest()
    return digests


def _fixed_digest() -> str:
    from prep.pipeline.config import RunConfig
    from prep.pipeline.resume import run_digest
    from prep.schemas.records import SourceItem

    config = RunConfig(inputs=["celeba:/data/celeba", "wds:/data/{0..1}.tar"], out="/out", preset="tiny", seed=3)
    items = [SourceItem(key="celeba_000001", source="celeba", domain="specific", path="/data/celeba/1.jpg",
                        identity="7", split="val")]
    fingerprints = {"caption": {"sha256": "ab"}, "embed": {"id": "hub:x"}, "mask": {}}
    return run_digest(config, items, ["/data/0.tar", "/data/1.tar"], fingerprints)


def test_demo_output_is_byte_identical_to_recorded(pipeline_run, demo, tiny_cache, request):
    got = normalised_digests(Path(pipeline_run["out"]), str(Path(demo["celeba_dir"]).parent), tiny_cache)
    if request.config.getoption("--golden-write"):
        GOLDEN.write_text(json.dumps({"files": got, "run_digest": _fixed_digest()}, indent=1, sort_keys=True) + "\n")
    expected = json.loads(GOLDEN.read_text())["files"]
    assert sorted(got) == sorted(expected)
    assert {k: v for k, v in got.items() if expected[k] != v} == {}


def test_run_digest_is_unchanged():
    """A resume after upgrading prep must still recognise a partial run of the same config."""
    assert _fixed_digest() == json.loads(GOLDEN.read_text())["run_digest"]
