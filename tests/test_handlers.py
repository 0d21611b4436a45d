"""Level 1: each model stage's handler on a tiny model, called the way RunInference calls it."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from prep.schemas.records import Sample
from prep.transforms.caption import CaptionHandler, clean_caption
from prep.transforms.decode import decode_image, load_rgb
from prep.transforms.embed import EmbedHandler, embed_dim, load_clip, null_embedding
from prep.device import resolve_device
from prep.transforms.inference import ModelUnavailable, Reject
from prep.transforms.mask import MaskHandler, binarize, load_mask, mask_png, masked_image


def _jpeg(seed: int, size=(48, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    arr[size[1] // 4 : 3 * size[1] // 4, size[0] // 4 : 3 * size[0] // 4] = (200, 60, 40)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=92)
    jpeg, _, _ = decode_image(buf.getvalue())
    return jpeg


def _sample(i: int, **kw) -> Sample:
    jpeg = _jpeg(i)
    w, h = Image.open(io.BytesIO(jpeg)).size
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 255
    defaults = dict(key=f"k{i}", source="test", domain="specific", path=f"/x/{i}.jpg", identity="1",
                    image_jpeg=jpeg, width=w, height=h, mask_png=mask_png(mask))
    defaults.update(kw)
    return Sample(**defaults)


# -- device ------------------------------------------------------------------------------

def test_device_auto_falls_back_to_cpu_without_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"


# -- caption -----------------------------------------------------------------------------

def test_clean_caption_strips_whitespace_and_prompt_echo():
    assert clean_caption("  a   photo\nof a dog ") == "a photo of a dog"
    assert clean_caption("A photo of a dog wearing a hat", prompt="a photo of") == "a dog wearing a hat"
    assert clean_caption("a dog", prompt="a photo of") == "a dog"


def test_caption_handler_matches_direct_generate(tiny):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from prep.transforms.caption import Flagged

    # 8 new tokens: the tiny captioner runs into the limit (flagged "cut"; kept here to compare).
    handler = CaptionHandler(tiny.captioner, max_new_tokens=8, device="cpu", max_batch_size=4, on_bad="keep")
    model = handler.load_model()
    samples = [_sample(i) for i in range(3)]
    results = list(handler.run_inference(samples, model))
    assert [r.example.key for r in results] == ["k0", "k1", "k2"]
    assert all(isinstance(r.inference, Flagged) and r.inference.flags == ("cut at the token limit",) for r in results)
    captions = [r.inference.text for r in results]
    assert all(isinstance(c, str) and c for c in captions)

    processor = AutoProcessor.from_pretrained(tiny.captioner)
    net = AutoModelForImageTextToText.from_pretrained(tiny.captioner).eval()
    images = [load_rgb(s.image_jpeg) for s in samples] + [load_rgb(samples[-1].image_jpeg)]  # padded to 4
    with torch.inference_mode():
        out = net.generate(**processor(images=images, return_tensors="pt"), max_new_tokens=8, do_sample=False)
    expected = [clean_caption(t) for t in processor.batch_decode(out, skip_special_tokens=True)][:3]
    assert captions == expected
    kept = handler.apply(samples[0], results[0].inference)
    assert kept.caption_vlm == captions[0] and kept.caption_flags == ("cut at the token limit",)
    # The default drops it: a dead letter naming the guard, with the raw text.
    dropping = CaptionHandler(tiny.captioner, max_new_tokens=8, device="cpu", max_batch_size=4)
    [first] = [r.inference for r in dropping.run_inference(samples[:1], dropping.load_model())]
    assert first.kind.value == "caption cut at the token limit" and first.reason.endswith(f"{captions[0]!r}")


def test_caption_prepare_calls_the_image_processor_alone_only_where_it_is_the_same(tiny):
    import torch
    from transformers import AutoProcessor

    samples = [_sample(i) for i in range(3)]
    processor = AutoProcessor.from_pretrained(tiny.captioner)
    expected = [dict(processor(images=[load_rgb(s.image_jpeg)], return_tensors="pt")) for s in samples]

    handler = CaptionHandler(tiny.captioner, device="cpu")
    calls = []
    real = handler.processor()
    real_image_processor = real.image_processor

    class Counting:  # counts the full processor's calls; the image processor is the real one
        image_processor = real_image_processor

        def __call__(self, **kwargs):
            calls.append(sorted(kwargs))
            return real(**kwargs)

    handler._processor_cache = Counting()
    got = [handler.prepare(s, None) for s in samples]
    assert handler._images_only is True and len(calls) == 1  # the first image decided it
    for g, e in zip(got, expected):
        assert g.keys() == e.keys() and all(torch.equal(g[k], e[k]) for k in e)

    class AddsTokens(Counting):  # a processor whose images-only output is more than pixels
        def __call__(self, **kwargs):
            out = dict(super().__call__(**kwargs))
            out["input_ids"] = torch.tensor([[1, 2, 3]])
            return out

    other = CaptionHandler(tiny.captioner, device="cpu")
    other._processor_cache = AddsTokens()
    calls.clear()
    got = [other.prepare(s, None) for s in samples]
    assert other._images_only is False and len(calls) == 3
    assert all(set(g) == {"pixel_values", "input_ids"} for g in got)
    assert pickle_roundtrip(handler)._images_only is None  # decided again in each worker process


def pickle_roundtrip(obj):
    import pickle

    return pickle.loads(pickle.dumps(obj))  # deliberate: our own handler, as Beam ships it


def test_caption_batch_with_one_bad_element_keeps_the_others(tiny):
    handler = CaptionHandler(tiny.captioner, max_new_tokens=6, device="cpu", max_batch_size=4)
    model = handler.load_model()
    good = [_sample(i) for i in range(3)]
    bad = _sample(9, image_jpeg=b"\xff\xd8\xff\xe0 not really a jpeg")
    results = list(handler.run_inference([good[0], bad, good[1], good[2]], model))
    assert isinstance(results[1].inference, Reject)
    assert "preprocessing failed" in results[1].inference.reason
    alone = list(handler.run_inference(good, model))
    assert [r.inference for r in (results[0], results[2], results[3])] == [r.inference for r in alone]


def test_caption_batch_failure_is_retried_per_element(tiny, monkeypatch):
    """If the model call fails for the batch, each element is retried alone; only the culprit is lost."""
    handler = CaptionHandler(tiny.captioner, max_new_tokens=6, device="cpu", max_batch_size=4, on_bad="keep")
    model = handler.load_model()
    samples = [_sample(i) for i in range(3)]
    poisoned = handler.prepare(samples[1], model)["pixel_values"]
    real_infer = CaptionHandler.infer

    def flaky(self, prepared, m):
        if any(p["pixel_values"].equal(poisoned) for p in prepared):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_infer(self, prepared, m)

    monkeypatch.setattr(CaptionHandler, "infer", flaky)
    results = list(handler.run_inference(samples, model))
    assert isinstance(results[1].inference, Reject) and "simulated" in results[1].inference.reason
    assert not isinstance(results[0].inference, Reject) and not isinstance(results[2].inference, Reject)


def test_missing_caption_model_gives_a_clear_error(tmp_path):
    handler = CaptionHandler(str(tmp_path / "no-such-model"), device="cpu")
    with pytest.raises(ModelUnavailable, match="could not be loaded.*save_pretrained"):
        handler.load_model()
    hub = CaptionHandler("nobody-xyz/not-a-model-prep-test", device="cpu")
    with pytest.raises(ModelUnavailable, match="HF_HOME"):
        hub.load_model()


# -- mask --------------------------------------------------------------------------------

def test_binarize_only_0_and_255_at_threshold():
    soft = np.array([[0, 127, 128, 255]], np.uint8)
    assert binarize(soft, 0.5).tolist() == [[0, 0, 255, 255]]
    assert binarize(soft, 0.9).tolist() == [[0, 0, 0, 255]]


def test_mask_handler_binary_mask_at_image_size(tiny):
    handler = MaskHandler(tiny.mask_onnx, device="cpu")
    session = handler.load_model()
    samples = [_sample(i) for i in range(3)]
    results = list(handler.run_inference(samples, session))
    for sample, result in zip(samples, results):
        png, fraction = result.inference
        mask = load_mask(png)
        assert mask.mode == "L" and mask.size == (sample.width, sample.height)
        values = set(np.unique(np.asarray(mask)).tolist())
        assert values <= {0, 255}
        assert fraction == pytest.approx(np.count_nonzero(np.asarray(mask)) / (sample.width * sample.height))


def test_mask_floor_rejects_with_reason(tiny):
    handler = MaskHandler(tiny.mask_onnx, device="cpu", min_fraction=0.9999)
    results = list(handler.run_inference([_sample(1)], handler.load_model()))
    assert isinstance(results[0].inference, Reject)
    assert "below the floor" in results[0].inference.reason


def test_missing_mask_model_gives_a_clear_error(tmp_path):
    with pytest.raises(ModelUnavailable, match="does not exist"):
        MaskHandler(str(tmp_path / "nope.onnx")).load_model()


def test_masked_image_keeps_object_and_fills_background():
    img = Image.new("RGB", (4, 2), (10, 20, 30))
    mask = Image.fromarray(np.array([[255, 0, 0, 255], [0, 0, 255, 0]], np.uint8), "L")
    out = np.asarray(masked_image(img, mask, (255, 0, 255)))
    assert out[0, 0].tolist() == [10, 20, 30] and out[1, 2].tolist() == [10, 20, 30]
    assert out[0, 1].tolist() == [255, 0, 255] and out[1, 0].tolist() == [255, 0, 255]


# -- embed -------------------------------------------------------------------------------

def test_embed_handler_equals_open_clip_on_masked_image(tiny):
    import torch

    handler = EmbedHandler(tiny.clip_config, tiny.clip_weights, device="cpu", max_batch_size=4)
    loaded = handler.load_model()
    samples = [_sample(i) for i in range(3)]
    embs = [r.inference for r in handler.run_inference(samples, loaded)]
    net, preprocess = load_clip(tiny.clip_config, tiny.clip_weights)
    for sample, emb in zip(samples, embs):
        assert emb.dtype == np.float32 and emb.shape == (embed_dim(tiny.clip_config),)
        assert np.linalg.norm(emb) == pytest.approx(1.0, abs=1e-5)
        x = preprocess(masked_image(load_rgb(sample.image_jpeg), load_mask(sample.mask_png))).unsqueeze(0)
        with torch.inference_mode():
            ref = torch.nn.functional.normalize(net.encode_image(x), dim=-1)[0].numpy()
        np.testing.assert_allclose(emb, ref, atol=1e-5)
    # The background matters only through the mask: a different fill changes the embedding.
    other = EmbedHandler(tiny.clip_config, tiny.clip_weights, device="cpu", fill=(0, 0, 0), max_batch_size=4)
    assert not np.allclose(list(other.run_inference(samples[:1], other.load_model()))[0].inference, embs[0])


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_embed_runs_in_half_precision(tiny, precision):
    """The GPU's default precision: open_clip's half casts leave class_embedding in fp32, so the
    input must take the first layer's dtype, not the first parameter's (the first GPU check
    failed on exactly this: float input to a half conv). Same check on CPU, same code path."""
    half = EmbedHandler(tiny.clip_config, tiny.clip_weights, device="cpu", precision=precision, max_batch_size=4)
    full = EmbedHandler(tiny.clip_config, tiny.clip_weights, device="cpu", max_batch_size=4)
    samples = [_sample(i) for i in range(2)]
    got = [r.inference for r in half.run_inference(samples, half.load_model())]
    ref = [r.inference for r in full.run_inference(samples, full.load_model())]
    for a, b in zip(got, ref):
        assert a.dtype == np.float32 and np.linalg.norm(a) == pytest.approx(1.0, abs=1e-3)
        assert float(np.dot(a, b)) > 0.99


def test_embedding_independent_of_batch_companions(tiny):
    """Padded fixed-size batches: an element's embedding is bit-identical in any batch."""
    handler = EmbedHandler(tiny.clip_config, tiny.clip_weights, device="cpu", max_batch_size=4)
    loaded = handler.load_model()
    a = [_sample(i) for i in range(4)]
    alone = list(handler.run_inference(a[:1], loaded))[0].inference
    in_batch = list(handler.run_inference([a[3], a[2], a[0]], loaded))[2].inference
    assert np.array_equal(alone, in_batch)


def test_embed_dim_and_null_embedding(tiny):
    assert embed_dim(tiny.clip_config) == 32
    assert embed_dim("ViT-B-32") == 512 and embed_dim("ViT-L-14") == 768
    phi = null_embedding(32)
    assert phi.dtype == np.float32 and phi.shape == (32,) and not phi.any()


def test_missing_clip_weights_give_a_clear_error(tiny, tmp_path):
    with pytest.raises(ModelUnavailable, match="--clip-pretrained"):
        load_clip(tiny.clip_config, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ModelUnavailable, match="unknown open_clip model"):
        embed_dim("ViT-Nonexistent-99")


@pytest.mark.parametrize("size", [224, 32, (40, 56)])
@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_uint8_split_equals_the_whole_transform_bit_for_bit(size, resize_mode, mode):
    """The host half (uint8 pixels) then the device half (scale, normalise on the batch) give
    exactly the float tensor open_clip's whole transform gives, for each resize mode."""
    import torch
    from open_clip import image_transform

    from prep.transforms.embed import LoadedClip

    preprocess = image_transform(size, is_train=False, resize_mode=resize_mode)
    loaded = LoadedClip(None, preprocess, "cpu")
    assert loaded.host is not None, "open_clip's eval transform splits"
    rng = np.random.default_rng(7)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode)
              for w, h in [(178, 218), (300, 97), (31, 33)]]
    prepared = [loaded.host_pixels(im) for im in images]
    assert all(p.dtype == np.uint8 and p.ndim == 3 and p.shape[2] == 3 for p in prepared)
    got = loaded.device_pixels(loaded.batch(prepared))
    want = torch.stack([preprocess(im) for im in images])
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want)


def test_a_transform_that_does_not_split_runs_whole_on_the_host():
    import torch
    from torchvision.transforms import Compose, Normalize, Resize, ToTensor

    from prep.transforms.embed import LoadedClip, split_preprocess

    odd = Compose([Resize(16), ToTensor(), Normalize((0.5,) * 3, (0.5,) * 3), lambda t: t * 2])
    assert split_preprocess(odd) is None
    assert split_preprocess(lambda im: im) is None
    loaded = LoadedClip(None, odd, "cpu")
    images = [Image.new("RGB", (20, 24), (i * 40, 10, 200)) for i in range(2)]
    prepared = [loaded.host_pixels(im) for im in images]
    assert all(isinstance(p, torch.Tensor) and p.dtype == torch.float32 for p in prepared)
    assert torch.equal(loaded.device_pixels(loaded.batch(prepared)), torch.stack([odd(im) for im in images]))


def test_masked_image_gives_the_same_composite_from_other_modes():
    img = Image.new("RGB", (4, 2), (10, 20, 30))
    mask = Image.fromarray(np.array([[255, 0, 0, 255], [0, 0, 255, 0]], np.uint8), "L")
    want = np.asarray(masked_image(img, mask, (255, 0, 255)))
    # Other modes of the same pixels give the same composite.
    got = np.asarray(masked_image(img.convert("RGBA"), mask.convert("1"), (255, 0, 255)))
    assert np.array_equal(got, want)
    assert np.asarray(img).tolist() == [[[10, 20, 30]] * 4] * 2, "the input is not changed"


def test_a_model_load_takes_the_live_heap_out_of_later_collections(tiny):
    """After a load, what is alive (the model included) is frozen: full collections then walk
    only what the run makes afterwards. A model handed on by keep_models does not collect again."""
    import gc

    from prep.transforms.inference import keep_models

    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    loaded = EmbedHandler(tiny.clip_config, tiny.clip_weights, device="cpu").load_model()
    assert gc.get_freeze_count() > 1000
    assert not any(o is loaded for o in gc.get_objects()), "frozen objects are outside the generations"
    gc.unfreeze()
    collects = []
    gc.callbacks.append(lambda phase, info: phase == "start" and info["generation"] == 2 and collects.append(1))
    try:
        with keep_models():
            first = EmbedHandler(tiny.clip_config, tiny.clip_weights, device="cpu").load_model()
            n = len(collects)
            again = EmbedHandler(tiny.clip_config, tiny.clip_weights, device="cpu").load_model()
    finally:
        gc.callbacks.pop()
    assert again is first and n >= 1 and len(collects) == n
