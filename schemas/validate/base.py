"""The validator's shared parts: what it remembers per key and shard, the hashing reader,
small helpers, and its plumbing (file listing and reading through FileSystems)."""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Optional

import numpy as np
from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems
from PIL import Image

from prep.schemas import output
from prep.schemas.contract import (
    OPTIONAL,
    REQUIRED,
    split_member,
)
from prep.schemas.records import (
    GENERAL,
    SPECIFIC,
)

# Known member extensions, longest first, so that 'a.b.emb.npy' splits as ('a.b', 'emb.npy')
# and the dotted key is reported as such instead of as an odd extension.
_KNOWN_EXTS = tuple(sorted({e for exts in (*REQUIRED.values(), *OPTIONAL.values()) for e in exts}, key=len, reverse=True))
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_READ_CHUNK = 1 << 20
# Reports a problem with one sample: (member extension or None for the whole sample, message).
_Bad = Callable[[Optional[str], str], None]
_MAX_EXAMPLES = 5
_DIGEST_SIZE = hashlib.sha1().digest_size  # of one embedding digest, see _emb_digest


# ----------------------------------------------------------------------------- internals


@dataclass
class _KeyInfo:
    """What the ref checks need to remember of one specific sample."""

    identity: Optional[str]
    emb_digest: Optional[bytes]  # None when the embedding itself was invalid
    identity_status: Optional[str] = None


@dataclass
class _PendingRefs:
    """One sample's references, resolved after every shard has been read."""

    where: str  # "specific/000000.tar: KEY.refs.npy"
    key: str
    identity: Optional[str]
    identity_known: bool
    ref_keys: list[str]
    # The rows' digests, concatenated (one bytes object per sample keeps memory small);
    # None when the refs array itself was invalid.
    row_digests: Optional[bytes]
    identity_status: Optional[str] = None


@dataclass
class _ManifestInfo:
    """The usable parts of the manifest (invalid parts are reported and left out)."""

    counts: dict[str, int] = field(default_factory=dict)
    entries: list[dict[str, Any]] = field(default_factory=list)  # shard entries as listed
    # domain -> shard name -> the valid fields of its entry
    shards: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)


class _HashingReader:
    """A read-only stream wrapper that hashes and counts every byte read through it.

    One pass over a shard then serves both the tar reader and the sha256/size check.
    """

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self.nbytes = 0
        self.broken = False  # set when the tar stream turned out corrupt

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.sha256.update(data)
        self.nbytes += len(data)
        return data

    def drain(self) -> None:
        """Read the rest (a tar reader stops at the end-of-archive marker)."""
        while self.read(_READ_CHUNK):
            pass


def _emb_digest(vector: np.ndarray) -> bytes:
    """A digest that is equal exactly when two float32 vectors are np.array_equal.

    Adding 0.0 folds -0.0 into +0.0 (array_equal treats them as equal); NaN never reaches
    here as a match because a non-finite embedding is already a problem.
    """
    folded = np.ascontiguousarray(vector, dtype=np.float32) + np.float32(0.0)
    return hashlib.sha1(folded.tobytes()).digest()


def _split_member(name: str) -> tuple[str, str]:
    """Member name -> (key, ext), recognising the contract's extensions even after a dotted key."""
    base = name.rsplit("/", 1)[-1]
    for ext in _KNOWN_EXTS:
        if base.endswith("." + ext) and len(base) > len(ext) + 1:
            return base[: -len(ext) - 1], ext
    return split_member(base)


def _is_temp_name(name: str) -> bool:
    return ".tmp" in name or name.startswith(".")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _examples(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_EXAMPLES])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _MAX_EXAMPLES else "")


def _decode_image(data: bytes) -> Image.Image:
    """Fully decode an encoded image (raises on anything malformed or truncated)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        fmt = img.format
        decoded = img.copy()
    decoded.format = fmt
    return decoded


class _ValidatorBase:
    """State and file access; the checks are mixed in from manifest.py, folders.py and samples.py."""

    def __init__(self, out_dir: str, tolerance: float):
        self.out_dir = out_dir
        self.tolerance = tolerance
        self.problems: list[str] = []
        self.found: dict[str, int] = {SPECIFIC: 0, GENERAL: 0}
        self.shards_read = 0
        self.dead_lettered = 0
        self.where: dict[str, str] = {}  # every key in a shard -> "domain/NNNNNN.tar"
        self.specific: dict[str, _KeyInfo] = {}
        self.pending_refs: list[_PendingRefs] = []
        self.identity_thresholds: dict[str, float] = {}  # identity model -> same-identity threshold (manifest)
        self.dim: Optional[int] = None  # D, from the first embedding read
        self.unreadable: list[str] = []  # shards whose tar stream broke part-way


    # ------------------------------------------------------------------ plumbing

    def problem(self, message: str) -> None:
        self.problems.append(message)

    def path(self, *parts: str) -> str:
        return FileSystems.join(self.out_dir, *parts)

    def list_files(self, *parts: str) -> dict[str, str]:
        """Base name -> full path of the files directly inside OUT/<parts>."""
        folder = self.path(*parts) if parts else self.out_dir
        try:
            return output.list_names(folder)
        except BeamIOError as e:
            self.problem(f"{folder}: cannot list files ({e})")
            return {}

    def read_bytes(self, path: str) -> bytes:
        return output.read_bytes(path)

    def read_json(self, rel: str, path: str) -> Any:
        """Parse a JSON file; None (with a problem) if it is missing or malformed."""
        if not FileSystems.exists(path):
            self.problem(f"{rel}: missing")
            return None
        try:
            return json.loads(self.read_bytes(path).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            self.problem(f"{rel}: not valid JSON ({e})")
            return None

    def check_temp_files(self, rel_dir: str, names: list[str]) -> None:
        for name in sorted(names):
            if _is_temp_name(name):
                rel = f"{rel_dir}/{name}" if rel_dir else name
                self.problem(f"{rel}: leftover temporary file (an interrupted write?)")
