"""Decode once (transforms/decode.py DecodedImages): the stages after Decode find its pixels
by bytes object, the pixels are the decoder's own, memory stays under the budget, and the
output is byte-identical with the cache off."""

from __future__ import annotations

import io

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from conftest import assert_same_output, demo_config
from prep.schemas.records import Sample
from prep.transforms import decode
from prep.transforms.decode import DECODED, DecodedImages, DecodeImages, DecodeParams, load_rgb


def jpeg_bytes(seed: int, size=(64, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def fresh(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


@pytest.fixture
def cache(monkeypatch):
    c = DecodedImages(1)
    monkeypatch.setattr(decode, "DECODED", c)
    return c


def test_a_hit_is_the_same_bytes_object_never_equal_content(cache):
    jpeg = jpeg_bytes(0)
    first = load_rgb(jpeg)
    assert (cache.hits, cache.misses) == (0, 1)
    again = load_rgb(jpeg)
    assert (cache.hits, cache.misses) == (1, 1)
    assert np.array_equal(np.asarray(again), np.asarray(first)) and np.array_equal(np.asarray(again), fresh(jpeg))
    twin = bytes(bytearray(jpeg))  # equal content, another object: decoded again
    assert twin is not jpeg
    load_rgb(twin)
    assert (cache.hits, cache.misses) == (1, 2)


def test_callers_get_copies(cache):
    jpeg = jpeg_bytes(1)
    image = load_rgb(jpeg)
    image.paste((0, 0, 0), (0, 0, image.width, image.height))
    assert np.array_equal(np.asarray(load_rgb(jpeg)), fresh(jpeg))


def test_memory_stays_under_the_budget_oldest_out_first(cache):
    jpegs = [jpeg_bytes(i, size=(256, 256)) for i in range(8)]  # ~256 KB of pixels each
    for j in jpegs:
        load_rgb(j)
        assert cache.held_bytes <= 1024 * 1024
    cache.hits = cache.misses = 0
    load_rgb(jpegs[-1])
    load_rgb(jpegs[0])
    assert (cache.hits, cache.misses) == (1, 1), "the newest is held, the oldest was evicted"
    cache.configure(0)
    assert cache.held_bytes == 0
    load_rgb(jpegs[-1])
    assert cache.held_bytes == 0 and cache.hits == 1, "0 MB: off"


def test_decode_keeps_exactly_the_pixels_a_later_stage_would_decode(cache):
    cache.configure(64)
    raw = jpeg_bytes(2)
    fn = DecodeImages(DecodeParams(decoded_cache_mb=64))
    fn.setup()
    sample = Sample(key="k", domain="specific", source="t", path="k.jpg", identity="1", raw=raw)
    (out,) = list(fn.process(sample))
    assert out.image_jpeg is raw, "a plain RGB JPEG passes through as it came"
    assert cache.held_bytes > 0
    assert np.array_equal(np.asarray(load_rgb(out.image_jpeg)), fresh(raw))
    assert (cache.hits, cache.misses) == (1, 0)

    general = Sample(key="g", domain="general", source="t", path="g.jpg", raw=jpeg_bytes(3))
    (out,) = list(fn.process(general))
    load_rgb(out.image_jpeg)
    assert cache.misses == 1, "general images are not kept unless a later stage reads them"


def test_an_entry_leaves_after_its_last_reader(cache):
    """Decode knows how many stages read the pixels again (caption, mask, embed, and the
    identity stage of the sources it verifies): after the last, the entry is gone, so the cache
    holds only the images in flight, not a full budget of finished ones."""
    cache.configure(64)
    fn = DecodeImages(DecodeParams(decoded_cache_mb=64), reads={"specific": 3, "general": 0},
                      identity_modes={"verified": "clip", "unverified": "none"}, identity_staged=frozenset({"clip"}))
    fn.setup()
    for source, readers in (("verified", 4), ("unverified", 3)):
        sample = Sample(key=source, domain="specific", source=source, path="k.jpg", identity="1", raw=jpeg_bytes(4))
        (out,) = list(fn.process(sample))
        for n in range(readers):
            assert cache.held_bytes > 0, (source, n)
            assert np.array_equal(np.asarray(load_rgb(out.image_jpeg)), fresh(out.image_jpeg))
        assert cache.held_bytes == 0, source
    assert (cache.hits, cache.misses) == (7, 0)
    unknown = jpeg_bytes(5)
    load_rgb(unknown)  # decoded by a stage, readers unknown: kept until the budget pushes it out
    load_rgb(unknown)
    load_rgb(unknown)
    assert cache.held_bytes > 0 and cache.hits == 9


class _Pixels(beam.DoFn):
    def process(self, sample):
        yield sample.key, int(np.asarray(load_rgb(sample.image_jpeg), dtype=np.int64).sum())


def test_fused_stages_find_the_decoded_pixels_on_a_pipeline():
    DECODED.clear()
    DECODED.configure(64)
    raws = {f"k{i}": jpeg_bytes(10 + i) for i in range(6)}
    expected = [(k, int(fresh(r).astype(np.int64).sum())) for k, r in raws.items()]
    with TestPipeline() as p:
        got = (
            p
            | beam.Create([Sample(key=k, domain="specific", source="t", path=k, identity="1", raw=r) for k, r in raws.items()])
            | beam.ParDo(DecodeImages(DecodeParams(decoded_cache_mb=64))).with_outputs("dead", main="ok")
        ).ok | beam.ParDo(_Pixels())
        assert_that(got, equal_to(expected))
    assert DECODED.hits == len(raws) and DECODED.misses == 0, (DECODED.hits, DECODED.misses)


@pytest.mark.slow
def test_output_is_byte_identical_with_the_cache_off(pipeline_run, demo, tiny_cache, tmp_path):
    from prep.pipeline.run import run

    DECODED.clear()
    out = str(tmp_path / "off")
    run(demo_config(demo, out, tiny_cache, decoded_cache_mb=0), [])
    assert DECODED.hits == 0 and DECODED.misses > 0
    assert len(assert_same_output(pipeline_run["out"], out)) > 10
    DECODED.configure(256)


def test_an_uncached_decode_is_returned_without_a_copy(cache, monkeypatch):
    """The copy protects the shared entry; with nothing kept there is nothing to protect."""
    copies = []
    real_copy = Image.Image.copy
    monkeypatch.setattr(Image.Image, "copy", lambda self: copies.append(1) or real_copy(self))
    jpeg = jpeg_bytes(3)
    load_rgb(jpeg)
    assert len(copies) == 1 and cache.held_bytes > 0, "kept: the caller gets a copy"
    cache.configure(0)
    copies.clear()
    image = load_rgb(jpeg_bytes(4))
    assert copies == [] and cache.held_bytes == 0
    assert np.array_equal(np.asarray(image), fresh(jpeg_bytes(4)))
