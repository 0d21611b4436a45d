"""Level 1.5: the pipeline's own steps (UniqueKeys, PairByIdentity, WriteShards) on a
TestPipeline with assert_that, on hand-made samples whose right answer is known."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from conftest import fn_api_runner
from prep.pipeline.build import UniqueKeys
from prep.schemas import contract
from prep.schemas.records import DeadLetter, DeadLetterKind, Sample
from prep.transforms.pair import PairByIdentity, choose_refs
from prep.transforms.write import WriteShards

DIM = 2


def _sample(key: str, *, identity: str = "p", source: str = "celeba", path: str = "", split: str = "train", e: float = 0.0):
    return Sample(key=key, source=source, domain=contract.SPECIFIC, path=path or f"/in/{key}.jpg", identity=identity,
                  split=split, embedding=np.array([e, 1.0], np.float32))


def test_unique_keys_keeps_the_smallest_path_and_dead_letters_the_other():
    import apache_beam as beam

    samples = [_sample("a", path="/in/1/a.jpg"), _sample("a", path="/in/0/a.jpg"), _sample("b")]
    with TestPipeline(runner=fn_api_runner()) as p:
        ok, dead = p | "Samples" >> beam.Create(samples) | UniqueKeys()
        assert_that(ok | "OkView" >> beam.Map(lambda s: (s.key, s.path)),
                    equal_to([("a", "/in/0/a.jpg"), ("b", "/in/b.jpg")]), label="Ok")
        assert_that(dead, equal_to([DeadLetter(key="a", source="celeba", stage="ingest", kind=DeadLetterKind.DUPLICATE_KEY,
                                               reason="duplicate key: a is also /in/0/a.jpg", path="/in/1/a.jpg")]),
                    label="Dead")


def test_pair_by_identity_picks_same_identity_refs_per_source_and_counts_written_samples():
    import apache_beam as beam

    samples = [_sample(k, e=i) for i, k in enumerate(["a", "b", "c"])]
    samples += [_sample("d", identity="q"), _sample("f", identity="p", source="folder", e=9.0)]
    written = [("e", "celeba", "p", np.array([7.0, 1.0], np.float32))]  # already in a kept shard
    embeddings = {s.key: s.embedding for s in samples} | {"e": written[0][3]}
    group = ["a", "b", "c", "e"]
    expected = [(k, tuple(choose_refs(k, group, 2, 5))) for k in ("a", "b", "c")]
    expected += [("d", ()), ("f", ())]  # a singleton; folder's "p" is another person than CelebA's "p"
    expected = [(k, refs, [embeddings[r].tolist() for r in refs], "train") for k, refs in expected]
    with TestPipeline(runner=fn_api_runner()) as p:
        refs = p | beam.Create(samples) | PairByIdentity(2, 5, DIM, done=written)
        view = refs | beam.Map(lambda kv: (kv[0], kv[1].ref_keys, kv[1].refs.reshape(-1, DIM).tolist(), kv[1].split))
        assert_that(view, equal_to(expected))
    assert all(len(r) == 2 and k not in r for k, r, _, _ in expected[:3])  # K refs, never itself


def _written(key: str) -> Sample:
    return Sample(key=key, source="wds", domain=contract.GENERAL, path=f"/in/{key}", image_jpeg=f"jpg {key}".encode(),
                  width=4, height=3, caption=f"caption {key}", embedding=np.zeros(DIM, np.float32),
                  refs=np.zeros((0, DIM), np.float32))


def test_write_shards_writes_the_split_folder_and_reports_what_it_wrote(tmp_path: Path):
    import apache_beam as beam

    out = tmp_path / "out"
    with TestPipeline(runner=fn_api_runner()) as p:
        infos = p | beam.Create([_written(k) for k in ("k2", "k0", "k1")]) | WriteShards(str(out), "val", contract.GENERAL, 2)
        assert_that(infos | beam.Map(lambda i: (i.split, i.domain, i.name, i.count)),
                    equal_to([("val", "general", "000000.tar", 2), ("val", "general", "000001.tar", 1)]))
    folder = out / contract.shard_folder("val", contract.GENERAL)
    assert sorted(f.name for f in folder.iterdir()) == [
        "000000.parquet", "000000.tar", "000000_stats.json", "000001.parquet", "000001.tar", "000001_stats.json"]
    keys = {name: [s["__key__"] for s in contract.iter_samples(io.BytesIO((folder / name).read_bytes()))]
            for name in ("000000.tar", "000001.tar")}
    assert keys == {"000000.tar": ["k0", "k1"], "000001.tar": ["k2"]}  # key order, samples_per_shard each
    stats = json.loads((folder / "000001_stats.json").read_text())
    assert stats["sha256"] == hashlib.sha256((folder / "000001.tar").read_bytes()).hexdigest()
