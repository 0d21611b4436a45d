"""The trainer end to end on the demo shards (the `pipeline_run` fixture, tiny preset): the
loss goes down, a resumed run reproduces an uninterrupted one exactly, checkpoints load with
weights_only=True, and sample / evaluate / the CLI run on the trained checkpoint."""

from __future__ import annotations

import csv
import math
import os

import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from prep.trainer.cli import register
from prep.trainer.evaluate import evaluate, format_table
from prep.trainer.sample import SampleParams, sample
from prep.trainer.train import TrainConfig, train

SIZE = 32


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """2 shared cores: one intra-op thread avoids oversubscription (and is deterministic)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(pipeline_run: dict, out, **overrides) -> TrainConfig:
    values = dict(
        shards=pipeline_run["out"], out=str(out), image_size=SIZE, batch_size=8, channels=16,
        channel_mults=(1, 2), attention_levels=(1,), heads=2, context_dim=32, lr=2e-3, min_lr=2e-4,
        warmup=5, device="cpu", log_every=10, seed=0,
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def trained(pipeline_run, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("train")
    result = train(tiny_config(pipeline_run, out, max_steps=60))
    return {"result": result, "out": out}


def test_loss_goes_down(trained):
    losses = trained["result"]["losses"]
    assert len(losses) == 60 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:15]) / 15, sum(losses[-15:]) / 15  # about 0.72 and 0.21
    assert last < 0.6 * first, (first, last)
    with open(trained["result"]["loss_csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 61))


def test_checkpoint_is_plain_data(trained):
    state = torch.load(trained["result"]["checkpoint"], map_location="cpu", weights_only=True)
    assert state["step"] == 60 and state["data"]["batches"] == 60
    assert set(state) >= {"model", "optimizer", "step", "config", "data", "rng", "model_config"}
    assert state["config"]["ratio"] == 0.3 and state["config"]["clip_model"].endswith(".json")


def test_resume_reproduces_the_uninterrupted_run(pipeline_run, tmp_path):
    """Stop after 5 steps, resume: the next 10 losses equal the uninterrupted run's, bit for bit
    (two DataLoader workers, so the data position and worker rotation are exercised too)."""
    common = dict(max_steps=15, decay_steps=15, num_workers=2)
    straight = train(tiny_config(pipeline_run, tmp_path / "a", **common))["losses"]
    first = train(tiny_config(pipeline_run, tmp_path / "b", **{**common, "max_steps": 5}))
    assert first["losses"] == straight[:5]
    resumed = train(tiny_config(pipeline_run, tmp_path / "b", **common))
    assert resumed["start_step"] == 5 and len(resumed["losses"]) == 10
    assert resumed["losses"] == straight[5:]  # exactly, not approximately
    with open(tmp_path / "b" / "loss.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 16))


def test_resume_refuses_a_changed_config(pipeline_run, trained):
    with pytest.raises(ValueError, match="omega"):
        train(tiny_config(pipeline_run, trained["out"], max_steps=61, omega=0.9))


def _reference(pipeline_run, n: int) -> str:
    folder = os.path.join(pipeline_run["config"].inputs[0].split(":", 1)[1], "img_align_celeba")
    return os.path.join(folder, sorted(os.listdir(folder))[n])


def test_sample_writes_the_grid(trained, pipeline_run, tmp_path):
    out = tmp_path / "grid.png"
    params = SampleParams(num_samples=3, steps=4, seed=1)
    result = sample(trained["result"]["checkpoint"], _reference(pipeline_run, 0), "a smiling man", str(out), params=params, device="cpu")
    with Image.open(out) as grid:
        assert grid.format == "PNG" and grid.size == ((3 + 2) * SIZE, SIZE)
    assert result["size"] == ((3 + 2) * SIZE, SIZE)
    # The reference is masked exactly as the pipeline masked the same image in its shard.
    key = "celeba_" + os.path.splitext(os.path.basename(_reference(pipeline_run, 0)))[0]
    assert result["mask_fraction"] == pytest.approx(_shard_mask_fraction(pipeline_run["out"], key), abs=1e-9)


def _shard_mask_fraction(out: str, key: str) -> float:
    import io

    import numpy as np

    from prep.schemas import contract, output

    for shard in output.list_shards(out):
        with output.open_read(shard.path) as f:
            for raw in contract.iter_samples(f):
                if raw["__key__"] == key:
                    mask = np.asarray(Image.open(io.BytesIO(raw[contract.EXT_MASK])))
                    return float(np.count_nonzero(mask)) / mask.size
    raise AssertionError(f"{key} is in no shard of {out}")


def test_evaluate_gives_finite_similarities(trained, pipeline_run):
    refs = [_reference(pipeline_run, 0), _reference(pipeline_run, 5)]
    prompts = ["a smiling man", "a woman wearing a hat"]
    rows = evaluate(trained["result"]["checkpoint"], refs, prompts, params=SampleParams(num_samples=2, steps=3), device="cpu")
    assert [(r["reference"], r["prompt"]) for r in rows] == [(a, b) for a in refs for b in prompts]
    for row in rows:
        assert row["samples"] == 2
        assert math.isfinite(row["object_sim"]) and math.isfinite(row["text_sim"])
    # Row 0 again by hand: seeded samples of the first reference and prompt, the mean cosine of
    # their CLIP embeddings with the (unmasked) reference's, and with the prompt's.
    from prep.trainer.sample import Customizer

    customizer = Customizer(trained["result"]["checkpoint"], device="cpu")
    ref = customizer.reference(refs[0])
    features = customizer.embed_images(customizer.generate(ref.embedding, prompts[0], SampleParams(num_samples=2, steps=3)))
    assert rows[0]["object_sim"] == pytest.approx(float((features @ customizer.embed_images([ref.image]).T).mean()), abs=1e-5)
    assert rows[0]["text_sim"] == pytest.approx(float((features @ customizer.embed_texts([prompts[0]]).T).mean()), abs=1e-5)
    table = format_table(rows)
    assert "object_sim" in table and len(table.splitlines()) == 2 + len(rows) + 1  # header, rule, rows, mean


def test_cli_commands(trained, pipeline_run, tmp_path):
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    result = runner.invoke(app, [
        "train", "--shards", pipeline_run["out"], "--out", str(tmp_path / "run"), "--max-steps", "2",
        "--image-size", "16", "--batch-size", "4", "--channels", "8", "--channel-mults", "1,2",
        "--attention-levels", "1", "--device", "cpu", "--ratio", "0.3", "--omega", "0.5",
    ])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "checkpoint.pt").is_file() and (tmp_path / "run" / "loss.csv").is_file()
    ckpt, ref = trained["result"]["checkpoint"], _reference(pipeline_run, 1)
    result = runner.invoke(app, [
        "sample", "--checkpoint", ckpt, "--reference", ref, "--prompt", "a face", "--out", str(tmp_path / "g.png"),
        "--num-samples", "1", "--steps", "2", "--device", "cpu",
    ])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "g.png").size == (3 * SIZE, SIZE)
    result = runner.invoke(app, [
        "evaluate", "--checkpoint", ckpt, "--reference", ref, "--prompt", "a face", "--prompt", "a hat",
        "--num-samples", "1", "--steps", "2", "--device", "cpu",
    ])
    assert result.exit_code == 0, result.output
    assert "object_sim" in result.output and "mean" in result.output
    result = runner.invoke(app, ["train", "--shards", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "error" in result.output
