"""PairByIdentity through either shuffle (Beam's grouping, local files) gives exactly what a
plain reference gives: per identity group, `choose_refs` over all members (no identity model)
or `verify_group` (with one), refs gathered from the members' embeddings as float32.
TestPipeline + assert_that on hand-made groups; the file shuffle's exactly-once rule apart."""

from __future__ import annotations

import os
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from conftest import fn_api_runner
from prep.schemas.records import SPECIFIC, Sample
from prep.transforms.faces import Face
from prep.transforms.pair import (
    Member,
    PairByIdentity,
    Written,
    _SpillMembers,
    choose_refs,
    group_summary,
    identity_group,
    mode_of,
    outlier_reason,
    read_spilled,
)
from prep.transforms.verify import DIVERSE, OUTLIER, RANDOM, Candidate, Thresholds, verify_group

DIM = 4
T = Thresholds(same=0.6, duplicate=0.2)
SHUFFLES = ["beam", "files"]


def emb(i: int, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(i)
    return rng.standard_normal(DIM).astype(dtype)


def face(x: float, y: float = 0.0) -> Face:
    e = np.zeros(8, np.float32)
    e[0], e[1] = x, y
    return Face(box=(0, 0, 10, 10), landmarks=((1.0, 1.0),) * 5, embedding=e)


def sample(key: str, identity: str, i: int, *faces: Face, source: str = "folder", split: str = "train",
           dtype=np.float32, pixels: str | None = None) -> Sample:
    return Sample(key=key, source=source, domain=SPECIFIC, path=f"/{key}.jpg", identity=identity, split=split,
                  embedding=emb(i, dtype), faces=tuple(faces), pixel_sha256=pixels or f"px-{key}", phash=f"ph-{key}")


def reference(samples, written, k, seed, modes, thresholds, strategy=RANDOM):
    """(key, ref_keys, refs, split, verdict, outlier reason) per new sample, and the GroupSummary
    of each verified group: the rules written out plainly, one group at a time."""
    from prep.transforms.identity import candidate

    groups: dict[str, list] = {}  # identity -> [(key, embedding, split, written, candidate)]
    for s in samples:
        mode = mode_of(modes, s.source)
        groups.setdefault(identity_group(s.source, s.identity), []).append(
            (s.key, s.embedding, s.split, False, candidate(s, mode)))
    for w in written:
        groups.setdefault(identity_group(w.source, w.identity), []).append(
            (w.key, w.embedding, None, True, w.candidate or Candidate(w.key, written=True)))
    out, summaries = [], []
    for identity, members in groups.items():
        members = sorted(members, key=lambda m: m[0])
        embedding = {m[0]: m[1] for m in members}
        keys = [m[0] for m in members]

        def gather(ref_keys):
            if not ref_keys:
                return np.zeros((0, DIM), np.float32)
            return np.stack([embedding[r] for r in ref_keys]).astype(np.float32)

        t = thresholds.get(mode_of(modes, identity.split(":", 1)[0]))
        if t is None:
            for key, _, split, done, _ in members:
                if not done:
                    ref_keys = choose_refs(key, keys, k, seed)
                    out.append(view(key, ref_keys, gather(ref_keys), split, None, None))
            continue
        verdicts = verify_group([m[4] for m in members], k=k, seed=seed, thresholds=t, strategy=strategy)
        assert verdicts == verify_group([m[4] for m in reversed(members)], k=k, seed=seed, thresholds=t,
                                        strategy=strategy)[::-1]  # order-independent, as the shuffles need
        summaries.append(group_summary(verdicts))
        for (key, _, split, done, _), v in zip(members, verdicts):
            if not done:
                reason = outlier_reason(v, t.same) if v.status == OUTLIER else None
                out.append(view(key, v.ref_keys, gather(v.ref_keys), split, v, reason))
    return out, summaries


def view(key, ref_keys, refs, split, verdict, reason):
    return key, tuple(ref_keys), refs.tolist(), refs.shape, refs.dtype.str, split, verdict, reason


def refs_view(entry):
    key, r = entry
    return view(key, r.ref_keys, r.refs, r.split, r.verdict, r.outlier_reason)


def run_both(samples, tmp_path: Path, shuffle: str, k: int, seed: int, *, written=(), mode="none", thresholds=None,
             strategy=RANDOM):
    modes = mode if isinstance(mode, dict) else {"*": mode}
    thresholds_by_mode = {m: thresholds for m in set(modes.values()) if m != "none"} if thresholds else {}
    expected, summaries = reference(samples, written, k, seed, modes, thresholds_by_mode, strategy)
    spill = None
    if shuffle == "files":
        spill = tmp_path / "spill"
        spill.mkdir()
    pair = PairByIdentity(k, seed, DIM, done=written, mode=mode, thresholds=thresholds, strategy=strategy,
                          spill_dir=None if spill is None else str(spill))
    with TestPipeline(runner=fn_api_runner()) as p:
        refs = p | beam.Create(samples) | pair
        assert_that(refs | beam.Map(refs_view), equal_to(expected), label="refs")
        assert_that(pair.groups, equal_to(summaries), label="groups")
    if spill is not None:
        names = sorted(os.listdir(spill))
        assert names and all(n.endswith(".members") for n in names)  # complete files only, no .part
    return expected


@pytest.mark.parametrize("shuffle", SHUFFLES)
def test_no_identity_model_refs_written_members_sources_and_dtypes(shuffle, tmp_path):
    samples = [sample(f"p{i}", "p", i) for i in range(7)]  # a group larger than K
    samples += [sample("q0", "q", 10), sample("q1", "q", 11, dtype=np.float64)]  # refs come back float32
    samples += [sample("s0", "solo", 12, split="val")]  # a singleton: no refs
    samples += [sample("c0", "p", 13, source="celeba"), sample("c1", "p", 14, source="celeba")]  # another "p"
    written = [Written("p9", "folder", "p", emb(20)), Written("q9", "folder", "q", emb(21))]
    expected = run_both(samples, tmp_path, shuffle, 3, 7, written=written)
    by_key = {e[0]: e for e in expected}
    assert len(expected) == len(samples)  # written members get no refs
    assert by_key["s0"][1:5] == ((), [], (0, DIM), "<f4")
    assert set(by_key["q0"][1]) == {"q1", "q9"} and by_key["c0"][1] == ("c1",)
    assert all(len(by_key[f"p{i}"][1]) == 3 for i in range(7))


@pytest.mark.parametrize("shuffle", SHUFFLES)
@pytest.mark.parametrize("strategy", [RANDOM, DIVERSE])
def test_face_model_verdicts_duplicates_outliers_and_written_candidates(shuffle, strategy, tmp_path):
    samples = [sample("a1", "a", 1, face(0.0)), sample("a2", "a", 2, face(0.3)), sample("a3", "a", 3, face(0.0, 0.3)),
               sample("a3copy", "a", 4, face(0.0, 0.31)), sample("ax", "a", 5, face(3.0)),
               sample("a4", "a", 6, face(0.1, 0.1), face(5.0)),  # two faces: the one near the others is chosen
               sample("b1", "b", 7, face(9.0)), sample("c1", "c", 8, face(0.0)), sample("c2", "c", 9, face(5.0))]
    written = [Written("a0", "folder", "a", emb(30),
                       Candidate("a0", (face(0.2, 0.2).embedding,), (100,), "px-a0", "ph-a0", written=True, face_count=1))]
    expected = run_both(samples, tmp_path, shuffle, 2, 3, written=written, mode="face", thresholds=T, strategy=strategy)
    status = {e[0]: e[6].status for e in expected}
    assert status["ax"] == OUTLIER and status["b1"] == "single" and status["c1"] == "unverified"
    assert {e[0]: e[6].near_duplicates for e in expected}["a3"] == ("a3copy",)


@pytest.mark.parametrize("shuffle", SHUFFLES)
def test_modes_per_source(shuffle, tmp_path):
    samples = [sample("f1", "x", 1, face(0.0)), sample("f2", "x", 2, face(0.1)), sample("f3", "x", 3, face(4.0)),
               sample("c1", "x", 4, source="celeba"), sample("c2", "x", 5, source="celeba")]
    expected = run_both(samples, tmp_path, shuffle, 4, 0, mode={"folder": "face", "celeba": "none"}, thresholds=T)
    verdicts = {e[0]: e[6] for e in expected}
    assert verdicts["c1"] is None and verdicts["f3"].status == OUTLIER


@pytest.mark.parametrize("shuffle", SHUFFLES)
def test_a_key_twice_in_one_group_fails(shuffle, tmp_path):
    samples = [sample("a", "p", 1), sample("a", "p", 2)]
    pair = PairByIdentity(2, 0, DIM, spill_dir=str(tmp_path) if shuffle == "files" else None)
    with pytest.raises(Exception, match="pairing found sample key 'a' twice in one identity group"):
        with TestPipeline(runner=fn_api_runner()) as p:
            _ = p | beam.Create(samples) | pair


def test_spilled_files_of_an_unfinished_bundle_are_never_read(tmp_path):
    spill = _SpillMembers(str(tmp_path), buckets=4)
    spill.start_bundle()
    for i in range(3):  # a bundle that fails before finish_bundle
        spill.process(("folder:lost", Member(f"lost{i}", emb(i))))
    spill.start_bundle()  # the retry
    spill.process(("folder:p", Member("p1", emb(1), "train")))
    spill.process(("folder:p", Member("p2", emb(2, np.float64), written=True)))
    spill.process(("folder:q", Member("q1", emb(3), "val", candidate=Candidate("q1"))))
    emitted = [wv.value for wv in spill.finish_bundle()]
    spill.teardown()
    names = sorted(os.listdir(tmp_path))
    assert len([n for n in names if n.endswith(".part")]) == 1  # the failed bundle's, left for the folder's owner
    by_bucket: dict[int, list[str]] = {}
    for bucket, path in emitted:
        assert os.path.exists(path) and path.endswith(".members")
        by_bucket.setdefault(bucket, []).append(path)
    groups = {identity: batch for entry in by_bucket.items() for identity, batch in read_spilled(entry)}
    assert sorted(groups) == ["folder:p", "folder:q"]
    p, q = groups["folder:p"], groups["folder:q"]
    assert (p.keys, p.splits, p.written, p.candidates) == (["p1", "p2"], ["train", None], [False, True], [None, None])
    assert p.embeddings().dtype == np.float32 and p.embeddings().tolist() == [emb(1).tolist(),
                                                                             emb(2).astype(np.float32).tolist()]
    assert (q.keys, q.candidates, q.embeddings().tolist()) == (["q1"], [Candidate("q1")], [emb(3).tolist()])


def test_spill_records_carry_every_candidate_field_exactly(tmp_path):
    """The spill head is the run's own binary format, not a pickle: every field of a
    verification candidate, the arrays' dtypes and shapes, and UTF-8 names come back as written."""
    faces = (np.arange(128, dtype=np.float64) / 7, np.linspace(-1, 1, 128, dtype=np.float32))
    full = Candidate("p1é", faces, (1200, 96), "ab" * 32, "f0e1d2c3b4a59687", written=True, face_count=2)
    members = [
        ("folder:pé", Member("p1é", emb(1), "train", candidate=full)),
        ("folder:pé", Member("p2", emb(2), None, written=True, candidate=Candidate("p2", (), (), None, None, True))),
        ("folder:pé", Member("p3", emb(3), "test", candidate=Candidate("p3"))),
        ("folder:pé", Member("p4", emb(4), "")),
    ]
    spill = _SpillMembers(str(tmp_path), buckets=1)
    spill.start_bundle()
    for member in members:
        spill.process(member)
    [entry] = [wv.value for wv in spill.finish_bundle()]
    batch = dict(read_spilled((entry[0], [entry[1]])))["folder:pé"]
    assert batch.keys == ["p1é", "p2", "p3", "p4"]
    assert batch.splits == ["train", None, "test", ""] and batch.written == [False, True, False, False]
    got = batch.candidates[0]
    assert (got.key, got.areas, got.pixel_sha256, got.phash, got.written, got.face_count) == (
        "p1é", (1200, 96), "ab" * 32, "f0e1d2c3b4a59687", True, 2)
    assert [(a.dtype, a.shape) for a in got.embeddings] == [(np.float64, (128,)), (np.float32, (128,))]
    assert all(np.array_equal(a, b) for a, b in zip(got.embeddings, faces))
    assert batch.candidates[1] == Candidate("p2", (), (), None, None, True)
    assert batch.candidates[2] == Candidate("p3") and batch.candidates[2].embeddings is None
    assert batch.candidates[3] is None
    assert batch.embeddings().tolist() == [emb(i).tolist() for i in (1, 2, 3, 4)]


@pytest.mark.parametrize("cut", [slice(None, -5), slice(None, -9), slice(None, -40), slice(5, None), slice(0, 0)])
def test_a_truncated_spill_file_fails_loudly(tmp_path, cut):
    spill = _SpillMembers(str(tmp_path), buckets=1)
    spill.start_bundle()
    spill.process(("folder:p", Member("p1", emb(1))))
    spill.process(("folder:p", Member("p2", emb(2))))
    [(bucket, path)] = [wv.value for wv in spill.finish_bundle()]
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[cut])
    with pytest.raises(ValueError, match="truncated pairing spill file"):
        list(read_spilled((bucket, [path])))


def test_spilled_embeddings_of_different_shapes_read_back(tmp_path):
    spill = _SpillMembers(str(tmp_path), buckets=1)
    spill.start_bundle()
    spill.process(("folder:p", Member("p1", emb(1))))
    spill.process(("folder:q", Member("q1", np.arange(6, dtype=np.float32).reshape(2, 3))))
    [entry] = [wv.value for wv in spill.finish_bundle()]
    groups = dict(read_spilled((entry[0], [entry[1]])))
    assert groups["folder:p"].embeddings().tolist() == [emb(1).tolist()]
    assert groups["folder:q"].embeddings().tolist() == [[[0, 1, 2], [3, 4, 5]]]


def test_a_local_run_pairs_through_a_folder_it_removes(monkeypatch):
    from prep.pipeline import run as run_module

    seen = []

    def build(p, plan, resume, pair_spill=None):
        seen.append(pair_spill)
        assert pair_spill is not None and os.path.isdir(pair_spill)
        _ = p | beam.Create([1])

    monkeypatch.setattr(run_module, "build_pipeline", build)
    run_module._run_pipeline(None, None, [])
    assert len(seen) == 1 and not os.path.exists(seen[0])


def test_a_killed_runs_pairing_folder_goes_at_the_next_run(tmp_path):
    import subprocess
    import sys

    from prep.pipeline.run import PAIR_SPILL_PREFIX, remove_orphaned_spills

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f"{PAIR_SPILL_PREFIX}{int(gone.stdout)}-abc"  # its process has exited
    live = tmp_path / f"{PAIR_SPILL_PREFIX}{os.getpid()}-def"
    other = tmp_path / "prep-pairing-notes"
    for folder in (orphan, live, other):
        folder.mkdir()
        (folder / "000-x.members").write_bytes(b"x")
    assert remove_orphaned_spills(str(tmp_path)) == [str(orphan)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])
