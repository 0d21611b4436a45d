"""The tiny demo captioners (models/demo_models.py): each family's folder loads through
AutoProcessor / AutoModelForImageTextToText and generates, single and batched with padding,
the way that family is prompted; builds are deterministic; `prep demo-models` writes them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers.utils import is_num2words_available

from prep.models.demo_models import FAMILIES, INDEX_FILE, build_demo_models

CHAT = {"qwen2_vl", "smolvlm", "llava_onevision"}
HAS_NUM2WORDS = is_num2words_available()  # SmolVLM's processor raises without it
BUILDABLE = tuple(f for f in FAMILIES if f != "smolvlm" or HAS_NUM2WORDS)
MAX_FOLDER_BYTES = 5 * 1024 * 1024

# Special tokens whose ids the config holds: (config attribute, dotted from the top, token).
CONFIG_TOKENS = {
    "blip-2": [("image_token_index", "<image>"), ("text_config.bos_token_id", "</s>"),
               ("text_config.eos_token_id", "</s>"), ("text_config.pad_token_id", "<pad>")],
    "paligemma": [("image_token_index", "<image>"), ("text_config.bos_token_id", "<bos>"),
                  ("text_config.eos_token_id", "<eos>"), ("text_config.pad_token_id", "<pad>")],
    "florence2": [("image_token_id", "<image>"), ("text_config.bos_token_id", "<s>"),
                  ("text_config.eos_token_id", "</s>"), ("text_config.pad_token_id", "<pad>"),
                  ("text_config.decoder_start_token_id", "</s>")],
    "qwen2_vl": [("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                 ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
                 ("text_config.eos_token_id", "<|im_end|>"), ("text_config.pad_token_id", "<|endoftext|>")],
    "smolvlm": [("image_token_id", "<image>"), ("text_config.bos_token_id", "<|im_start|>"),
                ("text_config.eos_token_id", "<end_of_utterance>"), ("text_config.pad_token_id", "<|im_end|>")],
    "llava_onevision": [("image_token_index", "<image>"), ("video_token_index", "<video>"),
                        ("text_config.eos_token_id", "<|im_end|>"), ("text_config.pad_token_id", "<|endoftext|>")],
}
# What each family's prompt places for an image (chat families, through their chat template).
TEMPLATE_IMAGE = {"qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>", "smolvlm": "<image>",
                  "llava_onevision": "<image>"}


def _family_params():
    skip = pytest.mark.skip(reason="SmolVLM's processor needs num2words")
    return [f if f in BUILDABLE else pytest.param(f, marks=skip) for f in FAMILIES]


def _images():
    """Two different 178x218 RGB images (CelebA's size): gradients under different noise."""
    from PIL import Image

    out = []
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        y, x = np.mgrid[0:218, 0:178]
        base = np.stack([x * 255 / 177, y * 255 / 217, (x + y) * 255 / 394], axis=-1)
        noisy = base * rng.uniform(0.2, 1.0) + rng.normal(0, 40, base.shape)
        out.append(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB"))
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-models")
    return root, build_demo_models(root, families=BUILDABLE)


@pytest.fixture(scope="module")
def images():
    return _images()


def _load(folder):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoProcessor.from_pretrained(folder), AutoModelForImageTextToText.from_pretrained(folder).eval()


def _prompts(family: str, processor) -> list[str] | None:
    """Two prompts of different lengths (a batch of them pads), the family's way."""
    if family in CHAT:
        out = []
        for text in ("Describe the person.", "Describe the main subject of this image in one sentence."):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            out.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        return out
    if family == "paligemma":
        return ["caption en", "answer en what is the person wearing"]
    if family == "florence2":
        return ["<MORE_DETAILED_CAPTION>", "<CAPTION>"]
    return None  # BLIP-2: the image alone (a text prefix: test_blip2_text_prefix)


def _inputs(family, processor, images, prompts):
    kwargs = {"return_tensors": "pt", "padding": True}
    if family == "smolvlm":  # Idefics3-style processors take a list of images per prompt
        kwargs["images"] = [[image] for image in images]
    else:
        kwargs["images"] = list(images)
    if prompts is not None:
        kwargs["text"] = list(prompts)
    return processor(**kwargs)


def _generate(model, processor, inputs):
    """(all tokens, new tokens) of a greedy 8-token generation, run twice: it must be deterministic."""
    import torch

    first = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    again = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(first, again), "greedy generation differs between two calls"
    if model.config.is_encoder_decoder:  # Florence-2: the decoder's tokens, after decoder_start
        return first, first[:, 1:]
    if "input_ids" in inputs:  # decoder-only: the output starts with the prompt
        prompt = inputs["input_ids"]
        assert torch.equal(first[:, : prompt.shape[1]], prompt)
        return first, first[:, prompt.shape[1]:]
    # BLIP-2 without text: it generates after its query tokens' placeholders and bos
    skip = processor.num_query_tokens + 1
    assert (first[:, : processor.num_query_tokens] == model.config.image_token_index).all()
    return first, first[:, skip:]


@pytest.mark.parametrize("family", _family_params())
def test_folder_index_and_special_tokens(built, family):
    root, folders = built
    folder = Path(folders[family])
    assert folder.name == family and folder.parent == root
    index = json.loads((root / INDEX_FILE).read_text())
    entry = index[family]
    processor, model = _load(folder)
    assert entry["folder"] == str(folder)
    assert entry["class"] == type(model).__name__ and entry["processor"] == type(processor).__name__
    assert entry["params"] == sum(p.numel() for p in model.parameters())
    assert model.config.model_type == family
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < MAX_FOLDER_BYTES, f"{family}: {size} bytes"
    assert (folder / "model.safetensors").is_file()

    tok = processor.tokenizer
    assert model.config.get_text_config().vocab_size >= len(tok)
    for attr, token in CONFIG_TOKENS[family]:
        value = model.config
        for part in attr.split("."):
            value = getattr(value, part)
        assert value == tok.convert_tokens_to_ids(token) != tok.unk_token_id, (family, attr, token)
    image_token_id = getattr(processor, "image_token_id", None)
    if image_token_id is not None:
        assert image_token_id == tok.convert_tokens_to_ids("<|image_pad|>" if family == "qwen2_vl" else "<image>")
    gen = model.generation_config
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert tok.eos_token_id in eos and gen.pad_token_id == tok.pad_token_id and gen.do_sample is False
    if family == "florence2":
        assert gen.decoder_start_token_id == tok.eos_token_id and gen.forced_bos_token_id == tok.bos_token_id
    if family in CHAT:
        prompt = _prompts(family, processor)[0]
        assert TEMPLATE_IMAGE[family] in prompt and prompt.count(TEMPLATE_IMAGE[family]) == 1
        assert tok.unk_token_id not in tok(prompt)["input_ids"]  # every word and marker is in the vocabulary


@pytest.mark.parametrize("family", _family_params())
def test_generate_single_and_padded_batch(built, images, family):
    _, folders = built
    processor, model = _load(folders[family])
    prompts = _prompts(family, processor)
    if family in CHAT or family == "paligemma":
        processor.tokenizer.padding_side = "left"

    singles = []
    for i in range(2):
        inputs = _inputs(family, processor, images[i:i + 1], None if prompts is None else prompts[i:i + 1])
        _, new = _generate(model, processor, inputs)
        assert new.shape[0] == 1 and new.shape[1] >= 1
        singles.append(new[0])

    batch = _inputs(family, processor, images, prompts)
    if prompts is not None and family in CHAT | {"paligemma"}:  # the shorter prompt is left-padded
        assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][1].all()
    _, new = _generate(model, processor, batch)
    assert new.shape[0] == 2 and new.shape[1] >= 1
    captions = processor.batch_decode(new, skip_special_tokens=True)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    assert any(c.strip() for c in captions), captions
    pad = model.generation_config.pad_token_id
    for row, single in zip(new, singles):  # padding changes nothing: each row is its single run
        n = len(single)
        assert row[:n].tolist() == single.tolist()
        assert all(t == pad for t in row[n:].tolist())


def test_blip2_text_prefix(built, images):
    _, folders = built
    processor, model = _load(folders["blip-2"])
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=images, text=["a photo of", "a close up picture of a person"], return_tensors="pt",
                       padding=True)
    assert (inputs["input_ids"][:, : processor.num_query_tokens] == model.config.image_token_index).all()
    _, new = _generate(model, processor, inputs)
    assert new.shape[0] == 2 and new.shape[1] >= 1
    captions = processor.batch_decode(new, skip_special_tokens=True)
    assert all(isinstance(c, str) for c in captions)


def test_rebuild_is_byte_identical(built, tmp_path):
    _, folders = built
    again = build_demo_models(tmp_path, families=["qwen2_vl"])
    first, second = Path(folders["qwen2_vl"]), Path(again["qwen2_vl"])
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir()) and "model.safetensors" in names
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    other = build_demo_models(tmp_path / "seed1", families=["qwen2_vl"], seed=1)
    assert (Path(other["qwen2_vl"]) / "model.safetensors").read_bytes() != (first / "model.safetensors").read_bytes()


def test_unknown_family_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown demo model family"):
        build_demo_models(tmp_path, families=["llava"])
    assert not any(tmp_path.iterdir())


def test_cli_demo_models(tmp_path):
    from typer.testing import CliRunner

    from prep.cli import app

    runner = CliRunner()
    out = tmp_path / "models"
    result = runner.invoke(app, ["demo-models", str(out), "--family", "florence2", "--family", "paligemma"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    index = json.loads((out / INDEX_FILE).read_text())
    assert sorted(index) == ["florence2", "paligemma"]
    assert lines[:2] == [f"{t}: {out / t} ({index[t]['params']} parameters)" for t in ("florence2", "paligemma")]
    assert lines[-1] == f"try: prep run --input ... --caption-model {out / 'florence2'} --preset tiny ..."

    bad = runner.invoke(app, ["demo-models", str(tmp_path / "bad"), "--family", "nope"])
    assert bad.exit_code == 2 and "unknown demo model family" in bad.output
