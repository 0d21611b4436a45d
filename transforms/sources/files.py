"""Small helpers over Beam's FileSystems shared by the source modules (paths, listing, lines)."""

from __future__ import annotations

import gzip
import os
import re
from typing import IO, Iterable, Optional, Union

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems


FOLDER_IMAGE_EXTS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif"})

# How many line numbers / names a warning quotes.
_EXAMPLES = 5
# How many missing-on-disk names a report keeps.
_MISSING_EXAMPLES = 10

_GLOB_CHARS = re.compile(r"[*?\[]")
_UINT = re.compile(r"[0-9]+")

PathOrFile = Union[str, "os.PathLike[str]", IO[bytes], IO[str]]


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
