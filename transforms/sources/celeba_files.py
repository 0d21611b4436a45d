"""CelebA's annotation files (identities, attributes, eval partition): parsed with every quirk
reported as a warning, never guessed away silently."""

from __future__ import annotations

from collections import Counter
from typing import Callable, Optional

from prep.transforms.sources.files import (
    _UINT,
    FOLDER_IMAGE_EXTS,
    PathOrFile,
    _examples,
    _ext,
    _read_lines,
    _stem,
)

CELEBA_IMAGE_DIR = "img_align_celeba"
CELEBA_IDENTITY = "identity_CelebA"
CELEBA_ATTRIBUTES = "list_attr_celeba"
CELEBA_PARTITION = "list_eval_partition"
CELEBA_IMAGE_EXTS = frozenset({"jpg", "jpeg", "png"})
CELEBA_SPLITS = {"0": "train", "1": "val", "2": "test"}


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
