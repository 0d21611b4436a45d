"""A run's output as values, and a comparison with stated tolerances (tests/test_golden.py).

`view(out)` reads every file of an output into JSON-able values: shards as {key: {member:
value}}, sidecars as rows, JSON files parsed. Members that models compute become comparable
values: an embedding or refs array its numbers, a mask its run-length encoding; an image
(decoded, re-encoded by PIL: no model reaches it) its sha256.

`compare(expected, got)` lists every difference, under these rules:
- strings, ints, bools, keys and list lengths: exactly (captions included: the tiny captioner
  decodes greedily, so a caption is a string or it is wrong);
- floats (embeddings, refs, distances, mask fractions, norms): |a - b| <= FLOAT_ATOL;
- masks: IoU >= MASK_IOU (a pixel on the threshold's edge may flip across CPU kernels);
- a whole shard's sha256 and byte size (`BYTES_OF_MODEL_OUTPUT`): skipped, since the values
  inside it are compared one by one; everything else, the weights' digests included, exactly.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

FLOAT_ATOL = 1e-4
MASK_IOU = 0.99
# Keys whose values are digests or sizes of whole shards (a shard holds mask PNGs and arrays
# whose bytes follow the model's floats): the manifest's and the stats' `sha256` and `bytes`,
# the wids index's `filesize`. Skipped, since the values inside are compared one by one. The
# weights' digests (under a `fingerprint`) are compared exactly.
BYTES_OF_MODEL_OUTPUT = {"sha256", "bytes", "filesize"}


def _rle(mask: np.ndarray) -> list[int]:
    flat = (mask.reshape(-1) > 127).astype(np.uint8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    return [int(flat[0])] + np.diff(bounds).astype(int).tolist()


def _unrle(rle: list[int], shape: list[int]) -> np.ndarray:
    value, out = rle[0], []
    for run in rle[1:]:
        out.append(np.full(run, value, np.uint8))
        value = 1 - value
    return np.concatenate(out).reshape(shape) if out else np.zeros(shape, np.uint8)


def _member(ext: str, data: bytes) -> Any:
    from PIL import Image

    from prep.schemas import contract

    if ext == contract.EXT_JSON:
        return json.loads(data.decode("utf-8"))
    if ext == contract.EXT_TEXT:
        return data.decode("utf-8")
    if ext.endswith("npy"):
        array = contract.load_npy(data)
        return {"shape": list(array.shape), "dtype": str(array.dtype), "values": array.reshape(-1).tolist()}
    if ext.endswith("mask.png"):
        mask = np.asarray(Image.open(io.BytesIO(data)))
        return {"shape": list(mask.shape), "mask_rle": _rle(mask)}
    return {"member_sha256": hashlib.sha256(data).hexdigest()}  # the image: no model reaches it


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"sha256": hashlib.sha256(value).hexdigest()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def view(out: Path, placeholders: dict[str, str]) -> dict[str, Any]:
    """{relative path: values} of every file of `out`; `placeholders` replaces absolute folders
    (the demo data, the model cache, OUT: pytest's tmp folders) in the files that name them."""
    import pyarrow.parquet as pq

    from prep.schemas import contract

    found: dict[str, Any] = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out).as_posix()
        data = path.read_bytes()
        for real, placeholder in placeholders.items():
            data = data.replace(real.encode("utf-8"), placeholder.encode("utf-8"))
        if rel.endswith(".tar"):
            with open(path, "rb") as f:
                found[rel] = {raw["__key__"]: {ext: _member(ext, v) for ext, v in raw.items() if ext != "__key__"}
                              for raw in contract.iter_samples(f)}
        elif rel.endswith(".parquet"):
            found[rel] = _plain(pq.read_table(io.BytesIO(path.read_bytes())).to_pylist())
        elif rel.endswith(".jsonl"):
            found[rel] = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
        elif rel.endswith(".json"):
            found[rel] = json.loads(data.decode("utf-8"))
        else:
            found[rel] = data.decode("utf-8", errors="replace")
    return found


def compare(expected: Any, got: Any, path: str = "") -> list[str]:
    """Every difference between two views (or parts of them), one line each."""
    if isinstance(expected, dict) and "mask_rle" in expected and isinstance(got, dict) and "mask_rle" in got:
        if expected["shape"] != got["shape"]:
            return [f"{path}: mask shape {got['shape']} != {expected['shape']}"]
        a, b = _unrle(expected["mask_rle"], expected["shape"]), _unrle(got["mask_rle"], got["shape"])
        union = int(np.logical_or(a, b).sum())
        iou = 1.0 if union == 0 else int(np.logical_and(a, b).sum()) / union
        return [] if iou >= MASK_IOU else [f"{path}: mask IoU {iou:.4f} < {MASK_IOU}"]
    if isinstance(expected, dict) and isinstance(got, dict):
        problems = []
        for key in sorted(set(expected) | set(got), key=str):
            where = f"{path}/{key}"
            if key not in got:
                problems.append(f"{where}: missing")
            elif key not in expected:
                problems.append(f"{where}: not in the recording")
            elif key not in BYTES_OF_MODEL_OUTPUT or path.endswith("/fingerprint"):
                problems.extend(compare(expected[key], got[key], where))
        return problems
    if isinstance(expected, list) and isinstance(got, list):
        if len(expected) != len(got):
            return [f"{path}: {len(got)} items != {len(expected)}"]
        problems = []
        for i, (a, b) in enumerate(zip(expected, got)):
            problems.extend(compare(a, b, f"{path}[{i}]"))
        return problems
    if isinstance(expected, float) or isinstance(got, float):
        if isinstance(expected, (int, float)) and isinstance(got, (int, float)) and not isinstance(got, bool):
            if math.isnan(expected) and math.isnan(got):
                return []
            if abs(float(expected) - float(got)) <= FLOAT_ATOL:
                return []
        return [f"{path}: {got!r} != {expected!r} (float tolerance {FLOAT_ATOL})"]
    if expected != got:
        return [f"{path}: {str(got)[:120]!r} != {str(expected)[:120]!r}"]
    return []
