"""Shard folders: each domain's sizes.json and shards (streamed, hashed and checked member by
member), and the dead-letter files."""

from __future__ import annotations

from typing import Any, Iterator, Optional

from prep.schemas import output
from prep.schemas.contract import (
    DEAD_LETTER_DIR,
    DEAD_LETTER_FIELDS,
    DEAD_LETTER_SUFFIX,
    MANIFEST,
    SIZES,
    is_shard_name,
    iter_tar_members,
    shard_name,
)
from prep.schemas.output import READ_ERRORS
from prep.schemas.records import (
    DeadLetterKind,
)
from prep.schemas.validate.base import (
    _examples,
    _HashingReader,
    _is_int,
    _is_temp_name,
    _ManifestInfo,
    _split_member,
)


class _FolderChecks:
    """Mixed into the validator (validate/__init__.py)."""

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
