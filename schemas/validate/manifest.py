"""The manifest, the dataset card, the manifest's shard entries and the final reconciliation
of counts (inputs == specific + general + dead-lettered)."""

from __future__ import annotations

import json
from typing import Any, Optional

from apache_beam.io.filesystems import FileSystems

from prep.schemas.contract import (
    DATASET_CARD,
    MANIFEST,
    MANIFEST_COUNTS,
    MANIFEST_FIELDS,
    MANIFEST_SHARD_FIELDS,
    SCHEMA_VERSION,
    SPLITS,
    TRAIN,
    is_shard_name,
    shard_folder,
    shard_name,
)
from prep.schemas.records import (
    DOMAINS,
    GENERAL,
    SPECIFIC,
)
from prep.schemas.validate.base import (
    _SHA256,
    _is_int,
    _ManifestInfo,
)


class _ManifestChecks:
    """Mixed into the validator (validate/__init__.py)."""

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
