"""The caption guards (transforms/caption_guards.py) and the captioner families
(transforms/captioners.py): each guard on the failure it names, the preamble trimmed, the
flags the contract knows, and an unsupported family refused in the preflight."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from prep.schemas import contract
from prep.transforms import caption_guards as g
from prep.transforms.captioners import FAMILIES, UnsupportedCaptioner, family_of, read_model_type


@pytest.mark.parametrize("raw, flags", [
    ("a smiling woman with long brown hair", ()),
    ("a man a man a man a man with a hat", (g.REPETITION,)),
    ("the the the the cat", (g.REPETITION,)),
    ("wearing a hat wearing a hat wearing a hat", (g.REPETITION,)),
    ("face " * 20, (g.REPETITION,)),
    ("I'm sorry, I can't help with identifying people in images.", (g.REFUSAL,)),
    ("As an AI, I cannot see the image.", (g.REFUSAL,)),
    ("USER: Describe the person. ASSISTANT: a man", (g.ECHO,)),
    ("<|im_start|>assistant a woman", (g.ECHO,)),
    ("Describe the main subject of this image in one sentence. A dog.", (g.ECHO,)),
    ("", (g.EMPTY,)),
    ("   ", (g.EMPTY,)),
])
def test_each_guard_flags_its_failure(raw, flags):
    checked = g.check(raw, instruction="Describe the main subject of this image in one sentence.")
    assert checked.flags == flags, (raw, checked)


def test_cut_at_the_token_limit_is_a_flag_the_stage_decides():
    assert g.check("a woman with", cut=True).flags == (g.CUT,)
    assert g.check("a woman with", cut=False).flags == ()


@pytest.mark.parametrize("raw, kept", [
    ("The image shows a woman smiling at the camera.", "a woman smiling at the camera."),
    ("This is a photo of a brown dog on grass", "a brown dog on grass"),
    ("In this image, we can see a man in a suit", "a man in a suit"),
    ("The picture depicts two children", "two children"),
    ("a photo of a dog", "a photo of a dog"),  # BLIP's own style is not a preamble
    ("The image shows", "The image shows"),  # nothing after it: kept as is
])
def test_a_preamble_is_trimmed_not_rejected(raw, kept):
    checked = g.check(raw)
    assert checked.text == kept and checked.flags == ()


def test_the_contract_knows_every_flag():
    """schemas/ sits below transforms/ (tests/test_layers.py): the list is written twice, kept equal here."""
    assert g.FLAGS == contract.CAPTION_FLAGS


def test_families_by_model_type_and_an_unknown_one_names_the_supported():
    assert family_of("qwen2_5_vl").name == "Qwen2-VL" and family_of("idefics3").name == "SmolVLM"
    assert family_of("blip-2").per_element and not family_of("paligemma").per_element
    assert [f.chat for f in FAMILIES] == [False, False, False, False, True, True, True]
    with pytest.raises(UnsupportedCaptioner) as err:
        family_of("bert")
    for family in FAMILIES:
        assert family.name in str(err.value)


def test_an_unsupported_caption_model_is_refused_in_the_preflight(tmp_path, demo, tiny_cache):
    from prep.cli import app

    model = tmp_path / "bert"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (model / "model.safetensors").write_bytes(b"")
    assert read_model_type(str(model)) == "bert"
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", "--input", f"celeba:{demo['celeba_dir']}", "--out", str(out),
                                      "--preset", "tiny", "--model-cache", tiny_cache, "--caption-model", str(model),
                                      "--no-progress"])
    assert result.exit_code == 2, result.output
    assert "caption model type 'bert'" in result.output and "Qwen2-VL (qwen2_vl/qwen2_5_vl)" in result.output
    assert "Traceback" not in result.output and not out.exists()


@pytest.fixture
def canned_captions(monkeypatch):
    """The captioner's decoded text replaced, in turn, by a refusal, a repetition loop and a
    caption with a preamble (the stage's own guards then judge them): a stub of the failures
    instruction VLMs produce, through the whole pipeline."""
    can(monkeypatch, ["I'm sorry, I can't describe people in images.", "a man a man a man a man",
                      "The image shows a smiling woman."])


def can(monkeypatch, canned: list[str]) -> None:
    """Every caption the stage decodes is the next of `canned`, in turn."""
    import itertools
    import threading

    from prep.transforms.caption import CaptionHandler

    texts = itertools.cycle(canned)
    lock = threading.Lock()
    real = CaptionHandler.processor

    class Canned:
        def __init__(self, processor):
            self._processor = processor

        def __getattr__(self, name):
            return getattr(self._processor, name)

        def __call__(self, *args, **kwargs):
            return self._processor(*args, **kwargs)

        def decode(self, ids, **kwargs):
            with lock:
                return next(texts)

    monkeypatch.setattr(CaptionHandler, "processor", lambda self: Canned(real(self)))


@pytest.mark.parametrize("on_bad", ["drop", "keep"])
def test_flagged_captions_are_dropped_or_kept_and_the_counts_reconcile(canned_captions, demo, tiny_cache, tmp_path,
                                                                      on_bad):
    from conftest import demo_config
    from prep.pipeline.run import run
    from prep.schemas.validate import validate_output

    out = tmp_path / "out"
    manifest = run(demo_config(demo, str(out), tiny_cache, caption_on_bad=on_bad), [])
    assert manifest["reconciled"] and validate_output(str(out)).ok
    captioned = 24  # the demo's specific samples (general ones are not captioned)
    third = captioned // 3
    reasons = manifest["dead_letter_reasons"]
    samples = []
    for tar in sorted(out.glob("**/specific/*.tar")):
        with open(tar, "rb") as f:
            samples += [json.loads(s["json"]) for s in contract.iter_samples(f)]
    if on_bad == "drop":
        assert reasons["caption: caption is a refusal"] == third
        assert reasons["caption: caption is a repetition loop"] == third
        assert manifest["counts"]["specific"] == third and "caption_flags" not in manifest
        assert {s["caption_vlm"] for s in samples} == {"a smiling woman."}  # the preamble trimmed
        letters = [json.loads(line) for line in (out / contract.DEAD_LETTER_FILE).read_text().splitlines()]
        refusal = next(letter for letter in letters if letter["kind"] == "caption is a refusal")
        assert refusal["stage"] == "caption" and "I'm sorry, I can't describe people" in refusal["reason"]
    else:
        assert not any(k.startswith("caption:") for k in reasons)
        assert manifest["caption_flags"] == {"refusal": third, "repetition loop": third}
        assert manifest["counts"]["specific"] == captioned
        flags = sorted(tuple(s.get("caption_flags", ())) for s in samples)
        assert flags == sorted([()] * third + [("refusal",)] * third + [("repetition loop",)] * third)


def test_a_chat_model_without_a_chat_template_is_refused_in_the_preflight(tmp_path, demo, tiny_cache):
    """An instruction needs the template to be placed: refused before the run, naming the fix."""
    import shutil

    from prep.cli import app
    from prep.models.demo_models import build_demo_models
    from prep.transforms.captioners import has_chat_template

    folder = build_demo_models(str(tmp_path / "models"), ["qwen2_vl"])["qwen2_vl"]
    assert has_chat_template(folder)
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    (bare / "chat_template.jinja").unlink()
    assert not has_chat_template(str(bare))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", "--input", f"celeba:{demo['celeba_dir']}", "--out", str(out),
                                      "--preset", "tiny", "--model-cache", tiny_cache, "--caption-model", str(bare),
                                      "--no-progress"])
    assert result.exit_code == 2, result.output
    assert "Qwen2-VL chat model without a chat template" in result.output and not out.exists()


def test_empty_and_echoed_captions_through_a_chat_model(monkeypatch, demo, tiny_cache, tmp_path):
    """The two guards a chat model's answer meets beyond the three above, through the pipeline
    with a chat family (the echo check needs its instruction): an empty answer is dropped even
    under keep (nothing to write), an echo of the instruction is kept with its flag."""
    from conftest import demo_config
    from prep.models.demo_models import build_demo_models
    from prep.pipeline.run import run
    from prep.schemas.validate import validate_output
    from prep.transforms.captioners import DEFAULT_INSTRUCTION

    folder = build_demo_models(str(tmp_path / "models"), ["qwen2_vl"])["qwen2_vl"]
    can(monkeypatch, ["", f"{DEFAULT_INSTRUCTION} A dog.", "a photo of a person"])
    out = tmp_path / "out"
    manifest = run(demo_config(demo, str(out), tiny_cache, caption_model=folder, caption_on_bad="keep"), [])
    assert manifest["reconciled"] and validate_output(str(out)).ok
    third = 24 // 3
    assert manifest["dead_letter_reasons"]["caption: captioner produced an empty caption"] == third
    assert manifest["caption_flags"] == {"echo": third}
    samples = []
    for tar in sorted(out.glob("**/specific/*.tar")):
        with open(tar, "rb") as f:
            samples += [json.loads(s["json"]) for s in contract.iter_samples(f)]
    assert sorted(tuple(s.get("caption_flags", ())) for s in samples) == sorted([()] * third + [("echo",)] * third)
