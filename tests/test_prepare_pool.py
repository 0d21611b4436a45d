"""Preparing on a thread pool (transforms/inference.py) changes nothing but speed: the same
results in the same order, byte-identical shards, and a failing prepare costs only its element."""

from __future__ import annotations

import json
import os
import pickle
import threading

import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline

from conftest import assert_same_output, demo_config, fn_api_runner
from prep.schemas.records import DeadLetterKind
from prep.pipeline.build import build_pipeline, plan_run
from prep.pipeline.config import RunConfig
from prep.schemas.records import Sample
from prep.transforms.embed import EmbedHandler
from prep.transforms.inference import PIPELINE_CHUNKS, Reject, StageHandler
from test_handlers import _sample


class _Doubler(StageHandler):
    """A model stage whose 'model' doubles a number; prepare fails for keys in `bad`."""

    stage = "double"

    def __init__(self, bad=(), **kw):
        super().__init__(**kw)
        self.bad = frozenset(bad)
        self.prepare_threads_seen: set[str] = set()
        self.batches: list[int] = []

    def load_model(self):
        return 2

    def prepare(self, sample: Sample, model):
        self.prepare_threads_seen.add(threading.current_thread().name)
        if sample.key in self.bad:
            raise ValueError(f"cannot prepare {sample.key}")
        return int(sample.key[1:])

    def infer(self, prepared, model):
        self.batches.append(len(prepared))
        return [p * model for p in prepared]

    def apply(self, sample, result):
        return sample


def _samples(n: int) -> list[Sample]:
    return [Sample(key=f"k{i}", source="t", domain="specific", path=f"/{i}") for i in range(n)]


def test_default_run_config_uses_a_pool():
    """The shared pipeline_run fixture (the byte-identity reference below) runs pooled."""
    assert RunConfig(inputs=["x"], out="y").prepare_threads > 1


def test_pool_keeps_order_pads_each_chunk_and_isolates_a_failing_prepare():
    serial = _Doubler(bad={"k5"}, max_batch_size=4, prepare_threads=1)
    pooled = _Doubler(bad={"k5"}, max_batch_size=4, prepare_threads=3)
    assert pooled.batch_elements_kwargs()["max_batch_size"] == 4 * PIPELINE_CHUNKS
    batch = _samples(11)  # chunks of 4, 4, 3 (the last padded to 4)
    want = [Reject(DeadLetterKind.PREPROCESSING_FAILED, "preprocessing failed: ValueError: cannot prepare k5") if i == 5 else 2 * i for i in range(11)]
    for handler in (serial, pooled):
        out = list(handler.run_inference(batch, handler.load_model()))
        assert [r.example.key for r in out] == [s.key for s in batch]
        assert [r.inference for r in out] == want
    assert pooled.batches == [4, 4, 4]  # every model call is a full, fixed-size batch
    assert all(name.startswith("prep-double") for name in pooled.prepare_threads_seen)
    assert serial.prepare_threads_seen == {threading.current_thread().name}


class _Model:
    pass


class _CountsCalls(_Doubler):
    calls: list[int] = []  # class level: Beam runs a pickled copy of the handler (in this process)

    def load_model(self):
        return _Model()  # Beam's Shared holds the model by weak reference: not an int

    def infer(self, prepared, model):
        return list(prepared)

    def run_inference(self, batch, model, inference_args=None):
        batch = list(batch)
        _CountsCalls.calls.append(len(batch))
        return super().run_inference(batch, model, inference_args)


def test_padded_pool_stage_asks_beam_for_whole_calls():
    """BatchElements' adaptive sizes between one model batch and a call's worth (9, 17, ...)
    would each end in a padded model batch: a full model call for one or two elements."""
    from prep.transforms.inference import ModelStage
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    pooled = _CountsCalls(max_batch_size=4, prepare_threads=2)
    assert pooled.batch_elements_kwargs() == {"min_batch_size": 16, "max_batch_size": 16}
    serial = _CountsCalls(max_batch_size=4, prepare_threads=1)
    assert serial.batch_elements_kwargs() == {"min_batch_size": 4, "max_batch_size": 4}

    class PerImage(_CountsCalls):  # a model that runs per image (rembg, dlib): nothing to pad
        pad_batches = False

    # Pooled, it too asks for whole calls (a smaller call leaves the pool idle at its end)...
    assert PerImage(max_batch_size=4, prepare_threads=2).batch_elements_kwargs() == {
        "min_batch_size": 16, "max_batch_size": 16}
    # ...serial, it keeps BatchElements' adaptive ramp; a minimum given by the caller stands.
    assert PerImage(max_batch_size=4).batch_elements_kwargs() == {"min_batch_size": 1, "max_batch_size": 4}
    assert PerImage(max_batch_size=4, min_batch_size=2, prepare_threads=2).batch_elements_kwargs() == {
        "min_batch_size": 2, "max_batch_size": 16}
    _CountsCalls.calls = []
    with TestPipeline(runner=fn_api_runner()) as p:
        ok, dead = p | beam.Create(_samples(203)) | ModelStage(pooled)
        assert_that(ok | beam.Map(lambda s: s.key), equal_to([f"k{i}" for i in range(203)]))
    assert sum(_CountsCalls.calls) == 203
    # Every call is a whole one (16 = 4 model batches of 4) but the bundle's last: 12 x 16 + 11.
    assert sorted(_CountsCalls.calls) == [11] + [16] * 12, _CountsCalls.calls


def test_pool_batch_failure_is_retried_per_element():
    class FailsOnSeven(_Doubler):
        def infer(self, prepared, model):
            if 7 in prepared:
                raise RuntimeError("seven")
            return super().infer(prepared, model)

    handler = FailsOnSeven(max_batch_size=4, prepare_threads=2)
    out = [r.inference for r in handler.run_inference(_samples(9), 2)]
    assert out[7] == Reject(DeadLetterKind.INFERENCE_FAILED, "inference failed: RuntimeError: seven")
    assert [o for i, o in enumerate(out) if i != 7] == [2 * i for i in range(9) if i != 7]


def test_handler_with_a_live_pool_pickles():
    handler = _Doubler(max_batch_size=2, prepare_threads=2)
    list(handler.run_inference(_samples(3), 2))
    clone = pickle.loads(pickle.dumps(handler))  # deliberate: our own handler, as Beam ships it
    assert [r.inference for r in clone.run_inference(_samples(3), 2)] == [0, 2, 4]


def test_prepare_threads_must_be_positive():
    with pytest.raises(ValueError, match="prepare_threads"):
        _Doubler(prepare_threads=0)
    with pytest.raises(ValueError, match="--prepare-threads"):
        RunConfig(inputs=["x"], out="y", prepare_threads=0).validate()


def test_embeddings_identical_with_and_without_pool(tiny):
    """Real preprocessing (decode, composite, resize) on pool threads gives the same bytes."""
    batch = [_sample(i) for i in range(10)]
    batch[3] = batch[3].with_(image_jpeg=b"not a jpeg")
    outs = []
    for threads in (1, 4):
        handler = EmbedHandler(tiny.clip_config, tiny.clip_weights, device="cpu", max_batch_size=4,
                               prepare_threads=threads)
        outs.append([r.inference for r in handler.run_inference(batch, handler.load_model())])
    serial, pooled = outs
    for out in (serial, pooled):  # (PIL's message names a BytesIO address: compare the start)
        assert isinstance(out[3], Reject) and out[3].reason.startswith("preprocessing failed: UnidentifiedImageError")
    for i in (0, 1, 2, 4, 5, 6, 7, 8, 9):
        assert serial[i].tobytes() == pooled[i].tobytes(), i
        assert np.isfinite(serial[i]).all()


def test_shards_byte_identical_with_and_without_pool(pipeline_run, demo, tiny_cache, tmp_path):
    """The whole pipeline with prepare_threads=1 writes exactly the pooled run's bytes."""
    assert pipeline_run["config"].prepare_threads > 1
    out = str(tmp_path / "serial")
    plan = plan_run(demo_config(demo, out, tiny_cache, prepare_threads=1))
    assert plan.embed.prepare_threads == plan.mask.prepare_threads == plan.caption.prepare_threads == 1
    with TestPipeline(runner=fn_api_runner()) as p:
        build_pipeline(p, plan)
    first = pipeline_run["out"]
    names = assert_same_output(first, out)
    assert sum(n.endswith(".tar") for n in names) >= 2
    assert json.load(open(os.path.join(first, "manifest.json")))["counts"]["dead_lettered"] >= 1  # the corrupt image


def _direct_captions(tiny, samples, prompt=None, pad_to=4):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from prep.transforms.caption import clean_caption
    from prep.transforms.decode import load_rgb

    processor = AutoProcessor.from_pretrained(tiny.captioner)
    net = AutoModelForImageTextToText.from_pretrained(tiny.captioner).eval()
    images = [load_rgb(s.image_jpeg) for s in samples]
    images += [images[-1]] * (pad_to - len(images))
    kwargs = {"images": images, "return_tensors": "pt"}
    if prompt:
        kwargs["text"] = [prompt] * len(images)
    with torch.inference_mode():
        out = net.generate(**processor(**kwargs), max_new_tokens=6, do_sample=False)
    return [clean_caption(t, prompt) for t in processor.batch_decode(out, skip_special_tokens=True)][: len(samples)]


def _text(caption) -> str:
    """A caption's text, also of one the guards flagged and kept (6 tokens run into the limit)."""
    from prep.transforms.caption import Flagged

    return caption.text if isinstance(caption, Flagged) else caption


def test_caption_with_prompt_on_pool_matches_one_batched_processor_call(tiny):
    from prep.transforms.caption import CaptionHandler

    samples = [_sample(i) for i in range(3)]
    handler = CaptionHandler(tiny.captioner, prompt="a photo of", max_new_tokens=6, device="cpu",
                             max_batch_size=4, prepare_threads=3, on_bad="keep")  # 6 tokens: cut, kept
    got = [_text(r.inference) for r in handler.run_inference(samples, handler.load_model())]
    assert got == _direct_captions(tiny, samples, prompt="a photo of")


def test_caption_runs_through_beams_large_model_proxy(tiny):
    """Large-model mode hands the workers a proxy that exposes methods only: the stage must
    call the model through `generate`, with its processor loaded locally."""
    import uuid

    from apache_beam.utils import multi_process_shared

    from prep.transforms.caption import CaptionHandler

    handler = CaptionHandler(tiny.captioner, max_new_tokens=6, device="cpu", max_batch_size=4,
                             large_model=True, prepare_threads=2, on_bad="keep")
    assert handler.share_model_across_processes()
    shared = multi_process_shared.MultiProcessShared(handler.load_model, tag=f"prep-test-{uuid.uuid4().hex}",
                                                     always_proxy=True)
    proxy = shared.acquire()
    try:
        worker_side = pickle.loads(pickle.dumps(handler))  # deliberate: as a worker process receives it
        samples = [_sample(i) for i in range(3)]
        got = [_text(r.inference) for r in worker_side.run_inference(samples, proxy)]
    finally:
        shared.release(proxy)
    assert got == _direct_captions(tiny, samples)


def test_failing_finish_dead_letters_only_its_element_with_and_without_pool():
    class FinishFailsOnSix(_Doubler):
        def finish(self, output):
            if output == 6:
                raise ValueError("cannot finish 6")
            return output + 1

    for threads in (1, 3):
        handler = FinishFailsOnSix(max_batch_size=2, prepare_threads=threads)
        out = [r.inference for r in handler.run_inference(_samples(5), 2)]
        assert out == [1, 3, 5, Reject(DeadLetterKind.POSTPROCESSING_FAILED, "postprocessing failed: ValueError: cannot finish 6"), 9]


def test_the_bytes_metric_counts_the_payload_without_pickling_the_batch(monkeypatch):
    samples = [_sample(i) for i in range(3)]
    samples[1] = samples[1].with_(embedding=np.zeros(32, np.float32))
    want = sum(len(s.image_jpeg) + len(s.mask_png) for s in samples) + 32 * 4
    monkeypatch.setattr(pickle, "dumps", lambda *a, **k: pytest.fail("the batch was pickled"))
    assert _Doubler().get_num_bytes(samples) == want
