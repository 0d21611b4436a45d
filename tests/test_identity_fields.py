"""The identity step's shard fields and their checks (what `prep validate` reports)."""

from __future__ import annotations

import numpy as np

from prep.schemas.records import SPECIFIC, Sample
from prep.transforms.faces import Face
from prep.schemas.identity_checks import identity_problems, ref_problems
from prep.transforms.identity import face_embedding, identity_json
from prep.transforms.verify import Verdict


def good_meta(**changes):
    meta = {"key": "a", "width": 100, "height": 120, "face_box": [10, 20, 60, 80],
            "face_landmarks": [[20, 30], [30, 30], [45, 30], [55, 30], [35, 50]], "identity_status": "verified",
            "identity_distance": 0.3, "ref_keys": ["b", "c"], "ref_distances": [0.3, 0.4], "near_duplicates": ["d"]}
    meta.update(changes)
    return meta


def test_fields_from_a_sample_with_a_chosen_face():
    faces = (Face((0, 0, 10, 10), ((1.0, 1.0),) * 5, np.ones(4, np.float32)),
             Face((20, 10, 60, 50), ((21.123, 11.0),) * 5, np.full(4, 2.0, np.float32)))
    verdict = Verdict("k", "verified", face_index=1, distance=0.25, ref_keys=("r",), ref_distances=(0.31,),
                      near_duplicates=("dup",), centre="c")
    s = Sample(key="k", source="folder", domain=SPECIFIC, path="p", width=80, height=100, faces=faces,
               pixel_sha256="px", phash="ab", verdict=verdict)
    j = identity_json(s)
    assert j == {"pixel_sha256": "px", "phash": "ab", "identity_model": "face", "faces": 2,
                 "face_box": [20, 10, 60, 50], "face_landmarks": [[21.12, 11.0]] * 5, "face_fraction": 0.2,
                 "identity_status": "verified", "identity_distance": 0.25, "identity_centre": "c",
                 "near_duplicates": ["dup"], "ref_distances": [0.31]}
    assert face_embedding(s).tolist() == [2.0] * 4
    plain = identity_json(Sample(key="k", source="s", domain=SPECIFIC, path="p"))
    assert plain["identity_model"] is None and plain["faces"] is None and plain["near_duplicates"] == []


def test_problems_found():
    assert identity_problems(good_meta(), 0.6) == []
    assert "not inside" in identity_problems(good_meta(face_box=[10, 20, 160, 80]), 0.6)[0]
    assert "5 points" in identity_problems(good_meta(face_landmarks=[[20, 30]] * 4), 0.6)[0]
    assert "exceed" in identity_problems(good_meta(ref_distances=[0.3, 0.7]), 0.6)[0]
    assert "ref_distances for" in identity_problems(good_meta(ref_distances=[0.3]), 0.6)[0]
    assert "near-duplicates" in identity_problems(good_meta(near_duplicates=["b"]), 0.6)[0]
    assert "only verified" in identity_problems(good_meta(identity_status="outlier", identity_distance=0.9), 0.6)[0]
    assert "within the threshold" in identity_problems(
        good_meta(identity_status="outlier", ref_keys=[], ref_distances=[], identity_distance=0.5), 0.6)[0]
    assert ref_problems(good_meta(), {"key": "b", "identity_status": "outlier"}) == [
        "ref b of a is 'outlier', not a verified sample of the identity"]
    assert ref_problems(good_meta(), {"key": "b", "identity_status": "verified"}) == []
