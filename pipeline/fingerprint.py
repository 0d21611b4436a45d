"""Content fingerprints of model weights, for the manifest: which model made these shards."""

from __future__ import annotations

import hashlib
import os
from typing import Optional

_CHUNK = 1 << 20


def fingerprint(model: Optional[str]) -> dict:
    """{"path", "sha256"} for a local file or directory (all files, sorted by relative path);
    {"id", "sha256": None} for a hub id or model name, resolved by its library at load time."""
    if not model:
        return {"id": None, "sha256": None}
    path = os.path.expanduser(model)
    if not os.path.exists(path):
        return {"id": model, "sha256": None}
    digest = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(root, name) for root, _, names in os.walk(path) for name in names
    )
    for file in files:
        if file != path:  # a directory: names matter too; a single file: content only
            digest.update(os.path.relpath(file, path).encode("utf-8") + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        digest.update(b"\0")
    return {"path": os.path.abspath(path), "sha256": digest.hexdigest()}
