"""Countering the skew (report/weights.py, `prep weights`, `prep train --weights`): inverse
frequency weights per attribute combination, mean 1 and capped, written beside the shards,
recorded in the manifest, and a weighted epoch whose realised mix moves towards balance."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from prep.report.weights import balanced_weights, group_of
from prep.schemas import contract


def test_every_combination_weighs_the_same_with_mean_one():
    groups = ["a"] * 6 + ["b"] * 3 + ["c"]
    weights = balanced_weights(groups, max_weight=100)
    assert sum(weights) / len(weights) == pytest.approx(1.0)
    per_group = Counter()
    for g, w in zip(groups, weights):
        per_group[g] += w
    assert per_group["a"] == pytest.approx(per_group["b"]) == pytest.approx(per_group["c"])


def test_the_cap_holds_and_the_mean_stays_one():
    groups = ["a"] * 99 + ["b"]
    weights = balanced_weights(groups, max_weight=5)
    assert max(weights) <= 5 + 1e-9 and sum(weights) / len(weights) == pytest.approx(1.0, abs=1e-5)
    assert weights[-1] == pytest.approx(5, abs=1e-5)
    with pytest.raises(ValueError):
        balanced_weights(groups, max_weight=0.5)


def test_groups_name_every_chosen_attribute_and_missing_labels():
    assert group_of({"Male": True, "Young": False, "Bald": True}, ["Male", "Young"]) == "Male=1,Young=0"
    assert group_of(None, ["Male"]) == "Male=?"
    assert contract.is_run_file("specific/000000_weights.parquet")  # --overwrite removes them
    assert contract.weights_name("000003.tar") == "000003_weights.parquet"


def _attributes(out: Path) -> dict[str, dict]:
    import webdataset as wds

    return {s["__key__"]: json.loads(s["json"])["attributes"]
            for tar in sorted((out / "specific").glob("*.tar")) for s in wds.WebDataset(str(tar), shardshuffle=False)}


@pytest.mark.slow
def test_a_weighted_epoch_moves_the_mix_towards_balance(tmp_path, tiny, tiny_cache):
    from prep.demo import write_demo_data
    from prep.pipeline.config import RunConfig
    from prep.pipeline.run import run
    from prep.schemas.validate import validate_output
    from prep.trainer.data import TripletStream

    data = write_demo_data(str(tmp_path / "data"), identities=40, images_per_identity=3, general_shards=0,
                           lsun_records=0, seed=11)
    out = tmp_path / "out"
    run(RunConfig(inputs=[f"celeba:{data['celeba_dir']}"], out=str(out), preset="tiny", model_cache=tiny_cache,
                  samples_per_shard=30), [])
    proc = subprocess.run([sys.executable, "-m", "prep.cli", "weights", str(out), "--balance", "Young,Male",
                           "--max-weight", "20"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    record = manifest["weights"]
    assert record["balance"] == ["Young", "Male"] and record["split"] == "train"
    assert record["files"] == [f"specific/{contract.weights_name(p.name)}" for p in sorted((out / "specific").glob("*.tar"))]
    assert validate_output(str(out)).ok
    first = {f: (out / f).read_bytes() for f in record["files"]}
    assert subprocess.run([sys.executable, "-m", "prep.cli", "weights", str(out), "--balance", "Young,Male",
                           "--max-weight", "20"], capture_output=True, timeout=300).returncode == 0
    assert {f: (out / f).read_bytes() for f in record["files"]} == first  # a rerun writes the same bytes

    attributes = _attributes(out)

    def young_share(weights: bool, epochs: int = 4) -> float:
        stream = TripletStream(str(out / "specific"), None, ratio=1.0, omega=0.0, text_drop=0.0, batch_size=1,
                               epochs=epochs, image_size=8, weights=weights, seed=3)
        keys = [batch["key"][0] for batch in stream]
        return sum(attributes[k]["Young"] for k in keys) / len(keys)

    before, after = young_share(False), young_share(True)
    assert record["share"]["Young"]["before"] == pytest.approx(before, abs=1e-3)  # one plain epoch per epoch
    assert abs(after - 0.5) < abs(before - 0.5) / 2, (before, after)
    assert abs(after - record["share"]["Young"]["after"]) < 0.06  # the realised mix is near the expected one

    with pytest.raises(ValueError, match="prep weights"):
        TripletStream(str(tmp_path / "data"), None, ratio=1.0, weights=True)
