"""`--exclude FILE`: takedowns and opt-outs. FILE lists one value per line (blank lines and
lines starting with '#' are skipped): a URL, a sample key, a source's own key, or a sha256.

An input matches when any of these equals a listed value:
- its sample key (`wds_000000003`, `celeba_000001`, `lsun_<record key>`: the source's own key
  under its input's namespace; a bare img2dataset key such as `000000003` repeats across
  downloads, so it is not matched);
- its source metadata's `url` or `sha256` (img2dataset's KEY.json);
- the sha256 of the bytes read (64 hex digits, any case: what `sha256sum` prints for the file).

A match is dropped right after reading, before any stage sees it, as an `excluded` dead letter
(stage "ingest") whose reason names what matched and the value; so `inputs = written + dead
letters` still holds, and a rerun with a takedown list removes exactly the listed samples.
"""

from __future__ import annotations

import hashlib
import re
from typing import Iterator, Optional

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from prep.schemas.records import DeadLetter, DeadLetterKind, Sample
from prep.transforms.common import counter, dead

_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


def read_exclude_list(path: str) -> frozenset[str]:
    """The listed values (sha256 values lower-cased); OSError when the file cannot be read."""
    with FileSystems.open(path, compression_type=CompressionTypes.AUTO) as f:
        text = f.read().decode("utf-8-sig")
    values = set()
    for line in text.splitlines():
        value = line.strip()
        if value and not value.startswith("#"):
            values.add(value.lower() if _SHA256.match(value) else value)
    return frozenset(values)


def match(sample: Sample, listed: frozenset[str], with_digest: bool) -> Optional[tuple[str, str]]:
    """(what matched, the value) for a listed sample, else None."""
    meta = sample.source_meta or {}
    candidates = [("key", sample.key), ("url", meta.get("url")), ("sha256", meta.get("sha256"))]
    for what, value in candidates:
        if isinstance(value, str) and value:
            found = value.lower() if what == "sha256" else value
            if found in listed:
                return what, value
    if with_digest and sample.raw is not None:
        digest = hashlib.sha256(sample.raw).hexdigest()
        if digest in listed:
            return "sha256 of the bytes", digest
    return None


class ExcludeListed(beam.DoFn):
    """Samples whose key, URL or sha256 is on the list -> `excluded` dead letters."""

    def __init__(self, path: str):
        self._path = path
        self._listed: frozenset[str] = frozenset()
        self._digests = False
        self._excluded = counter("ingest", "excluded")

    def setup(self):
        self._listed = read_exclude_list(self._path)
        self._digests = any(_SHA256.match(v) for v in self._listed)

    def process(self, sample: Sample) -> Iterator[object]:
        found = match(sample, self._listed, self._digests)
        if found is None:
            yield sample
            return
        what, value = found
        self._excluded.inc()
        name = self._path.rstrip("/").rsplit("/", 1)[-1]
        yield dead(DeadLetter.of(sample, "ingest", DeadLetterKind.EXCLUDED,
                                 f"excluded: its {what} {value} is listed in {name}"))
