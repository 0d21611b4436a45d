"""`prep diff A B`: what changed between two outputs of `prep run`.

Samples are matched by key (stable from ingest to shard). For every field of a sample's JSON,
its caption (`KEY.txt`) and every other member (compared by sha256: image, mask, embedding,
refs, face descriptor), the number of samples whose value changed, with examples side by side;
the samples added and removed; the samples per split and domain on each side. Two identical
outputs say so in one line. Reads what a consumer reads (the shards), local or gs://; keeps one
small record per sample (its JSON, caption and member digests).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from prep.schemas import contract, output

EXAMPLES = 3


@dataclass
class SampleRecord:
    split: str
    domain: str
    fields: dict[str, Any]  # "json.<name>" -> value, "txt" -> caption, "<member>" -> sha256


@dataclass
class DiffReport:
    a: str
    b: str
    counts: dict[str, dict[str, int]]  # "<split>/<domain>" -> {"a": n, "b": n}
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: dict[str, int] = field(default_factory=dict)  # field -> samples whose value changed
    examples: dict[str, list[dict]] = field(default_factory=dict)  # field -> [{"key", "a", "b"}]
    moved: int = 0  # samples whose split or domain changed
    changed_samples: int = 0  # samples in both with any field or member changed

    @property
    def identical(self) -> bool:
        return not (self.added or self.removed or self.changed or self.moved)

    def to_json(self) -> dict:
        return {"a": self.a, "b": self.b, "identical": self.identical, "counts": self.counts,
                "added": self.added, "removed": self.removed, "changed_samples": self.changed_samples,
                "changed": self.changed, "moved": self.moved,
                "examples": self.examples}


def read_samples(out_dir: str, problems: Optional[list[str]] = None) -> dict[str, SampleRecord]:
    """key -> its record, over every shard of `out_dir`."""
    found: dict[str, SampleRecord] = {}
    shards = output.list_shards(out_dir)
    if not shards and output.read_manifest(out_dir) is None:
        raise FileNotFoundError(f"{out_dir}: no {contract.MANIFEST} and no shards: not an output of `prep run`")
    for shard in shards:
        try:
            with output.open_read(shard.path) as f:
                for raw in contract.iter_samples(f):
                    fields: dict[str, Any] = {}
                    for ext, data in raw.items():
                        if ext == "__key__":
                            continue
                        if ext == contract.EXT_JSON:
                            for name, value in json.loads(data.decode("utf-8")).items():
                                fields[f"json.{name}"] = value
                        elif ext == contract.EXT_TEXT:
                            fields[ext] = data.decode("utf-8")
                        else:
                            fields[ext] = hashlib.sha256(data).hexdigest()
                    found[raw["__key__"]] = SampleRecord(shard.split, shard.domain, fields)
        except output.READ_ERRORS as exc:
            if problems is None:
                raise
            problems.append(f"{shard.rel}: unreadable ({type(exc).__name__}: {exc})")
    return found


def _shown(value: Any) -> Any:
    if isinstance(value, str) and len(value) > 200:
        return value[:200] + "..."
    return value


def diff_outputs(a: str, b: str, *, examples: int = EXAMPLES) -> DiffReport:
    left, right = read_samples(a), read_samples(b)
    counts: dict[str, dict[str, int]] = {}
    for side, samples in (("a", left), ("b", right)):
        for record in samples.values():
            folder = contract.shard_folder(record.split, record.domain)
            counts.setdefault(folder, {"a": 0, "b": 0})[side] += 1
    report = DiffReport(a=a, b=b, counts=dict(sorted(counts.items())),
                        added=sorted(set(right) - set(left)), removed=sorted(set(left) - set(right)))
    for key in sorted(set(left) & set(right)):
        before, after = left[key], right[key]
        if (before.split, before.domain) != (after.split, after.domain):
            report.moved += 1
        if before.fields != after.fields:
            report.changed_samples += 1
        for name in sorted(set(before.fields) | set(after.fields)):
            old, new = before.fields.get(name), after.fields.get(name)
            if old == new:
                continue
            report.changed[name] = report.changed.get(name, 0) + 1
            shown = report.examples.setdefault(name, [])
            if len(shown) < examples:
                shown.append({"key": key, "a": _shown(old), "b": _shown(new)})
    report.changed = dict(sorted(report.changed.items(), key=lambda kv: (-kv[1], kv[0])))
    return report


def format_diff(report: DiffReport) -> str:
    total_a = sum(c["a"] for c in report.counts.values())
    if report.identical:
        return f"{report.a} and {report.b} are identical: {total_a} samples, every field and member the same"
    lines = [f"{report.a} -> {report.b}: {len(report.added)} added, {len(report.removed)} removed, "
             f"{report.changed_samples} changed; samples per folder:"]
    for folder, c in report.counts.items():
        lines.append(f"  {folder:<16} {c['a']:>8} -> {c['b']:<8}" + ("" if c["a"] == c["b"] else f" ({c['b'] - c['a']:+d})"))
    if report.moved:
        lines.append(f"  {report.moved} sample(s) moved to another split or domain")
    for what, keys in (("added", report.added), ("removed", report.removed)):
        if keys:
            lines.append(f"{what}: " + ", ".join(keys[:5]) + (f" ... ({len(keys)} in all)" if len(keys) > 5 else ""))
    for name, n in report.changed.items():
        label = name.removeprefix("json.") if name.startswith("json.") else f"{name} (bytes)" if name != "txt" \
            else "caption (txt)"
        lines.append(f"changed {label}: {n} sample(s)")
        for example in report.examples.get(name, []):
            if name.startswith("json.") or name == "txt":
                lines.append(f"    {example['key']}: {json.dumps(example['a'])} -> {json.dumps(example['b'])}")
            else:
                lines.append(f"    {example['key']}: sha256 {str(example['a'])[:12]} -> {str(example['b'])[:12]}")
    return "\n".join(lines)
