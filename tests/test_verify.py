"""Identity verification inside a group (pure functions): verdicts, duplicates, face choice, refs."""

from __future__ import annotations

import numpy as np
import pytest

from prep.transforms.pair import choose_refs
from prep.transforms.verify import (
    DIVERSE,
    OUTLIER,
    SINGLE,
    UNVERIFIED,
    VERIFIED,
    Candidate,
    Thresholds,
    choose_faces,
    pairwise,
    verify_group,
)

T = Thresholds(same=0.6, duplicate=0.2)


def vec(*xs: float) -> np.ndarray:
    v = np.zeros(8, np.float32)
    v[: len(xs)] = xs
    return v


def cand(key: str, *embeddings: np.ndarray, pixels=None, phash=None, areas=()) -> Candidate:
    return Candidate(key, tuple(embeddings), tuple(areas) or tuple(100 for _ in embeddings), pixels, phash)


def by_key(verdicts):
    return {v.key: v for v in verdicts}


def test_pairwise_matches_numpy_norms():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(5, 16)).astype(np.float32)
    d = pairwise(v)
    for i in range(5):
        for j in range(5):
            assert d[i, j] == pytest.approx(np.linalg.norm(v[i].astype(np.float64) - v[j]), abs=1e-9)
    assert np.all(np.diag(d) == 0)


def test_outlier_is_flagged_never_a_ref_and_gets_no_refs():
    members = [cand("a", vec(0, 0)), cand("b", vec(0.3, 0)), cand("c", vec(0, 0.3)), cand("d", vec(0.3, 0.3)),
               cand("x", vec(2.0, 2.0))]
    v = by_key(verify_group(members, k=4, seed=0, thresholds=T))
    assert v["x"].status == OUTLIER and v["x"].ref_keys == ()
    assert v["x"].distance > 0.6
    for key in "abcd":
        assert v[key].status == VERIFIED
        assert "x" not in v[key].ref_keys
        assert sorted(v[key].ref_keys) == sorted(set("abcd") - {key})
        assert all(d <= 0.6 for d in v[key].ref_distances)
    # The centre is the medoid: the member with the smallest summed distance (ties by key).
    assert v["a"].centre in set("abcd")


def test_two_images_that_disagree_are_both_unverified():
    v = by_key(verify_group([cand("a", vec(0)), cand("b", vec(1.0))], k=2, seed=0, thresholds=T))
    assert v["a"].status == v["b"].status == UNVERIFIED
    assert v["a"].ref_keys == v["b"].ref_keys == ()
    v = by_key(verify_group([cand("a", vec(0)), cand("b", vec(0.4))], k=2, seed=0, thresholds=T))
    assert v["a"].status == v["b"].status == VERIFIED
    assert v["a"].ref_keys == ("b",) and v["a"].ref_distances == (pytest.approx(0.4, abs=1e-6),)


def test_single_and_kept_without_face():
    assert verify_group([cand("a", vec(0))], k=2, seed=0, thresholds=T)[0].status == SINGLE
    members = [cand("a", vec(0)), cand("b", vec(0.3)), cand("c", vec(0.1, 0.2)), Candidate("noface", ())]
    v = by_key(verify_group(members, k=4, seed=0, thresholds=T))
    assert v["noface"].status == UNVERIFIED and v["noface"].ref_keys == () and v["noface"].face_index is None
    assert all("noface" not in v[k].ref_keys for k in "abc")


def test_near_duplicates_are_never_each_others_refs():
    members = [
        cand("a", vec(0)), cand("a_copy", vec(0.05)),  # embedding distance below the duplicate line
        cand("b", vec(0.3), pixels="p1"), cand("b_same_pixels", vec(0.5), pixels="p1"),
        cand("c", vec(0, 0.3), phash="ff00"), cand("c_same_hash", vec(0, 0.5), phash="ff00"),
    ]
    v = by_key(verify_group(members, k=5, seed=0, thresholds=T))
    for x, y in (("a", "a_copy"), ("b", "b_same_pixels"), ("c", "c_same_hash")):
        assert y in v[x].near_duplicates and x in v[y].near_duplicates
        assert y not in v[x].ref_keys and x not in v[y].ref_keys
        assert v[x].status == VERIFIED  # a duplicate is still a true sample of its identity
    assert set(v["a"].ref_keys) == {"b", "b_same_pixels", "c", "c_same_hash"}


def test_face_choice_prefers_the_face_like_the_rest():
    obama, biden = vec(0, 0), vec(3, 0)
    members = [cand("o1", vec(0.1)), cand("o2", vec(0, 0.1)), cand("two", biden, obama, areas=(900, 400))]
    assert choose_faces(members) == [0, 0, 1]  # not the larger (Biden's) face
    v = by_key(verify_group(members, k=2, seed=0, thresholds=T))
    assert v["two"].face_index == 1 and v["two"].status == VERIFIED
    # Alone, the largest face is chosen.
    assert choose_faces([cand("two", obama, biden, areas=(400, 900))]) == [1]
    # Nobody has exactly one face: compared with the nearest face of every other member.
    assert choose_faces([cand("p", biden, obama), cand("q", vec(0.1), vec(5, 5))]) == [1, 0]


def test_no_model_gives_the_earlier_random_refs():
    keys = [f"k{i}" for i in range(9)]
    verdicts = verify_group([Candidate(k) for k in keys], k=3, seed=7)
    for v in verdicts:
        assert v.status is None
        assert list(v.ref_keys) == choose_refs(v.key, keys, 3, 7)


def test_random_refs_are_seeded_and_order_free():
    members = [cand(f"k{i}", vec(0.01 * i, 0.3 * (i % 2))) for i in range(10)]
    a = by_key(verify_group(members, k=3, seed=1, thresholds=Thresholds(0.6, 0.0)))
    b = by_key(verify_group(list(reversed(members)), k=3, seed=1, thresholds=Thresholds(0.6, 0.0)))
    c = by_key(verify_group(members, k=3, seed=2, thresholds=Thresholds(0.6, 0.0)))
    assert all(a[k].ref_keys == b[k].ref_keys for k in a)
    assert any(a[k].ref_keys != c[k].ref_keys for k in a)


def test_diverse_refs_are_farthest_first():
    # On a line: from 0, the farthest is 0.5, then the one farthest from both 0 and 0.5 (0.25).
    members = [cand(f"p{int(x * 100):03d}", vec(x)) for x in (0.0, 0.1, 0.2, 0.25, 0.3, 0.5)]
    v = by_key(verify_group(members, k=2, seed=0, thresholds=Thresholds(0.6, 0.0), strategy=DIVERSE))
    assert v["p000"].ref_keys == ("p050", "p025")
    assert v["p000"].ref_distances == (pytest.approx(0.5, abs=1e-6), pytest.approx(0.25, abs=1e-6))
    with pytest.raises(ValueError, match="ref strategy"):
        verify_group(members, k=2, seed=0, thresholds=T, strategy="best")


def test_duplicate_keys_in_a_group_are_refused():
    with pytest.raises(ValueError, match="twice"):
        verify_group([cand("a", vec(0)), cand("a", vec(0.1))], k=1, seed=0, thresholds=T)
