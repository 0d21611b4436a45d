"""Every captioner family through the real stage and the whole pipeline, on the tiny random
models `prep demo-models` builds (models/demo_models.py: the family's real config, processor
and chat template, saved with save_pretrained, loaded back as a checkpoint is)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import demo_config
from prep.models.demo_models import FAMILIES, build_demo_models
from prep.transforms.caption import CaptionHandler, Flagged
from prep.transforms.captioners import DEFAULT_INSTRUCTION, family_of
from prep.transforms.inference import Reject

pytestmark = pytest.mark.slow
TEMPLATE_TEXT = re.compile(r"<\|[^|]*\|>|<image>|<end_of_utterance>|\b(?:user|assistant|system)\s*:|"
                           + re.escape(DEFAULT_INSTRUCTION.rstrip(".")), re.IGNORECASE)


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory) -> dict[str, str]:
    return build_demo_models(str(tmp_path_factory.mktemp("demo-models")))


def _samples(n: int):
    from test_handlers import _sample

    return [_sample(i) for i in range(n)]


def _sized_sample(i: int, size: tuple[int, int]):
    """A sample whose image is `size` (w, h): wide, tall and square ones give different numbers of
    image tokens (Qwen2-VL, LLaVA-OneVision) and tiles (SmolVLM)."""
    import io

    import numpy as np
    from PIL import Image

    from prep.schemas.records import Sample

    pixels = np.random.default_rng(i).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return Sample(key=f"s{i}", source="test", domain="specific", path=f"/x/{i}.jpg", image_jpeg=buf.getvalue(),
                  width=size[0], height=size[1])


@pytest.mark.parametrize("family", [f for f in FAMILIES if not family_of(f).per_element])
def test_parts_prepared_per_image_collate_into_the_processors_batch_call(demo_models, family):
    """The processor runs per image on the pool (prepare); collated, the parts are exactly what
    its call on the whole batch returns: the same keys, shapes, dtypes and values, token rows
    padded on the family's side, tiles and patches padded where their numbers differ."""
    import torch

    from prep.transforms.caption import collate
    from prep.transforms.decode import load_rgb

    handler = CaptionHandler(demo_models[family], device="cpu")
    samples = [_sized_sample(i, size) for i, size in enumerate([(178, 218), (320, 96), (64, 64), (90, 300)])]
    parts = [handler.prepare(sample, None) for sample in samples]
    processor, fam = handler.processor(), handler.family()
    images = [load_rgb(s.image_jpeg) for s in samples]
    text = handler.prompt_text()
    whole = dict(processor(images=[[im] for im in images] if fam.nested_images else images,
                           **({"text": [text] * len(images)} if text else {}), padding=True, return_tensors="pt"))
    collated = collate(parts, processor.tokenizer.pad_token_id, fam.padding_side)
    assert sorted(collated) == sorted(whole)
    for key in whole:
        assert collated[key].dtype == whole[key].dtype and collated[key].shape == whole[key].shape, key
        assert torch.equal(collated[key], whole[key]), (family, key)


def test_collate_pads_token_rows_on_the_given_side_and_tiles_with_zeros():
    import torch

    from prep.transforms.caption import collate

    a = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
         "pixel_values": torch.ones(1, 2, 3), "pixel_attention_mask": torch.ones(1, 2, dtype=torch.bool)}
    b = {"input_ids": torch.tensor([[8]]), "attention_mask": torch.ones(1, 1, dtype=torch.long),
         "pixel_values": torch.ones(1, 1, 3), "pixel_attention_mask": torch.ones(1, 1, dtype=torch.bool)}
    left = collate([a, b], 0, "left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["pixel_values"][1].tolist() == [[1, 1, 1], [0, 0, 0]]
    assert left["pixel_attention_mask"].tolist() == [[True, True], [True, False]]
    assert collate([a, b], 9, "right")["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]
    with pytest.raises(ValueError, match="no pad token"):
        collate([a, b], None, "left")


@pytest.mark.parametrize("family", FAMILIES)
def test_the_stage_captions_with_new_tokens_only(demo_models, family):
    handler = CaptionHandler(demo_models[family], max_new_tokens=12, device="cpu", max_batch_size=4, on_bad="keep")
    model = handler.load_model()
    assert handler.family() is family_of(family)
    results = [r.inference for r in handler.run_inference(_samples(3), model)]
    texts = [r.text if isinstance(r, Flagged) else r for r in results]
    assert not any(isinstance(r, Reject) for r in results), results
    assert all(isinstance(t, str) and t for t in texts)
    for text in texts:
        assert not TEMPLATE_TEXT.search(text), (family, text)
    if family_of(family).chat:  # the instruction went in through the chat template
        assert DEFAULT_INSTRUCTION in handler.prompt_text() and handler.prompt_text() != DEFAULT_INSTRUCTION
    # Deterministic, and independent of the batch (padded to a fixed size).
    again = [r.inference for r in handler.run_inference(_samples(3)[2:], model)]
    assert again == results[2:]


def test_the_manifest_records_family_prompt_and_generation(demo_models, demo, tiny_cache, tmp_path):
    from prep.pipeline.run import run
    from prep.schemas.validate import validate_output

    out = tmp_path / "out"
    manifest = run(demo_config(demo, str(out), tiny_cache, caption_model=demo_models["qwen2_vl"],
                               caption_prompt="Describe the person.", caption_on_bad="keep"), [])
    caption = manifest["models"]["caption"]
    assert caption["family"] == "Qwen2-VL" and caption["prompt"] == "Describe the person."
    assert caption["prompt_used"] == "Describe the person." and caption["prompt_is"] == "instruction"
    assert (caption["max_new_tokens"], caption["num_beams"], caption["do_sample"], caption["padding_side"],
            caption["on_bad"]) == (30, 1, False, "left", "keep")
    assert caption["random_weights"] is True and len(caption["fingerprint"]["sha256"]) == 64
    assert validate_output(str(out)).ok


@pytest.mark.parametrize("family", FAMILIES)
def test_prep_run_with_each_family_validates(demo_models, demo, tiny_cache, tmp_path, family):
    from prep.pipeline.run import run
    from prep.schemas import contract
    from prep.schemas.validate import validate_output

    out = tmp_path / "out"
    manifest = run(demo_config(demo, str(out), tiny_cache, caption_model=demo_models[family]), [])
    assert manifest["reconciled"] and validate_output(str(out)).ok
    captions = []
    for tar in sorted(Path(out).glob("**/specific/*.tar")):
        with open(tar, "rb") as f:
            captions += [json.loads(s["json"])["caption_vlm"] for s in contract.iter_samples(f)]
    assert len(captions) == manifest["counts"]["specific"] > 0  # (the dropped ones are in the reconciled dead letters)
    for text in captions:
        assert text and not TEMPLATE_TEXT.search(text), (family, text)


@pytest.mark.parametrize("remove, named", [
    (("model.safetensors",), "weights (*.safetensors or *.bin)"),
    (("processor_config.json",), "the processor (processor_config.json or preprocessor_config.json)"),
    (("tokenizer.json", "tokenizer_config.json"), "the tokenizer"),
])
def test_a_caption_model_folder_missing_files_is_refused_by_the_preflight(demo_models, demo, tiny_cache, tmp_path,
                                                                           remove, named):
    """Not a crash mid-run: exit 2 before anything starts, naming what the folder lacks; OUT untouched."""
    import shutil

    from typer.testing import CliRunner

    from prep.cli import app

    folder = tmp_path / "model"
    shutil.copytree(demo_models["qwen2_vl"], folder)
    for name in remove:
        (folder / name).unlink()
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", "--input", f"celeba:{demo['celeba_dir']}", "--preset", "tiny",
                                      "--model-cache", tiny_cache, "--caption-model", str(folder), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert f"the caption model folder {folder} lacks {named}" in result.output
    assert "Traceback" not in result.output and not out.exists()


@pytest.mark.parametrize("extra", [(), ("--workers", "2"), ("--chunk-inputs", "10", "--workers", "2")],
                         ids=["single job", "single job, 2 workers", "chunked, 2 workers"])
def test_a_caption_model_that_fails_to_load_mid_run_ends_in_one_error_line(demo_models, demo, tiny_cache, tmp_path,
                                                                          extra):
    """Files the preflight cannot judge (truncated weights): the run stops with one `error:` line
    naming the model and the cause, no Beam log or traceback, exit 1, and how to go on; in one
    process, from worker processes (Beam's RuntimeError quoting it) and from chunk workers."""
    import shutil
    import subprocess
    import sys

    folder = tmp_path / "model"
    shutil.copytree(demo_models["qwen2_vl"], folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    proc = subprocess.run([sys.executable, "-m", "prep.cli", "run", "--input", f"celeba:{demo['celeba_dir']}",
                           "--preset", "tiny", "--model-cache", tiny_cache, "--caption-model", str(folder),
                           "--out", str(tmp_path / "out"), "--no-progress", *extra],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(folder) in errors[0] and "SafetensorError" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ERROR" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == "fix it and rerun the same command to resume"


def test_a_processor_that_rejects_one_image_dead_letters_only_that_sample(demo_models, monkeypatch):
    """The processor runs per image: one it rejects is that sample's dead letter, with the
    processor's reason; its batch companions are captioned as they are without it."""
    handler = CaptionHandler(demo_models["qwen2_vl"], max_new_tokens=8, device="cpu", max_batch_size=4,
                             on_bad="keep")
    model = handler.load_model()
    samples = [_sized_sample(i, size) for i, size in enumerate([(178, 218), (64, 64), (90, 300)])]
    kind = type(handler.processor())
    real = kind.__call__

    def picky(self, *args, images=None, **kwargs):
        if any(image.size == (64, 64) for image in images):
            raise ValueError("image smaller than the processor's minimum")
        return real(self, *args, images=images, **kwargs)

    monkeypatch.setattr(kind, "__call__", picky)
    results = [r.inference for r in handler.run_inference(samples, model)]
    assert isinstance(results[1], Reject) and "smaller than the processor's minimum" in results[1].reason
    assert not any(isinstance(r, Reject) for r in (results[0], results[2]))
    alone = [r.inference for r in handler.run_inference([samples[0], samples[2]], model)]
    assert [results[0], results[2]] == alone
