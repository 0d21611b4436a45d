"""Reading on the workers: the DoFns that fetch image bytes (`ReadImageBytes`) and stream
WebDataset tars (`ReadWdsShard`) into `Sample`s or dead letters."""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Iterator, Optional

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from prep.schemas.contract import (
    MAX_MEMBER_BYTES,
    SOURCE_META_DROPPED,
    SOURCE_META_MAX_BYTES,
    iter_tar_members,
    split_member,
)
from prep.schemas.records import (
    GENERAL,
    DeadLetter,
    DeadLetterKind,
    Sample,
    SourceItem,
    make_key,
)
from prep.transforms.common import counter, dead
from prep.transforms.sources.lsun import read_record

# Image members of a WebDataset sample, in order of preference.
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
WDS_TEXT_EXT = "txt"
WDS_JSON_EXT = "json"  # img2dataset's per-sample metadata: kept verbatim as the sample's source_meta


def capped_source_meta(meta: dict, limit: int = SOURCE_META_MAX_BYTES) -> dict:
    """`meta` as it came when its JSON fits in `limit` bytes; else without its largest fields
    (largest first, ties by name) until it fits, their names listed under "_dropped". A url,
    sha256 or key is never what gets dropped while a bigger field (exif) is there."""
    def size(value) -> int:
        return len(json.dumps(value, ensure_ascii=False, sort_keys=True).encode("utf-8"))

    if size(meta) <= limit:
        return meta
    kept = dict(meta)
    dropped: list[str] = []
    for name in sorted(meta, key=lambda n: (-size({n: meta[n]}), n)):
        if size({**kept, SOURCE_META_DROPPED: dropped}) <= limit:
            break
        kept.pop(name)
        dropped.append(name)
    kept[SOURCE_META_DROPPED] = sorted(dropped)
    return kept


def parse_source_meta(raw: bytes) -> Optional[dict]:
    """A KEY.json member as an object, capped (None when it is not a JSON object: the image
    is still good, so the sample is kept, and counted)."""
    try:
        # NaN / Infinity (pandas' missing values in img2dataset's JSON) are not JSON: null.
        meta = json.loads(raw.decode("utf-8"), parse_constant=lambda _: None)
    except (UnicodeDecodeError, ValueError):
        return None
    return capped_source_meta(meta) if isinstance(meta, dict) else None


# --------------------------------------------------------------------------------------
# Reading (worker side)
# --------------------------------------------------------------------------------------


class ReadImageBytes(beam.DoFn):
    """SourceItem -> Sample with `raw` = the file's exact bytes; unreadable -> dead letter.

    At most `max_bytes` are read: a bigger file (a video or an archive named .jpg) is a dead
    letter, never a worker's memory.
    """

    def __init__(self, max_bytes: int = MAX_MEMBER_BYTES) -> None:
        self._max_bytes = max_bytes
        self._ok = counter("read", "ok")
        self._failed = counter("read", "failed")
        self._empty = counter("read", "empty")
        self._too_large = counter("read", "too_large")

    def process(self, item: SourceItem) -> Iterator[object]:
        try:
            if item.source == "lsun":  # a record of an LMDB database, by its key
                data = read_record(item, self._max_bytes)
                if data is None:
                    raise KeyError(f"record {(item.origin or {}).get('key')!r} is not in the database (changed since planning?)")
            else:
                with FileSystems.open(item.path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                    data = f.read(self._max_bytes + 1)
        except Exception as exc:  # any filesystem error: the reason goes to the dead letter
            self._failed.inc()
            yield dead(DeadLetter.of(item, "read", DeadLetterKind.CANNOT_READ, f"cannot read file: {type(exc).__name__}: {exc}"))
            return
        if not data:
            self._empty.inc()
            what = (f"empty file: record {(item.origin or {}).get('key')} has a 0-byte value" if item.source == "lsun"
                    else "empty file: 0 bytes")
            yield dead(DeadLetter.of(item, "read", DeadLetterKind.EMPTY_FILE, what))
            return
        if len(data) > self._max_bytes:
            self._too_large.inc()
            yield dead(DeadLetter.of(item, "read", DeadLetterKind.FILE_TOO_LARGE, f"file too large: more than {self._max_bytes} bytes"))
            return
        self._ok.inc()
        if item.source == "lsun":  # the record's key is all the metadata LSUN has
            yield Sample.from_item(item, raw=data, source_meta={"key": item.origin["key"]})
        else:
            yield Sample.from_item(item, raw=data)


@dataclass
class _TarSample:
    """Members of one tar sample being collected (only the ones we may use are kept)."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    extensions: set[str] = field(default_factory=set)
    duplicate: Optional[str] = None

    def add(self, ext: str, data: bytes) -> None:
        if ext in self.extensions and self.duplicate is None:
            self.duplicate = ext
        self.extensions.add(ext)
        if ext in WDS_IMAGE_EXTS or ext in (WDS_TEXT_EXT, WDS_JSON_EXT):
            self.members.setdefault(ext, data)

    def image(self) -> Optional[bytes]:
        return next((self.members[e] for e in WDS_IMAGE_EXTS if e in self.members), None)


def _tar_stem(url: str) -> str:
    """'gs://b/000003.tar' -> '000003'."""
    return posixpath.basename(url.rstrip("/")).split(".", 1)[0] or "tar"


class ReadWdsShard(beam.DoFn):
    """Tar URL -> one Sample per img2dataset sample (KEY.jpg + KEY.txt + KEY.json).

    Members are grouped by key (base name before the first dot). Only image, txt and json
    members are used; anything else (.pyd, .pickle, .pth, ...) is never decoded. A sample
    without an image member is a dead letter. When the tar turns out corrupt, truncated or
    unsafe, the samples completed before stay; the sample in progress is a dead letter of
    its own (the error may have cut off its remaining members, its caption say, and does
    not tell whether it did: a sample is never passed on possibly incomplete); and one
    `unreadable tar` dead letter names the tar, the count read before the failure and the
    error. A tar that reads fine but holds no member at all is one `empty tar` dead letter
    (an input that yields nothing is never silent).

    Keys are `<namespace>_<member key>`: the namespace of the tar's input (`namespaces`, url ->
    namespace, from planning.input_namespaces); without one, `wds`.
    """

    def __init__(self, origins: Optional[dict[str, dict]] = None, namespaces: Optional[dict[str, str]] = None) -> None:
        # url -> the lineage prefix of its samples ({"input": n, "tar": path relative to the
        # input pattern's folder}); without it, the URL itself.
        self._origins = dict(origins or {})
        self._namespaces = dict(namespaces or {})
        self._samples = counter("read_wds", "samples")
        self._no_image = counter("read_wds", "no_image")
        self._duplicates = counter("read_wds", "duplicate")
        self._bad_text = counter("read_wds", "bad_text")
        self._bad_json = counter("read_wds", "bad_json")
        self._incomplete = counter("read_wds", "incomplete")
        self._tar_errors = counter("read_wds", "tar_error")
        self._tars = counter("read_wds", "tars")
        self._empty = counter("read_wds", "empty_tar")

    def _namespace(self, url: str) -> str:
        return self._namespaces.get(url, "wds")

    def _tar_letter(self, url: str, suffix: str, kind: DeadLetterKind, reason: str):
        """The dead letter of a whole tar (its key: the tar's stem and `suffix`)."""
        key = make_key(self._namespace(url), _tar_stem(url), suffix)
        return dead(DeadLetter(key=key, source="wds", stage="read", kind=kind, reason=reason, path=url))

    def process(self, url: str) -> Iterator[object]:
        self._tars.inc()
        emitted = 0
        seen: set[str] = set()
        current: Optional[_TarSample] = None
        members = 0
        try:
            with FileSystems.open(url, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                for name, data in iter_tar_members(f):
                    members += 1
                    member_key, ext = split_member(name)
                    if current is not None and current.key != member_key:
                        yield from self._emit(url, current, seen)
                        emitted += 1
                        current = None
                    if current is None:
                        current = _TarSample(member_key)
                    current.add(ext.lower(), data)
        except Exception as exc:  # corrupt, truncated or unsafe tar: dead letters for the rest
            if current is not None:
                self._incomplete.inc()
                read = ", ".join(sorted(current.extensions)) or "none"
                yield dead(
                    DeadLetter(
                        key=make_key(self._namespace(url), current.key),
                        source="wds",
                        stage="read",
                        kind=DeadLetterKind.INCOMPLETE_TAR_SAMPLE,
                        reason=(
                            f"incomplete tar sample: reading {url} failed in or right after sample "
                            f"{current.key} (members read: {read}), so members of it may be missing"
                        ),
                        path=f"{url}#{current.key}",
                    )
                )
            self._tar_errors.inc()
            yield self._tar_letter(url, "tar_error", DeadLetterKind.UNREADABLE_TAR, (
                f"unreadable tar: {url} failed after {emitted} complete sample{'' if emitted == 1 else 's'} "
                f"({type(exc).__name__}: {exc})"
            ))
            return
        if current is not None:
            yield from self._emit(url, current, seen)
        elif members == 0:
            self._empty.inc()
            yield self._tar_letter(url, "empty_tar", DeadLetterKind.EMPTY_TAR,
                                   f"empty tar: {url} is a valid tar that holds no sample (no file member)")

    def _emit(self, url: str, sample: _TarSample, seen: set[str]) -> Iterator[object]:
        key = make_key(self._namespace(url), sample.key)
        path = f"{url}#{sample.key}"

        def letter(kind: DeadLetterKind, details: str) -> beam.pvalue.TaggedOutput:
            reason = f"{kind.value}: {details}"
            return dead(DeadLetter(key=key, source="wds", stage="read", kind=kind, reason=reason, path=path))

        if sample.key in seen:
            self._duplicates.inc()
            yield letter(DeadLetterKind.DUPLICATE_KEY_IN_TAR, f"{sample.key} appears twice in {url} (its members are not consecutive)")
            return
        seen.add(sample.key)
        if sample.duplicate is not None:
            self._duplicates.inc()
            yield letter(DeadLetterKind.DUPLICATE_MEMBER, f"{sample.key}.{sample.duplicate} appears twice in one tar sample")
            return
        image = sample.image()
        if image is None:
            self._no_image.inc()
            found = ", ".join(sorted(sample.extensions)) or "nothing"
            yield letter(DeadLetterKind.NO_IMAGE_MEMBER, f"tar sample {sample.key} has {found} but no {'/'.join(WDS_IMAGE_EXTS)}")
            return

        text: Optional[str] = None
        if WDS_TEXT_EXT in sample.members:
            raw_text = sample.members[WDS_TEXT_EXT]
            try:
                decoded = raw_text.decode("utf-8")
            except UnicodeDecodeError:
                self._bad_text.inc()
                decoded = raw_text.decode("utf-8", errors="replace")
            text = decoded.strip() or None

        source_meta = None
        if WDS_JSON_EXT in sample.members:
            source_meta = parse_source_meta(sample.members[WDS_JSON_EXT])
            if source_meta is None:
                self._bad_json.inc()
        self._samples.inc()
        yield Sample(
            key=key,
            source="wds",
            domain=GENERAL,
            path=path,
            raw=image,
            text=text,
            origin={**self._origins.get(url, {"tar": url}), "member": sample.key},
            source_meta=source_meta,
        )
