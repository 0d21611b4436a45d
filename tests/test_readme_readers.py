"""The README's "Reading the output" snippets run, in order, on a real run's output, and read
what the contract's own reader reads; the dataset card (OUT/README.md) makes `load_dataset(OUT,
"<domain>")` give the domains and splits the run wrote.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prep.schemas import contract

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_snippets(section: str = "Reading the output") -> list[str]:
    """The ```python blocks of one README section, in order."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    body = text[start : end if end > 0 else len(text)]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def samples_of(out: str, folder: str) -> list[dict]:
    result = []
    for path in sorted(glob.glob(os.path.join(out, folder, "*.tar"))):
        with open(path, "rb") as f:
            result.extend(contract.decode_sample(raw) for raw in contract.iter_samples(f))
    return result


@pytest.fixture(scope="module")
def ran_snippets(pipeline_run, tmp_path_factory, monkeypatch_module):
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("wids")
    monkeypatch_module.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf")))
    out = pipeline_run["out"]
    snippets = readme_snippets()
    assert len(snippets) == 3, "one snippet per reader: webdataset, wids, datasets"
    assert re.search(r'^OUT = "out"$', snippets[0], flags=re.M)
    namespace: dict = {}
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, code in enumerate(snippets):
            if i == 0:
                code = re.sub(r'^OUT = "out"$', f"OUT = {out!r}", code, flags=re.M)
            exec(compile(code, f"README.md snippet {i + 1}", "exec"), namespace)
        namespace["dataset"].__iter__().__next__()  # to_tensors in this process too (the loader's run in workers)
    # torch warns once per process when a snippet hands it a read-only array (the decoders'
    # arrays are): the snippets copy them.
    assert not [str(w.message) for w in caught if "not writable" in str(w.message)]
    return namespace


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_webdataset_snippet_gives_tensors_and_a_one_channel_mask(ran_snippets, pipeline_run):
    import torch

    first = ran_snippets["first"]
    mine = samples_of(pipeline_run["out"], contract.SPECIFIC)[0]
    assert first["key"] == mine["__key__"]
    image = np.asarray(Image.open(io.BytesIO(mine[contract.EXT_IMAGE])).convert("RGB"))
    assert first["image"].dtype == torch.uint8 and tuple(first["image"].shape) == (3, *image.shape[:2])
    assert np.array_equal(first["image"].permute(1, 2, 0).numpy(), image)
    mask = np.asarray(Image.open(io.BytesIO(mine[contract.EXT_MASK])))
    assert first["mask"].dtype == torch.uint8 and tuple(first["mask"].shape) == mask.shape == image.shape[:2]
    assert np.array_equal(first["mask"].numpy(), mask)
    assert set(np.unique(first["mask"].numpy())) <= {0, 255}
    assert np.array_equal(first["emb"].numpy(), mine[contract.EXT_EMB])
    assert np.array_equal(first["refs"].numpy(), mine[contract.EXT_REFS])
    assert first["caption"] == mine[contract.EXT_TEXT]


def test_wids_snippet_reads_the_last_sample_by_index(ran_snippets, pipeline_run):
    last = ran_snippets["last"]
    mine = samples_of(pipeline_run["out"], contract.SPECIFIC)[-1]
    assert last["key"] == mine["__key__"]
    assert last["mask"].mode == "L"
    assert np.array_equal(np.asarray(last["mask"]), np.asarray(Image.open(io.BytesIO(mine[contract.EXT_MASK]))))
    assert np.array_equal(last["emb"], mine[contract.EXT_EMB]) and np.array_equal(last["refs"], mine[contract.EXT_REFS])
    assert last["caption"] == mine[contract.EXT_TEXT]


def test_datasets_snippet_loads_the_card_configs_with_their_splits(ran_snippets, pipeline_run):
    out = pipeline_run["out"]
    manifest = pipeline_run["manifest"]
    specific = ran_snippets["specific"]
    expected = {}
    for s in manifest["shards"]:
        if s["domain"] == contract.SPECIFIC:
            name = contract.HF_SPLIT_NAMES[s.get("split", contract.TRAIN)]
            expected[name] = expected.get(name, 0) + s["count"]
    assert {"train", "validation", "test"} <= set(expected), "the demo run writes all three splits"
    assert {name: len(ds) for name, ds in specific.items()} == expected
    assert [r["__key__"] for r in specific["validation"]] == [
        s["__key__"] for s in samples_of(out, contract.shard_folder("val", contract.SPECIFIC))
    ]
    row = ran_snippets["row"]
    assert row["mask.png"].mode == "L"
    assert row["__key__"] == samples_of(out, contract.SPECIFIC)[0]["__key__"]


def test_general_config_has_no_mask_and_only_its_own_shards(ran_snippets, pipeline_run):
    load_dataset = ran_snippets["load_dataset"]
    general = load_dataset(pipeline_run["out"], "general")
    assert set(general) == {"train"}
    assert len(general["train"]) == pipeline_run["manifest"]["counts"]["general"]
    assert "mask.png" not in general["train"].column_names


def test_card_is_the_manifest_s_function_and_names_no_local_path(pipeline_run):
    from prep.schemas.card import card_configs, dataset_card, read_card_configs

    out = pipeline_run["out"]
    text = Path(out, contract.DATASET_CARD).read_text(encoding="utf-8")
    manifest = json.loads(Path(out, contract.MANIFEST).read_text(encoding="utf-8"))
    assert text == dataset_card(manifest)
    assert text.startswith("---\n"), "datasets reads the YAML header only at the very top"
    assert read_card_configs(text) == card_configs(manifest["shards"])
    assert [c["config_name"] for c in read_card_configs(text)] == [contract.SPECIFIC, contract.GENERAL]
    for spec in manifest["config"]["inputs"]:
        assert spec.split(":", 1)[1] not in text
    assert out not in text and str(pipeline_run["config"].model_cache) not in text
    assert "| specific | validation | `val/specific/` |" in text


def test_a_user_readme_is_never_overwritten_or_removed(tmp_path):
    from prep.pipeline.out_folder import clear_output
    from prep.schemas.card import dataset_card, write_dataset_card

    manifest = {"shards": [{"domain": "specific", "name": "000000.tar", "count": 3}], "counts": {}}
    out = tmp_path / "out"
    out.mkdir()
    (out / contract.DATASET_CARD).write_text("# my notes\n")
    write_dataset_card(str(out), manifest)
    assert (out / contract.DATASET_CARD).read_text() == "# my notes\n"
    (out / contract.MANIFEST).write_text("{}")
    clear_output(str(out))
    assert (out / contract.DATASET_CARD).read_text() == "# my notes\n" and not (out / contract.MANIFEST).exists()

    (out / contract.DATASET_CARD).unlink()
    write_dataset_card(str(out), manifest)
    assert (out / contract.DATASET_CARD).read_text() == dataset_card(manifest)
    clear_output(str(out))
    assert not (out / contract.DATASET_CARD).exists(), "prep's own card goes with --overwrite"


def test_validate_flags_a_card_that_disagrees_with_the_shards(pipeline_run, tmp_path):
    import shutil

    from prep.schemas.validate import validate_output

    out = tmp_path / "copy"
    shutil.copytree(pipeline_run["out"], out)
    assert validate_output(str(out)).ok
    card = out / contract.DATASET_CARD
    card.write_text(card.read_text().replace("path: val/specific/*.tar", "path: val/general/*.tar"))
    report = validate_output(str(out))
    assert not report.ok
    assert any(contract.DATASET_CARD in p and "configs" in p for p in report.problems), report.problems
