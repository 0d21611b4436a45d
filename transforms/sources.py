"""Input sources: what the pipeline reads, found on the launcher, read on the workers.

An input is named by a spec string:

  celeba:DIR     a CelebA download (img_align_celeba/ plus the annotation files)
  folder:DIR     DIR/<identity>/<image>, one subfolder per identity
  wds:PATTERN    WebDataset tars as img2dataset writes them (brace and glob patterns)

Small things (file listings, annotation files) are planned on the launcher by plain
functions (`plan_celeba`, `plan_folder`, `plan_wds`) that return typed `SourceItem`s, the
`DeadLetter`s found while planning and a `SourceReport` for the manifest. Reading image bytes
is fanned out in Beam DoFns (`ReadImageBytes`, `ReadWdsShard`). All file access goes through
`apache_beam.io.filesystems.FileSystems`, so local paths and gs:// work alike.

Annotation files are real-world data with quirks (header lines, truncation, mixed
separators); every quirk is reported as a warning, never guessed away silently.
"""

from __future__ import annotations

import gzip
import json
import os
import posixpath
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, Callable, Iterable, Iterator, Optional, Union

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from braceexpand import braceexpand

from prep.schemas.contract import MAX_MEMBER_BYTES, iter_tar_members, split_member
from prep.schemas.records import GENERAL, SPECIFIC, DeadLetter, DeadLetterKind, Sample, SourceItem, SourceReport, make_key
from prep.transforms.common import counter, dead

SOURCE_KINDS = ("celeba", "folder", "wds")

CELEBA_IMAGE_DIR = "img_align_celeba"
CELEBA_IDENTITY = "identity_CelebA"
CELEBA_ATTRIBUTES = "list_attr_celeba"
CELEBA_PARTITION = "list_eval_partition"
CELEBA_IMAGE_EXTS = frozenset({"jpg", "jpeg", "png"})
CELEBA_SPLITS = {"0": "train", "1": "val", "2": "test"}

FOLDER_IMAGE_EXTS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif"})

# Image members of a WebDataset sample, in order of preference.
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
WDS_TEXT_EXT = "txt"
WDS_JSON_EXT = "json"

# How many line numbers / names a warning quotes.
_EXAMPLES = 5
# How many missing-on-disk names a report keeps.
_MISSING_EXAMPLES = 10

_GLOB_CHARS = re.compile(r"[*?\[]")
_UINT = re.compile(r"[0-9]+")

PathOrFile = Union[str, "os.PathLike[str]", IO[bytes], IO[str]]


# --------------------------------------------------------------------------------------
# Input specs
# --------------------------------------------------------------------------------------


def parse_input_spec(spec: str) -> tuple[str, str]:
    """Split `KIND:LOCATION` into (kind, location); the location may itself hold colons.

    >>> parse_input_spec("wds:gs://bucket/{000..009}.tar")
    ('wds', 'gs://bucket/{000..009}.tar')
    """
    usage = "expected KIND:LOCATION with KIND one of " + ", ".join(SOURCE_KINDS) + " (e.g. celeba:/data/celeba)"
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"input spec {spec!r} has no ':'; {usage}")
    kind, location = spec.split(":", 1)
    kind = kind.strip().lower()
    location = location.strip()
    if kind not in SOURCE_KINDS:
        raise ValueError(f"input spec {spec!r}: unknown kind {kind!r}; {usage}")
    if not location:
        raise ValueError(f"input spec {spec!r}: empty location; {usage}")
    return kind, location


# --------------------------------------------------------------------------------------
# Small helpers over FileSystems
# --------------------------------------------------------------------------------------


def normalize_root(location: str) -> str:
    """Local paths become absolute (workers may run elsewhere); URLs stay as given."""
    location = location.rstrip("/") or "/"
    if FileSystems.get_scheme(location) is None:
        return os.path.abspath(location)
    return location


def _basename(path: str) -> str:
    return FileSystems.split(path)[1]


def _ext(name: str) -> str:
    """Lower-case extension after the last dot ('' when none)."""
    _, dot, ext = name.rpartition(".")
    return ext.lower() if dot else ""


def _stem(name: str) -> str:
    """File name without its last extension: '000001.jpg' -> '000001'."""
    stem, dot, _ = name.rpartition(".")
    return stem if dot else name


def _match_paths(pattern: str) -> list[str]:
    """Sorted paths matching a glob pattern ([] when nothing matches)."""
    (result,) = FileSystems.match([pattern])
    return sorted(m.path for m in result.metadata_list)


def _examples(values: Iterable[object], limit: int = _EXAMPLES) -> str:
    values = list(values)
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (", ..." if len(values) > limit else "")


def find_annotation(directory: str, stem: str) -> Optional[str]:
    """Path of `directory/STEM.txt`, else `directory/STEM.txt.gz`, else None."""
    for name in (f"{stem}.txt", f"{stem}.txt.gz"):
        path = FileSystems.join(directory, name)
        if FileSystems.exists(path):
            return path
    return None


def _read_lines(source: PathOrFile) -> tuple[str, list[str]]:
    """(label, lines) of a text file, path or file object, gzip or plain.

    Gzip is detected from the content (the magic bytes), so `X.txt.gz` and a misnamed file
    both work. The label (the file's base name) prefixes every warning about the file.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        label = _basename(path)
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            data: Union[bytes, str] = f.read()
    else:
        name = getattr(source, "name", None)
        label = os.path.basename(name) if isinstance(name, str) else "<stream>"
        data = source.read()
    if isinstance(data, bytes):
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        try:
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{label}: not UTF-8 text ({exc})") from exc
    return label, data.splitlines()


# --------------------------------------------------------------------------------------
# CelebA annotation files
# --------------------------------------------------------------------------------------


def _parse_identity(value: str) -> Optional[str]:
    return str(int(value)) if _UINT.fullmatch(value) else None


def _parse_split(value: str) -> Optional[str]:
    return CELEBA_SPLITS.get(value)


def _parse_name_value_file(
    source: PathOrFile, convert: Callable[[str], Optional[str]], value_desc: str
) -> tuple[dict[str, str], list[str], dict[str, tuple[int, str]]]:
    """Parse `<image name> <value>` lines (whitespace separated) into {name: value}.

    A first line whose second field does not convert and whose first field is not an image
    name is a header and is skipped with a warning. Malformed lines and duplicate names are
    skipped (first row kept) with one warning each, quoting a few examples. The malformed
    lines are returned too, by their first field: {name: (line number, line)}, so a caller
    can tell "no line for this image" from "a line that could not be read".
    """
    label, lines = _read_lines(source)
    out: dict[str, str] = {}
    warnings: list[str] = []
    bad: dict[str, tuple[int, str]] = {}
    bad_lines: list[int] = []
    duplicates: list[str] = []
    seen_first = False
    for lineno, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        if not seen_first:
            seen_first = True
            if len(fields) >= 2 and convert(fields[1]) is None and _ext(fields[0]) not in FOLDER_IMAGE_EXTS:
                warnings.append(f"{label}: skipped header line {lineno}: {line.strip()!r}")
                continue
        value = convert(fields[1]) if len(fields) == 2 else None
        if value is None:
            bad_lines.append(lineno)
            bad.setdefault(fields[0], (lineno, line.strip()))
            continue
        if fields[0] in out:
            duplicates.append(fields[0])
            continue
        out[fields[0]] = value
    if bad_lines:
        warnings.append(
            f"{label}: skipped {len(bad_lines)} line(s) without a valid '<image> <{value_desc}>' pair "
            f"(lines {_examples(bad_lines)})"
        )
    if duplicates:
        warnings.append(
            f"{label}: {len(duplicates)} duplicate image name(s), kept the first row of each "
            f"(e.g. {_examples(duplicates)})"
        )
    return out, warnings, bad


def _read_name_value_file(
    source: PathOrFile, convert: Callable[[str], Optional[str]], value_desc: str
) -> tuple[dict[str, str], list[str]]:
    out, warnings, _ = _parse_name_value_file(source, convert, value_desc)
    return out, warnings


def read_identity_file(source: PathOrFile) -> tuple[dict[str, str], list[str]]:
    """CelebA `identity_CelebA.txt[.gz]`: ({'000001.jpg': '2880', ...}, warnings).

    Accepts a path (local or any Beam filesystem) or a binary/text file object, gzip or
    plain. Identities are the integer ids as strings ('02880' -> '2880').
    """
    return _read_name_value_file(source, _parse_identity, "identity id")


def read_partition_file(source: PathOrFile) -> tuple[dict[str, str], list[str]]:
    """CelebA `list_eval_partition.txt[.gz]`: ({'000001.jpg': 'train', ...}, warnings).

    Values 0/1/2 map to 'train'/'val'/'test'; any other value is a malformed line.
    """
    return _read_name_value_file(source, _parse_split, "0|1|2")


_ATTR_VALUES = {"1": True, "-1": False}


def read_attribute_file(
    source: PathOrFile,
) -> tuple[list[str], dict[str, dict[str, bool]], list[str]]:
    """CelebA `list_attr_celeba.txt[.gz]`: (names, {image: {name: bool}}, warnings).

    Format: line 1 the declared image count, line 2 the attribute names, then rows
    `000001.jpg -1  1 ...` (1 = True, -1 = False) separated by one or more spaces.
    A declared count that disagrees with the rows found is a warning naming both numbers.
    Rows with the wrong column count or a value other than 1/-1 (0 included) are skipped
    with a warning; duplicate image names keep the first row.
    """
    label, lines = _read_lines(source)
    numbered = [(n, line.split()) for n, line in enumerate(lines, 1) if line.strip()]
    warnings: list[str] = []
    if not numbered:
        return [], {}, [f"{label}: file is empty"]

    declared: Optional[int] = None
    first_no, first = numbered[0]
    if len(first) == 1 and _UINT.fullmatch(first[0]):
        declared = int(first[0])
        numbered = numbered[1:]
    else:
        warnings.append(f"{label}: line {first_no} is not an image count; reading it as the attribute names")
    if not numbered:
        return [], {}, warnings + [f"{label}: no attribute names line"]

    names_no, names = numbered[0]
    if _ext(names[0]) in FOLDER_IMAGE_EXTS:
        raise ValueError(f"{label}: line {names_no} should list the attribute names but starts with {names[0]!r}")
    if len(set(names)) != len(names):
        dupes = [n for n, c in Counter(names).items() if c > 1]
        raise ValueError(f"{label}: duplicate attribute names on line {names_no}: {_examples(dupes)}")

    rows: dict[str, dict[str, bool]] = {}
    wrong_columns: list[str] = []
    wrong_values: list[str] = []
    duplicates: list[str] = []
    data_rows = numbered[1:]
    for _lineno, fields in data_rows:
        if len(fields) != len(names) + 1:
            wrong_columns.append(fields[0])
            continue
        values = [_ATTR_VALUES.get(v) for v in fields[1:]]
        if any(v is None for v in values):
            wrong_values.append(fields[0])
            continue
        if fields[0] in rows:
            duplicates.append(fields[0])
            continue
        rows[fields[0]] = dict(zip(names, values))  # type: ignore[arg-type]

    if declared is not None and declared != len(data_rows):
        warnings.append(
            f"{label}: line 1 declares {declared} images but the file holds {len(data_rows)} rows "
            f"(truncated or partial copy?); images without a row get no attributes"
        )
    if wrong_columns:
        warnings.append(
            f"{label}: skipped {len(wrong_columns)} row(s) without {len(names) + 1} columns "
            f"(e.g. {_examples(wrong_columns)})"
        )
    if wrong_values:
        warnings.append(
            f"{label}: skipped {len(wrong_values)} row(s) with a value other than 1/-1 "
            f"(e.g. {_examples(wrong_values)})"
        )
    if duplicates:
        warnings.append(
            f"{label}: {len(duplicates)} duplicate image name(s), kept the first row of each "
            f"(e.g. {_examples(duplicates)})"
        )
    return names, rows, warnings


def _by_stem(rows: dict[str, object]) -> dict[str, object]:
    """Re-key annotation rows by file stem (so 000001.png finds the row of 000001.jpg)."""
    out: dict[str, object] = {}
    for name, value in rows.items():
        out.setdefault(_stem(name), value)
    return out


# --------------------------------------------------------------------------------------
# Planning (launcher side)
# --------------------------------------------------------------------------------------


def _duplicate_letter(key: str, source: str, path: str, first_path: str) -> DeadLetter:
    return DeadLetter(
        key=key,
        source=source,
        stage="ingest",
        kind=DeadLetterKind.DUPLICATE_KEY,
        reason=f"duplicate key: {key} is also produced by {first_path}",
        path=path,
    )


def plan_celeba(root: str) -> tuple[list[SourceItem], list[DeadLetter], SourceReport]:
    """Plan a CelebA directory: one SourceItem per image on disk that has an identity.

    Layout: ROOT/img_align_celeba/*.{jpg,jpeg,png}, ROOT/identity_CelebA.txt[.gz] (required),
    ROOT/list_attr_celeba.txt[.gz] and ROOT/list_eval_partition.txt[.gz] (optional).
    Annotations are joined to images by file stem. An image with no identity line is a dead
    letter; annotation rows for images not on disk are only counted (report.missing_on_disk),
    so a partial download does not flood the dead-letter output.
    """
    root = normalize_root(root)
    report = SourceReport(spec=f"celeba:{root}", kind="celeba")

    identity_path = find_annotation(root, CELEBA_IDENTITY)
    if identity_path is None:
        raise FileNotFoundError(
            f"CelebA source {root}: identity file not found; expected "
            f"{FileSystems.join(root, CELEBA_IDENTITY + '.txt')} or .txt.gz"
        )
    identities, warnings, bad_identity_lines = _parse_name_value_file(identity_path, _parse_identity, "identity id")
    report.warnings.extend(warnings)
    identity_file = _basename(identity_path)

    attributes_path = find_annotation(root, CELEBA_ATTRIBUTES)
    attribute_names: list[str] = []
    attributes: dict[str, dict[str, bool]] = {}
    if attributes_path is None:
        report.warnings.append(f"{CELEBA_ATTRIBUTES}.txt[.gz] not found in {root}: attributes are None")
    else:
        attribute_names, attributes, warnings = read_attribute_file(attributes_path)
        report.warnings.extend(warnings)

    partition_path = find_annotation(root, CELEBA_PARTITION)
    splits: dict[str, str] = {}
    if partition_path is None:
        report.warnings.append(f"{CELEBA_PARTITION}.txt[.gz] not found in {root}: splits are None")
    else:
        splits, warnings = read_partition_file(partition_path)
        report.warnings.extend(warnings)

    image_dir = FileSystems.join(root, CELEBA_IMAGE_DIR)
    images = [
        p
        for p in _match_paths(FileSystems.join(image_dir, "*"))
        if _ext(_basename(p)) in CELEBA_IMAGE_EXTS and not _basename(p).startswith(".")
    ]
    if not images:
        raise FileNotFoundError(f"CelebA source {root}: no .jpg/.jpeg/.png images in {image_dir}")

    identity_by_stem = _by_stem(identities)
    bad_identity_by_stem = _by_stem(bad_identity_lines)
    attributes_by_stem = _by_stem(attributes)
    split_by_stem = _by_stem(splits)

    items: list[SourceItem] = []
    dead_letters: list[DeadLetter] = []
    first_path_of_key: dict[str, str] = {}
    on_disk: set[str] = set()
    for path in images:
        name = _basename(path)
        stem = _stem(name)
        on_disk.add(stem)
        key = make_key("celeba", stem)
        if key in first_path_of_key:
            dead_letters.append(_duplicate_letter(key, "celeba", path, first_path_of_key[key]))
            continue
        first_path_of_key[key] = path
        identity = identity_by_stem.get(stem)
        if identity is None:
            bad_line = bad_identity_by_stem.get(stem)
            if bad_line is not None:
                lineno, line = bad_line  # type: ignore[misc]
                kind = DeadLetterKind.BAD_IDENTITY_LINE
                reason = (
                    f"bad identity line: line {lineno} of {identity_file} is {line!r}, "
                    f"not '<image> <numeric identity id>'"
                )
            else:
                kind = DeadLetterKind.NO_IDENTITY_LINE
                reason = f"no identity line: {name} is not in {identity_file}"
            dead_letters.append(DeadLetter(key=key, source="celeba", stage="ingest", kind=kind, reason=reason, path=path))
            continue
        items.append(
            SourceItem(
                key=key,
                source="celeba",
                domain=SPECIFIC,
                path=path,
                identity=identity,  # type: ignore[arg-type]
                attributes=attributes_by_stem.get(stem),  # type: ignore[arg-type]
                split=split_by_stem.get(stem),  # type: ignore[arg-type]
            )
        )
    items.sort(key=lambda item: item.key)

    # Annotated images that are not on disk: counted, never dead letters.
    annotated: dict[str, str] = {}
    for rows in (identities, bad_identity_lines, attributes, splits):
        for name in rows:
            annotated.setdefault(_stem(name), name)
    missing = sorted(name for stem, name in annotated.items() if stem not in on_disk)
    report.missing_on_disk = len(missing)
    report.missing_examples = missing[:_MISSING_EXAMPLES]

    without_attributes = sum(1 for item in items if item.attributes is None)
    without_split = sum(1 for item in items if item.split is None)
    if attributes_path is not None and without_attributes:
        report.warnings.append(
            f"{without_attributes} of {len(items)} images have no row in {_basename(attributes_path)}; "
            f"their attributes are None"
        )
    if partition_path is not None and without_split:
        report.warnings.append(
            f"{without_split} of {len(items)} images have no row in {_basename(partition_path)}; "
            f"their split is None"
        )
    if missing:
        report.warnings.append(
            f"{len(missing)} annotated images are not on disk under {image_dir} (partial download?), "
            f"e.g. {_examples(missing)}"
        )

    report.items = len(items)
    report.stats = {
        "images_on_disk": len(images),
        "identity_file": identity_file,
        "identity_rows": len(identities),
        "identities_in_file": len(set(identities.values())),
        "identities": len({item.identity for item in items}),
        "attribute_file": _basename(attributes_path) if attributes_path else None,
        "attribute_names": len(attribute_names),
        "attribute_rows": len(attributes),
        "images_with_attributes": len(items) - without_attributes,
        "images_without_attributes": without_attributes,
        "partition_file": _basename(partition_path) if partition_path else None,
        "images_with_split": len(items) - without_split,
        "splits": dict(sorted(Counter(item.split for item in items if item.split).items())),
        "dead_letters": len(dead_letters),
    }
    return items, dead_letters, report


def plan_folder(root: str) -> tuple[list[SourceItem], list[DeadLetter], SourceReport]:
    """Plan ROOT/<identity>/<image>: each immediate subfolder is one identity.

    Images are jpg/jpeg/png/webp/bmp/gif (any case); hidden files and folders are skipped,
    other files and files directly in ROOT are ignored with a warning. Deeper folders are
    not looked at. Two files giving the same key (a.jpg and a.png in one folder): the
    second in path order is a dead letter.
    """
    root = normalize_root(root)
    report = SourceReport(spec=f"folder:{root}", kind="folder")

    in_root = [p for p in _match_paths(FileSystems.join(root, "*")) if not _basename(p).startswith(".")]
    if in_root:
        report.warnings.append(
            f"{len(in_root)} file(s) directly in {root} ignored (images go in one subfolder per "
            f"identity), e.g. {_examples(_basename(p) for p in in_root)}"
        )

    items: list[SourceItem] = []
    dead_letters: list[DeadLetter] = []
    first_path_of_key: dict[str, str] = {}
    not_images: list[str] = []
    hidden = 0
    for path in _match_paths(FileSystems.join(root, "*", "*")):
        folder, name = FileSystems.split(path)
        identity = _basename(folder)
        if name.startswith(".") or identity.startswith("."):
            hidden += 1
            continue
        if _ext(name) not in FOLDER_IMAGE_EXTS:
            not_images.append(f"{identity}/{name}")
            continue
        key = make_key("folder", identity, _stem(name))
        if key in first_path_of_key:
            dead_letters.append(_duplicate_letter(key, "folder", path, first_path_of_key[key]))
            continue
        first_path_of_key[key] = path
        items.append(SourceItem(key=key, source="folder", domain=SPECIFIC, path=path, identity=identity))
    if not items:
        raise FileNotFoundError(
            f"folder source {root}: no images found in {FileSystems.join(root, '<identity>', '<image>')} "
            f"(extensions {', '.join(sorted(FOLDER_IMAGE_EXTS))})"
        )
    items.sort(key=lambda item: item.key)
    if not_images:
        report.warnings.append(
            f"{len(not_images)} non-image file(s) in identity folders ignored, e.g. {_examples(not_images)}"
        )

    per_identity = Counter(item.identity for item in items)
    report.items = len(items)
    report.stats = {
        "identities": len(per_identity),
        "images_per_identity_min": min(per_identity.values()),
        "images_per_identity_max": max(per_identity.values()),
        "non_image_files": len(not_images),
        "files_in_root": len(in_root),
        "hidden_files": hidden,
        "dead_letters": len(dead_letters),
    }
    return items, dead_letters, report


def plan_wds(pattern: str) -> tuple[list[str], SourceReport]:
    """Expand a tar pattern (braces, then globs) into the sorted list of existing tar URLs.

    `gs://b/{000000..000009}.tar` expands to ten URLs; a name with * ? [ is matched with
    FileSystems.match. Expanded names that do not exist are counted in the report (missing
    shards of an otherwise present dataset); nothing at all raises FileNotFoundError.
    """
    report = SourceReport(spec=f"wds:{pattern}", kind="wds")
    expanded = [normalize_root(p) for p in braceexpand(pattern)]
    urls: set[str] = set()
    missing: list[str] = []
    for candidate in expanded:
        if _GLOB_CHARS.search(candidate):
            found = _match_paths(candidate)
        else:
            found = [candidate] if FileSystems.exists(candidate) else []
        if not found:
            missing.append(candidate)
        urls.update(found)
    if not urls:
        raise FileNotFoundError(
            f"wds source {pattern!r}: no tar file matches (expanded to {len(expanded)} name(s), "
            f"e.g. {_examples(expanded, 3)})"
        )
    if missing:
        report.missing_on_disk = len(missing)
        report.missing_examples = missing[:_MISSING_EXAMPLES]
        report.warnings.append(f"{len(missing)} name(s) from {pattern!r} match no file, e.g. {_examples(missing)}")
    result = sorted(urls)
    report.items = len(result)
    report.stats = {"tars": len(result), "expanded_patterns": len(expanded)}
    return result, report


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
            with FileSystems.open(item.path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                data = f.read(self._max_bytes + 1)
        except Exception as exc:  # any filesystem error: the reason goes to the dead letter
            self._failed.inc()
            yield dead(DeadLetter.of(item, "read", DeadLetterKind.CANNOT_READ, f"cannot read file: {type(exc).__name__}: {exc}"))
            return
        if not data:
            self._empty.inc()
            yield dead(DeadLetter.of(item, "read", DeadLetterKind.EMPTY_FILE, "empty file: 0 bytes"))
            return
        if len(data) > self._max_bytes:
            self._too_large.inc()
            yield dead(DeadLetter.of(item, "read", DeadLetterKind.FILE_TOO_LARGE, f"file too large: more than {self._max_bytes} bytes"))
            return
        self._ok.inc()
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
    error.
    """

    def __init__(self) -> None:
        self._samples = counter("read_wds", "samples")
        self._no_image = counter("read_wds", "no_image")
        self._duplicates = counter("read_wds", "duplicate")
        self._bad_json = counter("read_wds", "bad_json")
        self._bad_text = counter("read_wds", "bad_text")
        self._incomplete = counter("read_wds", "incomplete")
        self._tar_errors = counter("read_wds", "tar_error")
        self._tars = counter("read_wds", "tars")

    def process(self, url: str) -> Iterator[object]:
        self._tars.inc()
        emitted = 0
        seen: set[str] = set()
        current: Optional[_TarSample] = None
        try:
            with FileSystems.open(url, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                for name, data in iter_tar_members(f):
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
                        key=make_key("wds", current.key),
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
            yield dead(
                DeadLetter(
                    key=make_key("wds", _tar_stem(url), "tar_error"),
                    source="wds",
                    stage="read",
                    kind=DeadLetterKind.UNREADABLE_TAR,
                    reason=(
                        f"unreadable tar: {url} failed after {emitted} complete sample{'' if emitted == 1 else 's'} "
                        f"({type(exc).__name__}: {exc})"
                    ),
                    path=url,
                )
            )
            return
        if current is not None:
            yield from self._emit(url, current, seen)

    def _emit(self, url: str, sample: _TarSample, seen: set[str]) -> Iterator[object]:
        key = make_key("wds", sample.key)
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

        extra: Optional[dict] = None
        if WDS_JSON_EXT in sample.members:
            try:
                parsed = json.loads(sample.members[WDS_JSON_EXT].decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                parsed = None
            if isinstance(parsed, dict):
                extra = parsed
            else:
                self._bad_json.inc()

        self._samples.inc()
        yield Sample(
            key=key,
            source="wds",
            domain=GENERAL,
            path=path,
            raw=image,
            text=text,
            extra_json=extra,
        )
