"""Planning on the launcher: input specs, and the plain functions that list each source kind
(`plan_celeba`, `plan_folder`, `plan_wds`) into `SourceItem`s, planning dead letters and a
`SourceReport` for the manifest."""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

from apache_beam.io.filesystems import FileSystems
from braceexpand import braceexpand

from prep.schemas.records import SPECIFIC, DeadLetter, DeadLetterKind, SourceItem, SourceReport, make_key
from prep.transforms.sources.celeba_files import (
    CELEBA_ATTRIBUTES,
    CELEBA_IDENTITY,
    CELEBA_IMAGE_DIR,
    CELEBA_IMAGE_EXTS,
    CELEBA_PARTITION,
    _by_stem,
    _parse_identity,
    _parse_name_value_file,
    read_attribute_file,
    read_partition_file,
)
from prep.transforms.sources.files import (
    FOLDER_IMAGE_EXTS,
    _GLOB_CHARS,
    _MISSING_EXAMPLES,
    _basename,
    _examples,
    _ext,
    _match_paths,
    _stem,
    find_annotation,
    normalize_root,
)

SOURCE_KINDS = ("celeba", "folder", "wds", "lsun")

# A name given to an input (`NAME=KIND:LOCATION`) is its keys' namespace: letters, digits and
# '-', never '_' (the namespace is the text of a key before its first '_').
INPUT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,31}$")
_RESERVED_NAME = re.compile(rf"^(?:{'|'.join(SOURCE_KINDS)})[0-9]*$", re.IGNORECASE)


# --------------------------------------------------------------------------------------
# Input specs
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    """One --input: `[NAME=]KIND:LOCATION`."""

    kind: str
    location: str
    name: Optional[str] = None


def parse_input(spec: str) -> InputSpec:
    """Split `[NAME=]KIND:LOCATION`; the location may itself hold colons and '='.

    A name is recognised only before the kind, as `NAME=` with no ':' in NAME, so it can
    never be read out of a path or a gs:// URL (those come after `KIND:`).

    >>> parse_input("laion=wds:gs://bucket/{000..009}.tar")
    InputSpec(kind='wds', location='gs://bucket/{000..009}.tar', name='laion')
    >>> parse_input("folder:/data/a=b").name is None
    True
    """
    usage = (
        "expected [NAME=]KIND:LOCATION with KIND one of " + ", ".join(SOURCE_KINDS)
        + " (e.g. celeba:/data/celeba or laion=wds:/data/laion)"
    )
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"input spec {spec!r} has no ':'; {usage}")
    name: Optional[str] = None
    head, sep, rest = spec.partition("=")
    if sep and ":" not in head:
        name, spec_rest = head.strip(), rest
        if not INPUT_NAME.match(name):
            raise ValueError(
                f"input spec {spec!r}: name {name!r} must be 1-32 letters, digits or '-' (no '_'), "
                "starting with a letter or digit"
            )
        if _RESERVED_NAME.match(name):
            raise ValueError(
                f"input spec {spec!r}: name {name!r} is reserved (unnamed inputs' keys start with "
                f"{', '.join(SOURCE_KINDS)}, optionally followed by a number); choose another"
            )
    else:
        spec_rest = spec
    kind, location = spec_rest.split(":", 1)
    kind = kind.strip().lower()
    location = location.strip()
    if kind not in SOURCE_KINDS:
        raise ValueError(f"input spec {spec!r}: unknown kind {kind!r}; {usage}")
    if not location:
        raise ValueError(f"input spec {spec!r}: empty location; {usage}")
    return InputSpec(kind=kind, location=location, name=name)


def parse_input_spec(spec: str) -> tuple[str, str]:
    """Split `[NAME=]KIND:LOCATION` into (kind, location); see `parse_input`.

    >>> parse_input_spec("wds:gs://bucket/{000..009}.tar")
    ('wds', 'gs://bucket/{000..009}.tar')
    """
    parsed = parse_input(spec)
    return parsed.kind, parsed.location


def input_namespaces(specs: Sequence[str]) -> list[str]:
    """The key namespace of each --input, in order: every key an input produces starts with
    `<namespace>_`, so two inputs never produce the same key.

    A named input (`laion=wds:DIR`) has its name: its keys do not depend on the order of the
    inputs. An unnamed input has its kind, followed by its number among the unnamed inputs of
    that kind when it is not the first: `wds`, `wds1`, `wds2`, ... So the keys of a run with
    one input of each kind are the kind-prefixed keys prep always wrote (`celeba_000001`,
    `wds_000000000`), and the same inputs in the same order always give the same keys.
    Two different inputs with one name are refused (ValueError).

    >>> input_namespaces(["celeba:/c", "wds:/laion", "wds:/cc3m", "coyo=wds:/coyo", "folder:/f"])
    ['celeba', 'wds', 'wds1', 'coyo', 'folder']
    """
    parsed = [parse_input(s) for s in specs]
    unnamed: Counter = Counter()
    named: dict[str, str] = {}
    out: list[str] = []
    for spec, p in zip(specs, parsed):
        if p.name is not None:
            earlier = named.setdefault(p.name, spec.strip())
            if earlier != spec.strip():
                raise ValueError(f"input name {p.name!r} is given to two inputs ({earlier!r} and {spec.strip()!r})")
            out.append(p.name)
        else:
            n = unnamed[p.kind]
            unnamed[p.kind] += 1
            out.append(p.kind if n == 0 else f"{p.kind}{n}")
    return out


def check_location(kind: str, location: str) -> str:
    """The normalised location of a celeba/folder input; FileNotFoundError when it does not
    exist, ValueError when it is a file (a plain function: the preflight may call it)."""
    root = normalize_root(location)
    if not _exists(root):
        raise FileNotFoundError(f"{kind} source {root} does not exist")
    if not _is_folder(root):
        raise ValueError(f"{kind} source {root} is a file, not a folder")
    return root


def _exists(path: str) -> bool:
    if FileSystems.get_scheme(path) is None:
        return os.path.exists(path)
    return FileSystems.exists(path) or bool(_match_paths(FileSystems.join(path, "*")))


def _is_folder(path: str) -> bool:
    """A local directory, or (object stores have no folders) a prefix that has objects under it."""
    if FileSystems.get_scheme(path) is None:
        return os.path.isdir(path)
    return bool(_match_paths(FileSystems.join(path, "*")))


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


def plan_celeba(root: str, namespace: str = "celeba") -> tuple[list[SourceItem], list[DeadLetter], SourceReport]:
    """Plan a CelebA directory: one SourceItem per image on disk that has an identity.

    Layout: ROOT/img_align_celeba/*.{jpg,jpeg,png}, ROOT/identity_CelebA.txt[.gz] (required),
    ROOT/list_attr_celeba.txt[.gz] and ROOT/list_eval_partition.txt[.gz] (optional).
    Annotations are joined to images by file stem. An image with no identity line is a dead
    letter; annotation rows for images not on disk are only counted (report.missing_on_disk),
    so a partial download does not flood the dead-letter output.
    Keys are `<namespace>_<image stem>` (`input_namespaces`; alone, `celeba_000001`).
    """
    root = check_location("celeba", root)
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
        key = make_key(namespace, stem)
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
                origin={"path": f"{_basename(image_dir.rstrip('/'))}/{name}"},
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


def plan_folder(root: str, namespace: str = "folder") -> tuple[list[SourceItem], list[DeadLetter], SourceReport]:
    """Plan ROOT/<identity>/<image>: each immediate subfolder is one identity.

    Images are jpg/jpeg/png/webp/bmp/gif (any case); hidden files and folders are skipped,
    other files and files directly in ROOT are ignored with a warning. Deeper folders are
    not looked at. Two files giving the same key (a.jpg and a.png in one folder): the
    second in path order is a dead letter. Keys are `<namespace>_<identity>_<image stem>`
    (`input_namespaces`; alone, `folder_alice_001`).
    """
    root = check_location("folder", root)
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
        key = make_key(namespace, identity, _stem(name))
        if key in first_path_of_key:
            dead_letters.append(_duplicate_letter(key, "folder", path, first_path_of_key[key]))
            continue
        first_path_of_key[key] = path
        items.append(SourceItem(key=key, source="folder", domain=SPECIFIC, path=path, identity=identity,
                                origin={"path": f"{identity}/{name}"}))
    if not items:
        raise FileNotFoundError(
            f"folder source {root}: no images found in {FileSystems.join(root, '<identity>', '<image>')} "
            f"(extensions {', '.join(sorted(FOLDER_IMAGE_EXTS))}; found {len(not_images)} other file(s) in "
            f"identity folders, {len(in_root)} file(s) directly in {root}, {hidden} hidden)"
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
    """Expand a tar pattern into the sorted list of existing tar URLs.

    `wds:DIR` (a folder, as img2dataset writes one): the `*.tar` files directly in DIR, sorted;
    its other files (img2dataset's .parquet and _stats.json) and subfolders are not read, and
    the report says how many tars and other files it found. A folder without a tar raises
    FileNotFoundError. Otherwise a pattern: braces, then globs: `gs://b/{000000..000009}.tar`
    expands to ten URLs; a name with * ? [ is matched with FileSystems.match. Expanded names
    that do not exist are counted in the report (missing shards of an otherwise present
    dataset); nothing at all raises FileNotFoundError.
    """
    report = SourceReport(spec=f"wds:{pattern}", kind="wds")
    if not _GLOB_CHARS.search(pattern) and "{" not in pattern:
        root = normalize_root(pattern)
        if _is_folder(root):
            return _plan_wds_folder(root, report)
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
        if len(expanded) == 1 and not _GLOB_CHARS.search(expanded[0]):
            raise FileNotFoundError(f"wds source {pattern!r}: {expanded[0]} does not exist")
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


def _plan_wds_folder(root: str, report: SourceReport) -> tuple[list[str], SourceReport]:
    """`wds:DIR`: the sorted `*.tar` files directly in DIR."""
    entries = [p for p in _match_paths(FileSystems.join(root, "*")) if not _basename(p.rstrip("/")).startswith(".")]
    tars = sorted(p for p in entries if _ext(_basename(p)) == "tar" and not _is_local_dir(p))
    others = [p for p in entries if p not in set(tars)]
    if not tars:
        raise FileNotFoundError(
            f"wds source {root}: the folder holds no .tar file (found {len(others)} other entr"
            f"{'y' if len(others) == 1 else 'ies'}{', e.g. ' + _examples(_basename(p.rstrip('/')) for p in others) if others else ''}; "
            "subfolders are not searched)"
        )
    other_exts = Counter(_ext(_basename(p)) or "(none)" for p in others)
    report.items = len(tars)
    report.stats = {
        "folder": root,
        "tars": len(tars),
        "first_tar": _basename(tars[0]),
        "last_tar": _basename(tars[-1]),
        "other_files": len(others),
        "other_files_by_ext": dict(sorted(other_exts.items())),
    }
    return tars, report


def _is_local_dir(path: str) -> bool:
    return FileSystems.get_scheme(path) is None and os.path.isdir(path)
