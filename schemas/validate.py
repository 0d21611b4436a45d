"""Check an output directory against the shard contract, version 1 (see contract.py).

`validate_output(out_dir)` reads what a consumer reads -- the manifest, each domain's
sizes.json, every member of every shard, the dead letters -- and collects every problem it
finds rather than stopping at the first, so one run tells a user everything that is wrong.
A corrupt shard is reported and the run goes on with the next one.

All file access goes through Beam's `FileSystems`, so a gs:// output validates exactly like a
local one.

Memory stays bounded on large outputs (hundreds of thousands of samples): shards are
streamed one sample at a time, and no array outlives its sample. The ref checks need every
specific embedding, so instead of keeping the arrays the validator keeps, per specific key,
only its identity and a 20-byte digest of its embedding (`_KeyInfo`), plus the digests of
each refs row; references are resolved once the last shard has been read.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Iterator, Optional

import numpy as np
from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems
from PIL import Image

from prep.schemas.contract import (
    DATASET_CARD,
    DEAD_LETTER_DIR,
    DEAD_LETTER_SUFFIX,
    DEAD_LETTER_FIELDS,
    EXT_EMB,
    EXT_FACE,
    EXT_IMAGE,
    EXT_JSON,
    EXT_MASK,
    EXT_REFS,
    EXT_TEXT,
    JSON_ADDED_FIELDS,
    JSON_FIELDS,
    MANIFEST,
    MANIFEST_COUNTS,
    MANIFEST_FIELDS,
    MANIFEST_SHARD_FIELDS,
    OPTIONAL,
    REQUIRED,
    SCHEMA_VERSION,
    SIZES,
    SPLITS,
    TRAIN,
    is_shard_name,
    iter_tar_members,
    load_npy,
    shard_folder,
    shard_name,
    split_domains,
    split_member,
)
from prep.schemas import output
from prep.schemas.identity_checks import identity_problems, ref_problems
from prep.schemas.output import READ_ERRORS
from prep.schemas.records import DOMAINS, GENERAL, SPECIFIC, DeadLetterKind, is_valid_key

# Known member extensions, longest first, so that 'a.b.emb.npy' splits as ('a.b', 'emb.npy')
# and the dotted key is reported as such instead of as an odd extension.
_KNOWN_EXTS = tuple(sorted({e for exts in (*REQUIRED.values(), *OPTIONAL.values()) for e in exts}, key=len, reverse=True))
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_READ_CHUNK = 1 << 20
# Reports a problem with one sample: (member extension or None for the whole sample, message).
_Bad = Callable[[Optional[str], str], None]
_MAX_EXAMPLES = 5
_DIGEST_SIZE = hashlib.sha1().digest_size  # of one embedding digest, see _emb_digest


@dataclass
class ValidationReport:
    """The outcome of `validate_output`.

    problems: one precise, human-readable message per problem, naming the file and key.
    counts: what was found: samples per domain ("specific", "general"), "dead_lettered"
      (dead-letter lines) and "shards" (tar files read).
    """

    problems: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    out_dir: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems


def validate_output(out_dir: str, *, tolerance: float = 1e-4) -> ValidationReport:
    """Check `out_dir` (local path or any FileSystems URL) against shard contract v1.

    `tolerance` is the allowed deviation of a specific embedding's L2 norm from 1.
    Every problem found is reported; nothing is raised for bad data.
    """
    return _Validator(out_dir, tolerance).run()


def format_report(report: ValidationReport) -> str:
    """A one-line summary, then one line per problem."""
    c = report.counts
    found = (
        f"{c.get(SPECIFIC, 0)} specific, {c.get(GENERAL, 0)} general, "
        f"{c.get('dead_lettered', 0)} dead-lettered in {c.get('shards', 0)} shards"
    )
    where = f"{report.out_dir}: " if report.out_dir else ""
    if report.ok:
        return f"{where}OK: contract v{SCHEMA_VERSION}, {found}"
    n = len(report.problems)
    lines = [f"{where}INVALID: {n} problem{'s' if n != 1 else ''}; found {found}"]
    lines.extend(f"  - {p}" for p in report.problems)
    return "\n".join(lines)


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


class _Validator:
    """One validation run: reads everything once and accumulates problems and counts."""

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

    # ------------------------------------------------------------------ the run

    def run(self) -> ValidationReport:
        self.check_temp_files("", list(self.list_files()))
        manifest = self.check_manifest()
        self.check_card(manifest)
        for folder in self.folders(manifest):
            self.check_domain(folder, manifest)
        self.check_refs()
        self.check_dead_letters()
        self.reconcile(manifest)
        if not self.found[SPECIFIC] and not self.found[GENERAL]:
            why = (f"all {self.dead_lettered} input(s) were dead-lettered" if self.dead_lettered
                   else "and no input at all was read")
            self.problem(f"no sample in any shard ({why}): there is nothing to train on")
        counts = {
            SPECIFIC: self.found[SPECIFIC],
            GENERAL: self.found[GENERAL],
            "dead_lettered": self.dead_lettered,
            "shards": self.shards_read,
        }
        return ValidationReport(problems=self.problems, counts=counts, out_dir=self.out_dir)

    def folders(self, manifest: Optional[_ManifestInfo]) -> list[str]:
        """Shard folders: OUT/<domain> (train) and OUT/<split>/<domain> for other splits."""
        found = set(DOMAINS) | set(manifest.shards if manifest is not None else ())
        for split, domain in split_domains():
            if split != TRAIN and output.folder_files(self.out_dir, split, domain):
                found.add(shard_folder(split, domain))
        return sorted(found, key=lambda f: (f.count("/"), f))

    # ------------------------------------------------------------------ manifest

    def check_manifest(self) -> Optional[_ManifestInfo]:
        """Check OUT/manifest.json; return its usable parts, or None if it is unusable."""
        data = self.read_json(MANIFEST, self.path(MANIFEST))
        if data is None:
            return None
        if not isinstance(data, dict):
            self.problem(f"{MANIFEST}: top level is {type(data).__name__}, not an object")
            return None
        info = _ManifestInfo(shards={d: {} for d in DOMAINS})
        missing = [f for f in MANIFEST_FIELDS if f not in data]
        if missing:
            self.problem(f"{MANIFEST}: missing field(s) {', '.join(missing)}")
        version = data.get("schema_version")
        if "schema_version" in data and not (_is_int(version) and version == SCHEMA_VERSION):
            self.problem(f"{MANIFEST}: schema_version is {version!r}, expected {SCHEMA_VERSION}")

        counts = data.get("counts")
        if "counts" in data:
            if not isinstance(counts, dict):
                self.problem(f"{MANIFEST}: counts is {type(counts).__name__}, not an object")
            else:
                for name in MANIFEST_COUNTS:
                    value = counts.get(name)
                    if not _is_int(value) or value < 0:
                        self.problem(f"{MANIFEST}: counts.{name} is {value!r}, not a non-negative int")
                    else:
                        info.counts[name] = value

        identity = data.get("identity")
        if isinstance(identity, dict) and isinstance(identity.get("thresholds"), dict):
            for model, values in identity["thresholds"].items():
                if isinstance(values, dict) and isinstance(values.get("same"), (int, float)):
                    self.identity_thresholds[model] = float(values["same"])

        shards = data.get("shards")
        if "shards" in data and not isinstance(shards, list):
            self.problem(f"{MANIFEST}: shards is {type(shards).__name__}, not a list")
        elif isinstance(shards, list):
            for i, entry in enumerate(shards):
                self.check_manifest_shard(i, entry, info)
            info.entries = [e for e in shards if isinstance(e, dict) and e.get("domain") in DOMAINS]
        return info

    def check_card(self, manifest: Optional[_ManifestInfo]) -> None:
        """OUT/README.md, when prep wrote it (older outputs have none; a user's own is not
        checked): its `configs` must name exactly the folders the manifest lists, per split."""
        import yaml

        from prep.schemas.card import card_configs, is_prep_card, read_card_configs

        path = self.path(DATASET_CARD)
        if manifest is None or not FileSystems.exists(path) or not is_prep_card(path):
            return
        try:
            got = read_card_configs(self.read_bytes(path).decode("utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            self.problem(f"{DATASET_CARD}: unreadable YAML header ({type(exc).__name__})")
            return
        expected = card_configs(manifest.entries)
        if got != expected:
            self.problem(
                f"{DATASET_CARD}: configs {json.dumps(got)} do not match the manifest's shard folders "
                f"{json.dumps(expected)}"
            )

    def check_manifest_shard(self, index: int, entry: Any, info: _ManifestInfo) -> None:
        where = f"{MANIFEST}: shards[{index}]"
        if not isinstance(entry, dict):
            self.problem(f"{where} is {type(entry).__name__}, not an object")
            return
        missing = [f for f in MANIFEST_SHARD_FIELDS if f not in entry]
        if missing:
            self.problem(f"{where}: missing field(s) {', '.join(missing)}")
        domain, name = entry.get("domain"), entry.get("name")
        if domain not in DOMAINS:
            self.problem(f"{where}: domain {domain!r} is not one of {', '.join(DOMAINS)}")
            return
        split = entry.get("split", TRAIN)
        if split not in SPLITS:
            self.problem(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
            return
        domain = shard_folder(split, domain)  # the shard's folder
        info.shards.setdefault(domain, {})
        if not isinstance(name, str) or not is_shard_name(name):
            self.problem(f"{where}: name {name!r} is not a shard name like {shard_name(0)}")
            return
        where = f"{MANIFEST}: shard {domain}/{name}"
        if name in info.shards[domain]:
            self.problem(f"{where} is listed more than once")
            return
        valid: dict[str, Any] = {}
        for fld in ("count", "bytes"):
            value = entry.get(fld)
            if fld in entry and (not _is_int(value) or value < 0):
                self.problem(f"{where}: {fld} is {value!r}, not a non-negative int")
            elif fld in entry:
                valid[fld] = value
        sha = entry.get("sha256")
        if "sha256" in entry and not (isinstance(sha, str) and _SHA256.match(sha)):
            self.problem(f"{where}: sha256 {sha!r} is not 64 lowercase hex digits")
        elif "sha256" in entry:
            valid["sha256"] = sha
        info.shards[domain][name] = valid

    # ------------------------------------------------------------------ domain folders

    def check_domain(self, domain: str, manifest: Optional[_ManifestInfo]) -> None:
        """`domain` is the folder: "specific", "general", or "<split>/<domain>" for val/test."""
        files = self.list_files(*domain.split("/"))
        listed = manifest.shards.get(domain, {}) if manifest is not None else {}
        if not files and not listed:
            return  # this domain was not produced
        self.check_temp_files(domain, list(files))
        on_disk = sorted(n for n in files if n.endswith(".tar") and not _is_temp_name(n))

        sizes = self.check_sizes(domain, files, manifest)
        for name in sorted(listed):
            if name not in files:
                self.problem(f"{domain}/{name}: listed in {MANIFEST} but missing")
        for name in on_disk:
            if manifest is not None and name not in listed:
                self.problem(f"{domain}/{name}: not listed in {MANIFEST}")
        bad_names = [n for n in on_disk if not is_shard_name(n)]
        for name in bad_names:
            self.problem(f"{domain}/{name}: not a shard name like {shard_name(0)}")
        good = [n for n in on_disk if is_shard_name(n)]
        expected = [shard_name(i) for i in range(len(good))]
        if good != expected:
            gaps = sorted(set(expected) - set(good))
            self.problem(
                f"{domain}: shards are not numbered contiguously from {shard_name(0)} "
                f"(missing {_examples(gaps)})"
            )

        for name in on_disk:
            self.check_shard(domain, name, files[name], listed.get(name), sizes)

    def check_sizes(
        self, domain: str, files: dict[str, str], manifest: Optional[_ManifestInfo]
    ) -> Optional[dict[str, int]]:
        """Check OUT/<domain>/sizes.json; return it if it is a {name: int} object."""
        rel = f"{domain}/{SIZES}"
        if SIZES not in files:
            self.problem(f"{rel}: missing")
            return None
        data = self.read_json(rel, files[SIZES])
        if data is None:
            return None
        if not isinstance(data, dict) or not all(_is_int(v) for v in data.values()):
            self.problem(f"{rel}: not an object of shard name -> int count")
            return None
        if manifest is not None:
            listed = manifest.shards.get(domain, {})
            for name in sorted(set(data) | set(listed)):
                if name not in listed:
                    self.problem(f"{rel}: {name} is not among the {domain} shards in {MANIFEST}")
                elif name not in data:
                    self.problem(f"{rel}: {name} (in {MANIFEST}) is missing")
                elif "count" in listed[name] and data[name] != listed[name]["count"]:
                    self.problem(
                        f"{rel}: {name} has count {data[name]}, {MANIFEST} says {listed[name]['count']}"
                    )
        return data

    # ------------------------------------------------------------------ shards

    def check_shard(
        self,
        domain: str,
        name: str,
        path: str,
        listed: Optional[dict[str, Any]],
        sizes: Optional[dict[str, int]],
    ) -> None:
        """Stream one shard: hash it, and check every sample as soon as it is complete."""
        loc = f"{domain}/{name}"
        folder, domain = domain, domain.rsplit("/", 1)[-1]
        self.shards_read += 1
        samples = 0
        done: set[str] = set()  # keys whose sample is complete in this shard
        key: Optional[str] = None
        members: dict[str, bytes] = {}
        try:
            with output.open_read(path) as raw:
                reader = _HashingReader(raw)
                for member, data in self.read_members(loc, reader):
                    if "/" in member:
                        self.problem(f"{loc}: member {member!r} has a directory component")
                    mkey, ext = _split_member(member)
                    if mkey != key:
                        if key is not None:
                            self.check_sample(domain, loc, key, members)
                            samples += 1
                            done.add(key)
                        if mkey in done:
                            self.problem(f"{loc}: {mkey}: members of this sample are not consecutive")
                        key, members = mkey, {}
                    if ext in members:
                        self.problem(f"{loc}: {mkey}.{ext}: duplicate member")
                        continue
                    members[ext] = data
                if key is not None and not reader.broken:
                    self.check_sample(domain, loc, key, members)
                    samples += 1
                reader.drain()
        except OSError as e:
            self.problem(f"{loc}: cannot be read ({e})")
            return
        self.found[domain] += samples

        if listed is not None:
            if "sha256" in listed and reader.sha256.hexdigest() != listed["sha256"]:
                self.problem(
                    f"{loc}: sha256 is {reader.sha256.hexdigest()}, {MANIFEST} says {listed['sha256']}"
                )
            if "bytes" in listed and reader.nbytes != listed["bytes"]:
                self.problem(f"{loc}: {reader.nbytes} bytes, {MANIFEST} says {listed['bytes']}")
            if "count" in listed and samples != listed["count"]:
                self.problem(f"{loc}: {samples} samples, {MANIFEST} says {listed['count']}")
        if sizes is not None and name in sizes and samples != sizes[name]:
            self.problem(f"{loc}: {samples} samples, {folder}/{SIZES} says {sizes[name]}")
        elif sizes is not None and name not in sizes:
            self.problem(f"{loc}: not listed in {folder}/{SIZES}")

    def read_members(self, loc: str, reader: _HashingReader) -> Iterator[tuple[str, bytes]]:
        """The shard's members until the end or the first read error (reported, not raised).

        Only reading the stream is guarded, so that a bug in a check cannot pass for a
        corrupt shard. A sample cut short by the error is not checked.
        """
        stream = iter_tar_members(reader)
        while True:
            try:
                member, data = next(stream)
            except StopIteration:
                return
            except READ_ERRORS as e:
                reader.broken = True
                self.unreadable.append(loc)
                self.problem(
                    f"{loc}: corrupt or truncated tar ({type(e).__name__}: {e}); "
                    "the rest of this shard is not checked"
                )
                return
            yield member, data

    # ------------------------------------------------------------------ samples

    def check_sample(self, domain: str, loc: str, key: str, members: dict[str, bytes]) -> None:
        """Check one complete sample; remember what the cross-sample checks need."""

        def bad(ext: Optional[str], message: str) -> None:
            self.problem(f"{loc}: {key}.{ext}: {message}" if ext else f"{loc}: {key}: {message}")

        if not is_valid_key(key):
            bad(None, f"invalid key {key!r} (only [A-Za-z0-9_-], no dots)")
        # A repeat inside one shard was already reported as non-consecutive members.
        repeat = key in self.where
        first = self.where.setdefault(key, loc)
        if first != loc:
            bad(None, f"duplicate key, also in {first}")

        required = REQUIRED[domain]
        missing = sorted(required - members.keys())
        extra = sorted(members.keys() - required - OPTIONAL[domain])
        if missing:
            bad(None, f"missing member(s) {', '.join(f'{key}.{e}' for e in missing)}")
        if extra:
            bad(None, f"unexpected member(s) for {domain}: {', '.join(f'{key}.{e}' for e in extra)}")

        size = self.check_image(members.get(EXT_IMAGE), bad)
        text = self.check_text(members.get(EXT_TEXT), bad)
        meta = self.check_json(domain, key, members.get(EXT_JSON), text, size, bad)
        emb = self.check_emb(domain, members.get(EXT_EMB), bad)
        ref_keys = meta.get("ref_keys") if meta is not None else None
        if not (isinstance(ref_keys, list) and all(isinstance(r, str) for r in ref_keys)):
            ref_keys = None
        rows = self.check_refs_array(members.get(EXT_REFS), ref_keys, emb, bad)
        if domain == SPECIFIC and EXT_MASK in members:
            self.check_mask(members[EXT_MASK], size, bad)
        if EXT_FACE in members:
            face = self.load_array(EXT_FACE, members[EXT_FACE], bad)
            if face is not None and (face.dtype != np.float32 or face.ndim != 1 or not np.all(np.isfinite(face))):
                bad(EXT_FACE, f"is {face.dtype} {face.shape}, expected finite float32 [F]")
            if meta is not None and meta.get("face_box") is None:
                bad(EXT_FACE, "present, but the sample has no chosen face (face_box is null)")

        # The identity is only compared with the refs' when it is itself valid.
        identity = meta.get("identity") if meta is not None else None
        identity_known = meta is not None and (
            isinstance(identity, str) if domain == SPECIFIC else "identity" in meta and identity is None
        )
        identity = identity if isinstance(identity, str) else None
        if domain == SPECIFIC and not repeat:
            digest = _emb_digest(emb) if emb is not None and emb.dtype == np.float32 else None
            status = meta.get("identity_status") if meta is not None else None
            self.specific[key] = _KeyInfo(identity=identity, emb_digest=digest, identity_status=status)
        if ref_keys:
            self.pending_refs.append(
                _PendingRefs(
                    where=f"{loc}: {key}.{EXT_REFS}",
                    key=key,
                    identity=identity,
                    identity_known=identity_known,
                    ref_keys=ref_keys,
                    row_digests=rows,
                    identity_status=meta.get("identity_status") if meta is not None else None,
                )
            )

    def check_image(self, data: Optional[bytes], bad: _Bad) -> Optional[tuple[int, int]]:
        """The JPEG must decode fully to RGB; return its (width, height)."""
        if data is None:
            return None
        try:
            img = _decode_image(data)
        except Exception as e:  # PIL raises many types on malformed input; all mean "bad image"
            bad(EXT_IMAGE, f"does not decode ({type(e).__name__}: {e})")
            return None
        if img.format != "JPEG":
            bad(EXT_IMAGE, f"is {img.format}, not JPEG")
        if img.mode != "RGB":
            bad(EXT_IMAGE, f"decodes to mode {img.mode}, not RGB")
        return img.size

    def check_text(self, data: Optional[bytes], bad: _Bad) -> Optional[str]:
        if data is None:
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            bad(EXT_TEXT, f"not UTF-8 ({e})")
            return None

    def check_json(
        self,
        domain: str,
        key: str,
        data: Optional[bytes],
        text: Optional[str],
        size: Optional[tuple[int, int]],
        bad: _Bad,
    ) -> Optional[dict]:
        """Check KEY.json field by field; return it if it is an object."""
        if data is None:
            return None
        try:
            meta = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            bad(EXT_JSON, f"not valid JSON ({e})")
            return None
        if not isinstance(meta, dict):
            bad(EXT_JSON, f"top level is {type(meta).__name__}, not an object")
            return None

        missing = [f for f in JSON_FIELDS if f not in meta]
        extra = sorted(set(meta) - set(JSON_FIELDS) - set(JSON_ADDED_FIELDS))
        if missing:
            bad(EXT_JSON, f"missing field(s) {', '.join(missing)}")
        if extra:
            bad(EXT_JSON, f"unexpected field(s) {', '.join(extra)}")

        def field_problem(name: str, expected: str) -> None:
            bad(EXT_JSON, f"{name} is {meta[name]!r}, expected {expected}")

        if "key" in meta and meta["key"] != key:
            field_problem("key", repr(key))
        if "schema_version" in meta and not (
            _is_int(meta["schema_version"]) and meta["schema_version"] == SCHEMA_VERSION
        ):
            field_problem("schema_version", str(SCHEMA_VERSION))
        if "domain" in meta and meta["domain"] != domain:
            field_problem("domain", f"{domain!r} (the shard's folder)")
        if "source" in meta and not (isinstance(meta["source"], str) and meta["source"]):
            field_problem("source", "a non-empty string")
        if "identity" in meta:
            identity = meta["identity"]
            if domain == SPECIFIC and not (isinstance(identity, str) and identity):
                field_problem("identity", "a non-empty string for a specific sample")
            elif domain == GENERAL and identity is not None:
                field_problem("identity", "null for a general sample")
        if "attributes" in meta:
            attrs = meta["attributes"]
            if attrs is not None and not (
                isinstance(attrs, dict) and all(isinstance(v, bool) for v in attrs.values())
            ):
                field_problem("attributes", "null or an object of name -> bool")
        for name in ("caption_vlm", "caption_attributes"):
            if name in meta and meta[name] is not None and not isinstance(meta[name], str):
                field_problem(name, "a string or null")
        if "caption" in meta:
            if not isinstance(meta["caption"], str):
                field_problem("caption", "a string")
            elif text is not None and meta["caption"] != text:
                bad(EXT_JSON, f"caption {meta['caption']!r} differs from {key}.{EXT_TEXT} {text!r}")
        for name, index in (("width", 0), ("height", 1)):
            if name not in meta:
                continue
            if not (_is_int(meta[name]) and meta[name] > 0):
                field_problem(name, "a positive int")
            elif size is not None and meta[name] != size[index]:
                field_problem(name, f"{size[index]} (the decoded {key}.{EXT_IMAGE})")
        if "ref_keys" in meta and not (
            isinstance(meta["ref_keys"], list) and all(isinstance(r, str) for r in meta["ref_keys"])
        ):
            field_problem("ref_keys", "a list of strings")
        elif domain == SPECIFIC and meta.get("identity_model") is not None:
            threshold = self.identity_thresholds.get(meta["identity_model"])
            for message in identity_problems(meta, threshold):
                bad(EXT_JSON, message)
        return meta

    def load_array(self, ext: str, data: bytes, bad: _Bad) -> Optional[np.ndarray]:
        try:
            return load_npy(data)
        except Exception as e:  # numpy raises several types on a malformed .npy; all mean "bad"
            bad(ext, f"does not load as .npy without pickle ({type(e).__name__}: {e})")
            return None

    def check_emb(self, domain: str, data: Optional[bytes], bad: _Bad) -> Optional[np.ndarray]:
        """float32 [D], D equal across samples; unit norm (specific) or all zeros (general).

        Returns the array if it is 1-D (so its D can check the refs), else None.
        """
        if data is None:
            return None
        emb = self.load_array(EXT_EMB, data, bad)
        if emb is None:
            return None
        if emb.dtype != np.float32:
            bad(EXT_EMB, f"dtype is {emb.dtype}, not float32")
        if emb.ndim != 1 or emb.shape[0] == 0:
            bad(EXT_EMB, f"shape is {emb.shape}, expected [D] with D > 0")
            return None
        if self.dim is None:
            self.dim = emb.shape[0]
        elif emb.shape[0] != self.dim:
            bad(EXT_EMB, f"dimension {emb.shape[0]}, the first embedding read has {self.dim}")
        values = emb.astype(np.float64)
        if not np.all(np.isfinite(values)):
            bad(EXT_EMB, "has non-finite values")
        elif domain == SPECIFIC:
            norm = float(np.linalg.norm(values))
            if abs(norm - 1.0) > self.tolerance:
                bad(EXT_EMB, f"norm is {norm:.6g}, not 1 (tolerance {self.tolerance:g})")
        elif np.any(values != 0):
            bad(EXT_EMB, "a general sample's embedding must be all zeros")
        return emb

    def check_refs_array(
        self,
        data: Optional[bytes],
        ref_keys: Optional[list[str]],
        emb: Optional[np.ndarray],
        bad: _Bad,
    ) -> Optional[bytes]:
        """float32 [len(ref_keys), D]; return the rows' digests, concatenated (None if unusable)."""
        if data is None:
            return None
        refs = self.load_array(EXT_REFS, data, bad)
        if refs is None:
            return None
        usable = True
        if refs.dtype != np.float32:
            bad(EXT_REFS, f"dtype is {refs.dtype}, not float32")
            usable = False
        if refs.ndim != 2:
            bad(EXT_REFS, f"shape is {refs.shape}, expected [K, D]")
            return None
        if ref_keys is not None and refs.shape[0] != len(ref_keys):
            bad(EXT_REFS, f"has {refs.shape[0]} rows but ref_keys has {len(ref_keys)} entries")
            usable = False
        if emb is not None and refs.shape[1] != emb.shape[0]:
            bad(EXT_REFS, f"rows have dimension {refs.shape[1]}, the embedding has {emb.shape[0]}")
            usable = False
        return b"".join(_emb_digest(row) for row in refs) if usable else None

    def check_mask(self, data: bytes, size: Optional[tuple[int, int]], bad: _Bad) -> None:
        """PNG, mode L, only 0 and 255, the image's size."""
        try:
            mask = _decode_image(data)
        except Exception as e:  # as in check_image
            bad(EXT_MASK, f"does not decode ({type(e).__name__}: {e})")
            return
        if mask.format != "PNG":
            bad(EXT_MASK, f"is {mask.format}, not PNG")
        if mask.mode != "L":
            bad(EXT_MASK, f"mode is {mask.mode}, not L (8-bit single channel)")
        else:
            values = np.unique(np.asarray(mask))
            others = values[(values != 0) & (values != 255)]
            if others.size:
                shown = _examples([str(v) for v in others])
                bad(EXT_MASK, f"has values other than 0 and 255 (e.g. {shown})")
        if size is not None and mask.size != size:
            (mw, mh), (w, h) = mask.size, size
            bad(EXT_MASK, f"size {mw}x{mh} differs from the image's {w}x{h}")

    # ------------------------------------------------------------------ cross-sample checks

    def check_refs(self) -> None:
        """Resolve every ref: a specific sample, not itself, same identity, row == its emb.

        A ref that is not found while some shard was unreadable may well be in the unread
        part; such refs are summed up in one line instead of one misleading line each.
        """
        unresolved = 0
        for pending in self.pending_refs:
            for i, ref in enumerate(pending.ref_keys):
                where = f"{pending.where}: ref_keys[{i}] {ref!r}"
                if ref == pending.key:
                    self.problem(f"{where} is the sample itself")
                    continue
                info = self.specific.get(ref)
                if info is None:
                    if ref in self.where:
                        self.problem(f"{where} is not a specific sample (it is in {self.where[ref]})")
                    elif self.unreadable:
                        unresolved += 1
                    else:
                        self.problem(f"{where} is not a sample in any shard")
                    continue
                if pending.identity_status is not None:
                    for message in ref_problems({"key": pending.key, "identity_status": pending.identity_status},
                                                {"key": ref, "identity_status": info.identity_status}):
                        self.problem(f"{where}: {message}")
                known = pending.identity_known and info.identity is not None
                if known and info.identity != pending.identity:
                    self.problem(
                        f"{where} has identity {info.identity!r}, this sample has {pending.identity!r}"
                    )
                rows = pending.row_digests
                row = rows[i * _DIGEST_SIZE : (i + 1) * _DIGEST_SIZE] if rows is not None else None
                if row is not None and info.emb_digest is not None and row != info.emb_digest:
                    self.problem(f"{pending.where}: row {i} differs from the embedding of {ref!r}")
        if unresolved:
            self.problem(
                f"{unresolved} ref(s) name keys not found in the readable shards "
                f"(unreadable: {_examples(self.unreadable)})"
            )

    def check_dead_letters(self) -> None:
        files = self.list_files(DEAD_LETTER_DIR)
        self.check_temp_files(DEAD_LETTER_DIR, list(files))
        for name in sorted(files):
            if not name.endswith(DEAD_LETTER_SUFFIX) or _is_temp_name(name):
                continue
            rel = f"{DEAD_LETTER_DIR}/{name}"
            try:
                for line in output.iter_dead_letter_lines(files[name], rel):
                    self.dead_lettered += 1
                    self.check_dead_letter(line)
            except OSError as e:
                self.problem(f"{rel}: cannot be read ({e})")

    def check_dead_letter(self, line: output.DeadLetterLine) -> None:
        where, letter = f"{line.rel}:{line.lineno}", line.letter
        if line.error is not None:
            self.problem(f"{where}: not valid JSON ({line.error})")
            return
        if not isinstance(letter, dict):
            self.problem(f"{where}: {type(letter).__name__}, not an object")
            return
        for name in DEAD_LETTER_FIELDS:
            value = letter.get(name)
            if not (isinstance(value, str) and value):
                self.problem(f"{where}: {name} is {value!r}, expected a non-empty string")
        key = letter.get("key")
        # A second input that produced an existing key is dead-lettered under that key, while
        # its twin (a different input) is in a shard: that is the one allowed overlap.
        try:
            kind = DeadLetterKind.of_letter(letter)
        except ValueError:
            self.problem(f"{where}: kind is {letter.get('kind')!r}, not one of {[k.value for k in DeadLetterKind]}")
            return
        if isinstance(key, str) and key in self.where and not kind.key_is_taken:
            self.problem(f"{where}: dead-lettered key {key!r} is also in shard {self.where[key]}")

    def reconcile(self, manifest: Optional[_ManifestInfo]) -> None:
        """The manifest's counts equal what was found, and inputs are all accounted for."""
        if manifest is None:
            return
        counts = manifest.counts
        found = {**self.found, "dead_lettered": self.dead_lettered}
        for name, value in found.items():
            if name in counts and counts[name] != value:
                self.problem(f"{MANIFEST}: counts.{name} is {counts[name]}, found {value}")
        parts = [SPECIFIC, GENERAL, "dead_lettered"]
        if "inputs" in counts and all(p in counts for p in parts):
            total = sum(counts[p] for p in parts)
            if counts["inputs"] != total:
                self.problem(
                    f"{MANIFEST}: counts.inputs is {counts['inputs']}, but specific + general + "
                    f"dead_lettered = {total}: inputs are unaccounted for"
                )
