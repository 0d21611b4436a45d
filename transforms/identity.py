"""Identity stage: what pairing needs to verify that a ref is the same person and another photo.

Runs after Embed on domain-specific samples, as a `StageHandler` through RunInference:
- every mode: a sha256 of the decoded pixels (exact duplicates anywhere in the input) and a
  perceptual hash (`imagehash.phash`, 64 bits as 16 hex digits: re-encoded or resized copies);
- `face`: every face found (box, 5 landmarks, descriptor; see `transforms/faces.py`), with
  dlib's ResNet descriptor or an ArcFace-style ONNX model (`--face-model PATH.onnx`). An image
  with no face is a dead letter ("no face found: ...") unless `--no-face keep`, which keeps it
  unverified (never a ref, no refs);
- `clip`: no extra model: the identity embedding is the masked-object CLIP embedding the Embed
  stage computed (dogs, objects).
Which face of several, the verdict and the refs are decided per identity group in pairing
(`transforms/verify.py`), because they depend on the identity's other images.

Thresholds (Euclidean distances in each model's space; `--identity-threshold`,
`--duplicate-threshold` override them):
| model | same identity (at most) | duplicate (below) | basis |
| face, dlib | 0.6 | 0.2 | dlib's documented same-person line; measured on ../shared/data/faces: same person 0.33-0.52, others >= 0.78, obama.jpg vs its letterboxed 240p copy 0.10 |
| face, onnx | 1.1 (cosine >= 0.40) | 0.35 | usual ArcFace verification range; calibrate on your model |
| clip | 0.7 (cosine >= 0.755) | 0.1 (cosine >= 0.995) | a starting point for masked objects; calibrate |
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import apache_beam as beam
import numpy as np

from prep.schemas.records import DeadLetter, DeadLetterKind, Sample
from prep.transforms.common import DEAD, counter, dead
from prep.transforms.decode import load_rgb
from prep.transforms.inference import Reject, StageHandler
from prep.transforms.verify import Thresholds

STAGE = "identity"
FACE, CLIP, NONE = "face", "clip", "none"
MODES = (FACE, CLIP, NONE)
NO_FACE_DROP, NO_FACE_KEEP = "drop", "keep"

THRESHOLDS = {
    "dlib": Thresholds(same=0.6, duplicate=0.2),
    "onnx": Thresholds(same=1.1, duplicate=0.35),
    CLIP: Thresholds(same=0.7, duplicate=0.1),
}


def thresholds_for(mode: str, face_model: str = "dlib") -> Optional[Thresholds]:
    """The documented default thresholds of an identity model (None: no model)."""
    if mode == NONE:
        return None
    return THRESHOLDS[CLIP if mode == CLIP else ("dlib" if face_model == "dlib" else "onnx")]


def pixel_digest(image: np.ndarray) -> str:
    """sha256 of the decoded pixels and their shape: equal for equal pixels, whatever the file."""
    h = hashlib.sha256(f"{image.shape}".encode("ascii"))
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()


def perceptual_hash(image) -> str:
    import imagehash

    return str(imagehash.phash(image))


@dataclass(frozen=True)
class Prepared:
    pixels: np.ndarray
    pixel_sha256: str
    phash: str


@dataclass(frozen=True)
class IdentityResult:
    pixel_sha256: str
    phash: str
    faces: Optional[tuple] = None


class LoadedFaces:
    """The face models of one worker process, one instance per thread that uses them.

    RunInference shares a loaded model between all the threads of a process (Dataflow runs
    many per worker), and dlib's detector and networks keep scratch buffers inside the
    object: two threads in one `compute_face_descriptor` garble each other's results. So
    each thread builds its own copy on first use (the weights are 31 MB; a copy loads in
    ~0.5 s), and `get()` hands out the calling thread's. (A class, not a tuple: Beam's Shared
    keeps a weak reference to it.)"""

    def __init__(self, factory=None):
        self._factory = factory
        self._local = threading.local()

    def get(self) -> tuple[Any, Any]:
        models = getattr(self._local, "models", None)
        if models is None:
            models = self._factory() if self._factory else (None, None)
            self._local.models = models
        return models


class IdentityHandler(StageHandler):
    stage = STAGE
    pad_batches = False  # dlib runs per image; the ONNX descriptor pads its own face batches

    def __init__(
        self,
        mode: str,
        *,
        face_model: str = "dlib",
        no_face: str = NO_FACE_DROP,
        detect_max_side: Optional[int] = None,
        device: str = "auto",
        min_batch_size: Optional[int] = None,
        max_batch_size: int = 8,
        prepare_threads: int = 1,
    ):
        super().__init__(min_batch_size=min_batch_size, max_batch_size=max_batch_size, prepare_threads=prepare_threads)
        if mode not in (FACE, CLIP):
            raise ValueError(f"identity stage mode must be {FACE!r} or {CLIP!r}, got {mode!r}")
        if no_face not in (NO_FACE_DROP, NO_FACE_KEEP):
            raise ValueError(f"no_face must be {NO_FACE_DROP!r} or {NO_FACE_KEEP!r}")
        from prep.transforms.faces import DETECT_MAX_SIDE

        self.mode, self.face_model, self.no_face = mode, face_model, no_face
        self.detect_max_side = detect_max_side or DETECT_MAX_SIDE
        self.device = device

    def describe(self) -> dict:
        out = {"mode": self.mode, "phash": "imagehash.phash 8x8"}
        if self.mode == FACE:
            out.update(face_model=self.face_model, detector="dlib HOG frontal, 5-point landmarks",
                       detect_max_side=self.detect_max_side, no_face=self.no_face)
        return out

    def model_label(self) -> Optional[str]:
        return f"{self.face_model} faces" if self.mode == FACE else None  # clip: the embed stage's embedding

    def load_model(self) -> LoadedFaces:
        if self.mode != FACE:
            return LoadedFaces()
        from prep.transforms.faces import FaceDetector, load_descriptor

        device = "cpu" if self.device == "cpu" else "auto"
        max_side, face_model = self.detect_max_side, self.face_model

        def build():
            return FaceDetector(max_side), load_descriptor(face_model, device=device)

        loaded = LoadedFaces(build)
        loaded.get()  # load now, on the loading thread: a missing model fails here, not per element
        return loaded

    def prepare(self, sample: Sample, model: LoadedFaces) -> Prepared:
        image = load_rgb(sample.image_jpeg)
        pixels = np.asarray(image, np.uint8)
        return Prepared(pixels, pixel_digest(pixels), perceptual_hash(image))

    def infer(self, prepared: list, model: LoadedFaces) -> list:
        from prep.transforms.faces import find_faces

        results: list = []
        detector, descriptor = model.get()
        for p in prepared:
            if self.mode != FACE:
                results.append(IdentityResult(p.pixel_sha256, p.phash))
                continue
            faces = tuple(find_faces(p.pixels, detector, descriptor))
            if not faces and self.no_face == NO_FACE_DROP:
                h, w = p.pixels.shape[:2]
                results.append(Reject(DeadLetterKind.NO_FACE, (
                    f"{DeadLetterKind.NO_FACE.value}: no frontal face in {w}x{h} (detected on a copy of at most "
                    f"{self.detect_max_side} px; --no-face keep keeps such images unverified)")))
            else:
                results.append(IdentityResult(p.pixel_sha256, p.phash, faces))
        return results

    def apply(self, sample: Sample, result: IdentityResult) -> Sample:
        return sample.with_(pixel_sha256=result.pixel_sha256, phash=result.phash, faces=result.faces)


def candidate(sample: Sample, mode: str, *, written: bool = False):
    """The `verify.Candidate` of a sample after this stage (mode: face, clip or none)."""
    from prep.transforms.verify import Candidate

    if mode == NONE:
        return Candidate(sample.key, written=written)
    if mode == CLIP:
        embeddings = () if sample.embedding is None else (sample.embedding,)
        areas: tuple[int, ...] = ()
    else:
        faces = sample.faces or ()
        embeddings = tuple(f.embedding for f in faces)
        areas = tuple(f.area for f in faces)
    return Candidate(sample.key, embeddings, areas, sample.pixel_sha256, sample.phash, written)


# -- run-wide steps around pairing ---------------------------------------------------------

def _digest_key(sample: Sample) -> tuple[str, str]:
    return sample.pixel_sha256 or "", sample.key


def _duplicate_groups(entry) -> list[tuple[str, ...]]:
    digest, keys = entry
    keys = sorted(keys)
    return [tuple(keys)] if digest and len(keys) > 1 else []


class ExactDuplicates(beam.PTransform):
    """Samples (after the identity stage) -> one tuple of keys per set of images with the same
    decoded pixels, sorted; the first key is the one kept by --drop-duplicates. Only
    (digest, key) pairs are shuffled.

    `written`: (digest, key) of samples already in complete shards (resume, retry), so the
    sets are those of one uninterrupted run."""

    def __init__(self, written: Sequence[tuple[str, str]] = ()):
        super().__init__()
        self._written = [(d, k) for d, k in written if d]

    def expand(self, samples):
        digests = samples | "DigestKey" >> beam.Map(_digest_key).with_output_types(tuple[str, str])
        if self._written:
            kept = samples.pipeline | "WrittenDigests" >> beam.Create(self._written)
            digests = (digests, kept) | "WithWritten" >> beam.Flatten().with_output_types(tuple[str, str])
        self.digests = digests  # every (digest, key): a chunked run merges them across chunks
        return (
            digests
            | "GroupByDigest" >> beam.GroupByKey()
            | "Repeated" >> beam.FlatMap(_duplicate_groups).with_output_types(tuple[str, ...])
        )


def duplicate_letters(group: tuple[str, ...]) -> list[tuple[str, DeadLetterKind, str]]:
    """(key, kind, reason) for every key of a duplicate set but the first."""
    first = group[0]
    reason = f"{DeadLetterKind.EXACT_DUPLICATE.value}: same decoded pixels as {first} (the first by key is kept)"
    return [(key, DeadLetterKind.EXACT_DUPLICATE, reason) for key in group[1:]]


class _DropListed(beam.DoFn):
    """Samples whose key is in the side input (key -> (kind, reason)) leave as dead letters."""

    def __init__(self, stage: str, name: str):
        self._stage = stage
        self._dropped = counter(stage, name)

    def process(self, sample: Sample, listed: dict):
        entry = listed.get(sample.key)
        if entry is None:
            yield sample
            return
        kind, reason = entry
        self._dropped.inc()
        yield dead(DeadLetter.of(sample, self._stage, kind, reason))


def _keyed(entry: tuple) -> tuple[str, tuple]:
    key, kind, reason = entry
    return key, (kind, reason)


class DropListed(beam.PTransform):
    """(samples, PCollection of (key, kind, reason)) -> (kept samples, dead letters). The listed
    keys are few (duplicates, outliers) and travel as a side input."""

    def __init__(self, listed, name: str, stage: str = STAGE):
        super().__init__()
        self._listed, self._name, self._stage = listed, name, stage

    def expand(self, samples):
        out = samples | "Drop" >> beam.ParDo(
            _DropListed(self._stage, self._name),
            listed=beam.pvalue.AsDict(self._listed | f"Key{self._name.title()}" >> beam.Map(_keyed)),
        ).with_outputs(DEAD, main="ok")
        return out.ok, out[DEAD]


# -- what the shard records ----------------------------------------------------------------

def identity_model_of(sample: Sample) -> Optional[str]:
    if sample.faces is not None:
        return FACE
    if getattr(sample.verdict, "status", None) is not None:
        return CLIP
    return None


def chosen_face(sample: Sample):
    index = getattr(sample.verdict, "face_index", None)
    if sample.faces is None or index is None:
        return None
    return sample.faces[index]


def identity_json(sample: Sample) -> dict:
    """The sample-JSON fields of the identity step (None / [] where they do not apply)."""
    verdict = sample.verdict
    face = chosen_face(sample)
    area = (sample.width or 0) * (sample.height or 0)
    return {
        "pixel_sha256": sample.pixel_sha256,
        "phash": sample.phash,
        "identity_model": identity_model_of(sample),
        "faces": None if sample.faces is None else len(sample.faces),
        "face_box": None if face is None else list(face.box),
        "face_landmarks": None if face is None else [[round(x, 2), round(y, 2)] for x, y in face.landmarks],
        "face_fraction": None if face is None or not area else round(face.area / area, 6),
        "identity_status": getattr(verdict, "status", None),
        "identity_distance": getattr(verdict, "distance", None),
        "identity_centre": getattr(verdict, "centre", None),
        "near_duplicates": list(getattr(verdict, "near_duplicates", ()) or ()),
        "ref_distances": list(getattr(verdict, "ref_distances", ()) or ()),
    }


IDENTITY_JSON_FIELDS = tuple(identity_json(Sample(key="k", source="s", domain="specific", path="p")))


def face_embedding(sample: Sample) -> Optional[np.ndarray]:
    """The chosen face's descriptor (the shard's KEY.face.npy), None without one."""
    face = chosen_face(sample)
    return None if face is None else np.ascontiguousarray(face.embedding, dtype=np.float32)


def candidate_from_shard(meta: dict, embedding: np.ndarray, face: Optional[np.ndarray]):
    """The `verify.Candidate` of a sample read back from a written shard (resume, retry): the
    same inputs to verification as when it was first paired."""
    from prep.transforms.verify import Candidate

    model = meta.get("identity_model")
    key = meta["key"]
    if model is None:
        return Candidate(key, written=True)
    embeddings = (embedding,) if model == CLIP else (() if face is None else (face,))
    return Candidate(key, embeddings, (), meta.get("pixel_sha256"), meta.get("phash"), written=True,
                     face_count=meta.get("faces") if model == FACE else None)
