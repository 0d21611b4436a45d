"""Typed records that travel between pipeline stages.

One record type, `Sample`, carries one image from ingest to shard. Stages never mutate a
Sample: they return a copy with their fields filled (`dataclasses.replace`). Images travel
as the exact encoded bytes that will land in the shard (`image_jpeg`), so every model stage
sees precisely the pixels a consumer will read back; the mask travels as its PNG bytes for
the same reason.

Anything that fails becomes a `DeadLetter` carrying the sample key, the stage and a reason a
person can act on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

import numpy as np

from prep.schemas import contract
from prep.schemas.contract import DOMAINS, GENERAL, SPECIFIC  # noqa: F401 - the contract names them

_KEY_OK = re.compile(r"^[A-Za-z0-9_-]+$")
_KEY_BAD_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


def make_key(prefix: str, *parts: str) -> str:
    """A stable sample key: `prefix_part1_part2`, only [A-Za-z0-9_-], never a dot.

    Parts are sanitised; when sanitising changed anything, a short hash of the original
    parts is appended so that two different names can never collide on one key
    ("a b.jpg" and "a_b.jpg" differ).
    """
    raw = "/".join(parts)
    clean = [_KEY_BAD_CHARS.sub("_", p).strip("_") or "x" for p in parts]
    key = "_".join([prefix, *clean])
    if "_".join(clean) != "_".join(parts):
        key += "_" + hashlib.sha1(raw.encode("utf-8")).hexdigest()[:8]
    return key


def is_valid_key(key: str) -> bool:
    return bool(_KEY_OK.match(key))


@dataclass(frozen=True)
class SourceItem:
    """One input found by a source, before its bytes are read: small and cheap to shuffle."""

    key: str
    source: str  # "celeba", "folder", "wds" or "lsun"
    domain: str  # SPECIFIC or GENERAL
    path: str  # file path or URL (for wds: the tar URL)
    identity: Optional[str] = None
    attributes: Optional[dict[str, bool]] = None
    split: Optional[str] = None  # "train" / "val" / "test" when the source says so
    origin: Optional[dict] = None  # lineage: {"path": relative to the input root} or {"url", "member"}


@dataclass(frozen=True)
class Sample:
    """One image and everything the stages attach to it."""

    key: str
    source: str
    domain: str
    path: str
    identity: Optional[str] = None
    attributes: Optional[dict[str, bool]] = None
    split: Optional[str] = None
    origin: Optional[dict] = None  # lineage (SourceItem.origin; wds: set by the tar reader)
    source_meta: Optional[dict] = None  # the source's own per-sample metadata (wds: KEY.json; lsun: the key)
    # Encoded input as read (dropped after decode), then the validated RGB JPEG for the shard.
    raw: Optional[bytes] = None
    image_jpeg: Optional[bytes] = None
    width: Optional[int] = None
    height: Optional[int] = None
    # Text that came with the input (general-domain alt text), if any.
    text: Optional[str] = None
    caption_vlm: Optional[str] = None
    caption_attributes: Optional[str] = None
    caption: Optional[str] = None
    caption_flags: tuple[str, ...] = ()  # caption guards that fired, kept (--caption-on-bad keep)
    caption_contradictions: tuple[dict, ...] = ()  # VLM words against the labels (transforms/caption_labels.py)
    # --attribute-model (transforms/attribute_predict.py): where `attributes` came from ("labels",
    # "predicted"), the probe's probability per attribute, and the labels it contradicts.
    attributes_source: Optional[str] = None
    attribute_probabilities: Optional[dict] = None
    attribute_doubts: tuple[dict, ...] = ()
    mask_png: Optional[bytes] = None
    mask_fraction: Optional[float] = None
    embedding: Optional[np.ndarray] = None  # float32 [D]
    # Identity step: a digest of the decoded pixels, a perceptual hash, the faces found (face
    # models; each with box, landmarks and descriptor), then pairing's verdict (`identity`).
    pixel_sha256: Optional[str] = None
    phash: Optional[str] = None
    faces: Optional[tuple] = None  # tuple[transforms.faces.Face, ...]
    ref_keys: tuple[str, ...] = ()
    refs: Optional[np.ndarray] = None  # float32 [K, D]
    ref_kinds: tuple[str, ...] = ()  # per ref: "identity" or "augmented" (transforms/views.py); () = all identity
    view_of: Optional[str] = None  # an augmented view of that sample (transforms/views.py), never written
    reused: tuple[str, ...] = ()  # stages whose output came from --reuse PREV_OUT (pipeline/reuse.py)
    verdict: Optional[object] = None  # transforms.verify.Verdict, attached with the refs

    def with_(self, **changes) -> "Sample":
        return dataclasses.replace(self, **changes)

    def payload_bytes(self) -> int:
        """The bytes this sample carries in its encoded images and arrays (a size for
        metrics, computed without copying any of them)."""
        blobs = (self.raw, self.image_jpeg, self.mask_png)
        arrays = (self.embedding, self.refs)
        return sum(len(b) for b in blobs if b is not None) + sum(a.nbytes for a in arrays if a is not None)

    @classmethod
    def from_item(cls, item: SourceItem, **extra) -> "Sample":
        return cls(
            key=item.key,
            source=item.source,
            domain=item.domain,
            path=item.path,
            identity=item.identity,
            attributes=item.attributes,
            split=item.split,
            origin=item.origin,
            **extra,
        )


class DeadLetterKind(str, Enum):
    """Why an input did not reach a shard, for code; the letter's `reason` is for people.

    The one list of failure kinds: every dead letter is written with one, and resume, retry,
    validate and the report decide by it, never by the reason's text. A value is the short
    class the reason begins with ("not a decodable image: OSError ..."), so the manifest's
    `dead_letter_reasons` (counted per "stage: kind") reads as it did before kinds existed.
    A new failure is one member here (and the stage that raises it).
    """

    # Ingest (planning and the unique-keys step).
    DUPLICATE_KEY = "duplicate key"
    NO_IDENTITY_LINE = "no identity line"
    BAD_IDENTITY_LINE = "bad identity line"
    # Read (files and input tars).
    CANNOT_READ = "cannot read file"
    EMPTY_FILE = "empty file"  # also decode's: zero bytes to decode
    FILE_TOO_LARGE = "file too large"
    DUPLICATE_KEY_IN_TAR = "duplicate key in tar"
    DUPLICATE_MEMBER = "duplicate member"
    NO_IMAGE_MEMBER = "no image member"
    INCOMPLETE_TAR_SAMPLE = "incomplete tar sample"
    UNREADABLE_TAR = "unreadable tar"
    EMPTY_TAR = "empty tar"  # a readable tar that holds no sample at all
    # Decode.
    NOT_AN_IMAGE = "not a decodable image"
    TOO_MANY_PIXELS = "too many pixels"
    CORRUPT = "truncated or corrupt image"
    UNCONVERTIBLE = "cannot convert image"
    TOO_SMALL = "too small"
    EXTREME_ASPECT = "extreme aspect ratio"
    # Model stages (any StageHandler), caption, mask.
    PREPROCESSING_FAILED = "preprocessing failed"
    INFERENCE_FAILED = "inference failed"
    POSTPROCESSING_FAILED = "postprocessing failed"
    EMPTY_CAPTION = "captioner produced an empty caption"
    CAPTION_REPETITION = "caption is a repetition loop"  # transforms/caption_guards.py, --caption-on-bad drop
    CAPTION_ECHO = "caption echoes the prompt or template"
    CAPTION_REFUSAL = "caption is a refusal"
    CAPTION_CUT = "caption cut at the token limit"
    NO_CAPTION = "no caption"
    MASK_BELOW_FLOOR = "mask foreground below the floor"
    # Identity (the identity step and the identity checks around pairing).
    NO_FACE = "no face found"
    IDENTITY_OUTLIER = "identity outlier"
    EXACT_DUPLICATE = "exact duplicate"
    # --exclude (transforms/sources/exclude.py): a takedown or opt-out list named the input.
    EXCLUDED = "excluded"
    # A letter written before kinds existed whose reason names none of the above.
    UNKNOWN = "unknown"

    @property
    def key_is_taken(self) -> bool:
        """A second input produced a key that a sample in a shard already has: the letter's
        key may also be in a shard, and retrying it can never succeed."""
        return self in (DeadLetterKind.DUPLICATE_KEY, DeadLetterKind.DUPLICATE_KEY_IN_TAR)

    @classmethod
    def of_letter(cls, letter: dict) -> "DeadLetterKind":
        """The kind of a dead-letter JSON line. Lines written by prep before kinds existed
        (contract v1 without "kind") are classed once, here, by their reason's prefix."""
        if letter.get("kind") is not None:
            return cls(letter["kind"])
        reason = str(letter.get("reason") or "")
        if reason.startswith("mask foreground "):
            return cls.MASK_BELOW_FLOOR
        matches = [k for k in cls if reason == k.value or reason.startswith(k.value + ":")]
        return max(matches, key=lambda k: len(k.value)) if matches else cls.UNKNOWN


@dataclass(frozen=True)
class DeadLetter:
    """An input that will not reach a shard: which kind of failure (for code) and why (for people)."""

    key: str
    source: str
    stage: str
    kind: DeadLetterKind
    reason: str
    path: Optional[str] = None

    @classmethod
    def of(cls, sample: "Sample | SourceItem", stage: str, kind: DeadLetterKind, reason: str) -> "DeadLetter":
        return cls(key=sample.key, source=sample.source, stage=stage, kind=kind, reason=reason, path=sample.path)

    def to_json(self) -> dict:
        return {
            "key": self.key,
            "source": self.source,
            "stage": self.stage,
            "kind": self.kind.value,
            "reason": self.reason,
            "path": self.path,
        }

    @classmethod
    def from_json(cls, data: dict) -> "DeadLetter":
        return cls(key=data["key"], source=data["source"], stage=data["stage"], kind=DeadLetterKind.of_letter(data),
                   reason=data["reason"], path=data.get("path"))


@dataclass(frozen=True)
class ShardInfo:
    """What one written shard holds; collected into sizes.json and the manifest."""

    domain: str
    name: str  # "000000.tar"
    count: int
    sha256: str
    bytes: int
    split: str = contract.TRAIN  # where it lives: contract.shard_folder(split, domain)
    caption_flags: dict = field(default_factory=dict)  # flag -> samples kept with it (--caption-on-bad keep)
    caption_contradictions: dict = field(default_factory=dict)  # attribute -> samples whose caption contradicts it
    attribute_doubts: dict = field(default_factory=dict)  # attribute -> samples whose label the probe doubts


@dataclass
class SourceReport:
    """What a source found at launch: counts, quirks and warnings (manifest + summary)."""

    spec: str
    kind: str
    items: int = 0
    warnings: list[str] = field(default_factory=list)
    missing_on_disk: int = 0
    missing_examples: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)
