"""PairByIdentity with identity verification, on a TestPipeline with assert_that."""

from __future__ import annotations

import apache_beam as beam
import numpy as np
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from conftest import fn_api_runner
from prep.schemas.records import SPECIFIC, Sample
from prep.transforms.faces import Face
from prep.transforms.pair import PairByIdentity, Written
from prep.transforms.verify import OUTLIER, VERIFIED, Candidate, Thresholds

DIM = 4
T = Thresholds(same=0.6, duplicate=0.2)


def emb(i: int) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[i % DIM] = 1.0
    return v


def face(x: float, y: float = 0.0) -> Face:
    e = np.zeros(8, np.float32)
    e[0], e[1] = x, y
    return Face(box=(0, 0, 10, 10), landmarks=((1.0, 1.0),) * 5, embedding=e)


def sample(key: str, identity: str, *faces: Face, pixels: str | None = None) -> Sample:
    return Sample(key=key, source="folder", domain=SPECIFIC, path=f"/{key}.jpg", identity=identity,
                  embedding=emb(len(key)), faces=tuple(faces), pixel_sha256=pixels or f"px-{key}", phash=f"ph-{key}")


def summarize(entry):
    key, refs = entry
    v = refs.verdict
    return key, v.status if v else None, refs.ref_keys, refs.refs.shape, v.near_duplicates if v else ()


def test_face_mode_flags_outlier_and_duplicate():
    samples = [sample("a1", "a", face(0.0)), sample("a2", "a", face(0.3)), sample("a3", "a", face(0.0, 0.3)),
               sample("a3copy", "a", face(0.0, 0.31)), sample("ax", "a", face(3.0)),
               sample("b1", "b", face(9.0))]
    with TestPipeline(runner=fn_api_runner()) as p:
        out = (p | beam.Create(samples)
               | PairByIdentity(4, 0, DIM, mode="face", thresholds=T) | beam.Map(summarize))
        assert_that(out, equal_to([
            ("a1", VERIFIED, ("a2", "a3", "a3copy"), (3, DIM), ()),
            ("a2", VERIFIED, ("a1", "a3", "a3copy"), (3, DIM), ()),
            ("a3", VERIFIED, ("a1", "a2"), (2, DIM), ("a3copy",)),
            ("a3copy", VERIFIED, ("a1", "a2"), (2, DIM), ("a3",)),
            ("ax", OUTLIER, (), (0, DIM), ()),
            ("b1", "single", (), (0, DIM), ()),
        ]))


def test_refs_are_the_refs_clip_embeddings_and_written_members_take_part():
    samples = [sample("a1", "a", face(0.0)), sample("a2", "a", face(0.3))]
    written = [Written("a0", "folder", "a", emb(7), Candidate("a0", (face(0.0, 0.3).embedding,), (100,), "px-a0", "ph-a0",
                                                             written=True, face_count=1))]
    with TestPipeline(runner=fn_api_runner()) as p:
        out = (p | beam.Create(samples)
               | PairByIdentity(4, 0, DIM, done=written, mode="face", thresholds=T)
               | beam.Map(lambda kv: (kv[0], kv[1].ref_keys, kv[1].refs.tolist())))
        assert_that(out, equal_to([
            ("a1", ("a0", "a2"), [emb(7).tolist(), emb(2).tolist()]),
            ("a2", ("a0", "a1"), [emb(7).tolist(), emb(2).tolist()]),
        ]))


def test_none_mode_ignores_identity_fields():
    samples = [sample("a1", "a", face(0.0)), sample("ax", "a", face(3.0))]
    with TestPipeline(runner=fn_api_runner()) as p:
        out = p | beam.Create(samples) | PairByIdentity(4, 0, DIM, mode="none", thresholds=T) | beam.Map(summarize)
        assert_that(out, equal_to([("a1", None, ("ax",), (1, DIM), ()), ("ax", None, ("a1",), (1, DIM), ())]))


def test_exact_duplicates_are_listed_and_dropped_after_the_first():
    from prep.transforms.identity import DropListed, ExactDuplicates, duplicate_letters

    samples = [sample("a1", "a", pixels="same"), sample("b7", "b", pixels="same"), sample("a0", "a", pixels="same"),
               sample("c1", "c", pixels="other")]
    with TestPipeline(runner=fn_api_runner()) as p:
        created = p | beam.Create(samples)
        groups = created | ExactDuplicates()
        assert_that(groups, equal_to([("a0", "a1", "b7")]), label="groups")
        listed = groups | beam.FlatMap(duplicate_letters)
        kept, letters = created | DropListed(listed, "exact_duplicates")
        assert_that(kept | "KeptKeys" >> beam.Map(lambda s: s.key), equal_to(["a0", "c1"]), label="kept")
        assert_that(letters | beam.Map(lambda d: (d.key, d.stage, d.kind.value, d.reason)), equal_to([
            ("a1", "identity", "exact duplicate", "exact duplicate: same decoded pixels as a0 (the first by key is kept)"),
            ("b7", "identity", "exact duplicate", "exact duplicate: same decoded pixels as a0 (the first by key is kept)"),
        ]), label="letters")


def test_identity_totals_count_every_group_once():
    from prep.transforms.pair import IdentityTotals

    samples = [sample("a1", "a", face(0.0)), sample("a2", "a", face(0.3)), sample("a3", "a", face(0.0, 0.3)),
               sample("a3copy", "a", face(0.0, 0.31)), sample("ax", "a", face(3.0)), sample("b1", "b", face(9.0)),
               sample("c1", "c", face(0.0)), sample("c2", "c", face(5.0))]
    pair = PairByIdentity(4, 0, DIM, mode="face", thresholds=T)
    with TestPipeline(runner=fn_api_runner()) as p:
        _ = p | beam.Create(samples) | pair
        totals = pair.groups | beam.CombineGlobally(IdentityTotals())
        assert_that(totals, equal_to([{"identities": 3, "identities_verified": 1, "duplicate_pairs": 1,
                                       "samples": {"outlier": 1, "single": 1, "unverified": 2, "verified": 4}}]))
