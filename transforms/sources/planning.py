"""Planning on the launcher: input specs, and the plain functions that list each source kind
(`plan_celeba`, `plan_folder`, `plan_wds`) into `SourceItem`s, planning dead letters and a
`SourceReport` for the manifest."""

from __future__ import annotations

from collections import Counter

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

SOURCE_KINDS = ("celeba", "folder", "wds")


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
        items.append(SourceItem(key=key, source="folder", domain=SPECIFIC, path=path, identity=identity,
                                origin={"path": f"{identity}/{name}"}))
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
