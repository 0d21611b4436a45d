"""Counter the skew: per-sample sampling weights that balance chosen attributes.

`prep weights OUT --balance Male,Young` groups the specific samples of a split (train by
default) by their combination of the chosen attributes (labelled or predicted, as KEY.json has
them; a sample without the attribute is its own value, "?"), and gives each sample the inverse
of its group's size, normalised to mean 1 and capped at `--max-weight` (then normalised again,
until no weight is over the cap). So every combination weighs the same in a weighted epoch,
as far as the cap allows.

Written beside each shard as `NNNNNN_weights.parquet` (key, weight, group), and recorded in
the manifest under `weights` (the balance, the cap, the split, each group's samples and weight,
and each attribute's share before and after weighting). `prep train --weights` samples by them.
Rerunning replaces both.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from typing import Optional, Sequence

from prep.schemas import contract, output

MAX_WEIGHT = 10.0
UNKNOWN = "?"


def group_of(attributes: Optional[dict], balance: Sequence[str]) -> str:
    """'Male=1,Young=0' (a missing label: 'Male=?')."""
    values = attributes or {}
    return ",".join(f"{name}={UNKNOWN if values.get(name) is None else int(bool(values[name]))}" for name in balance)


def balanced_weights(groups: Sequence[str], max_weight: float = MAX_WEIGHT) -> list[float]:
    """One weight per sample: 1 / its group's size, normalised to mean 1, capped at max_weight
    (renormalised while any weight is over the cap)."""
    if not groups:
        return []
    if max_weight < 1:
        raise ValueError("--max-weight must be >= 1 (weights have mean 1)")
    sizes = Counter(groups)
    weights = [1.0 / sizes[g] for g in groups]
    for _ in range(100):
        mean = sum(weights) / len(weights)
        weights = [w / mean for w in weights]
        if max(weights) <= max_weight * (1 + 1e-12):
            break
        weights = [min(w, max_weight) for w in weights]
    return [round(w, 6) for w in weights]


def _specific_attributes(out_dir: str, split: str) -> list[tuple[output.Shard, list[tuple[str, Optional[dict]]]]]:
    """(shard, [(key, attributes)]) for each specific shard of the split, in name order."""
    found: dict[output.Shard, list[tuple[str, Optional[dict]]]] = {}
    for shard, raw in output.iter_folder_samples(out_dir, split, contract.SPECIFIC):
        found.setdefault(shard, []).append((raw["__key__"], json.loads(raw[contract.EXT_JSON].decode("utf-8")).get("attributes")))
    return list(found.items())


def write_weights(out_dir: str, balance: Sequence[str], *, max_weight: float = MAX_WEIGHT,
                  split: str = contract.TRAIN) -> dict:
    """Weights for OUT's specific samples of `split`; returns what the manifest records."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from prep.atomic import write_atomic, write_json

    manifest = output.read_manifest(out_dir)
    if manifest is None:
        raise FileNotFoundError(f"{out_dir}: no {contract.MANIFEST}: not a complete output of `prep run`")
    balance = [b.strip() for b in balance if b.strip()]
    if not balance:
        raise ValueError("--balance needs at least one attribute (e.g. --balance Male,Young)")
    shards = _specific_attributes(out_dir, split)
    samples = [(shard, key, attrs) for shard, rows in shards for key, attrs in rows]
    if not samples:
        raise ValueError(f"{out_dir}: no specific sample in the {split} split")
    known = {name for _, _, attrs in samples for name in (attrs or {})}
    unknown = [b for b in balance if b not in known]
    if unknown:
        raise ValueError(f"{out_dir}: no sample of the {split} split has the attribute(s) {', '.join(unknown)}"
                         + (f"; it has {', '.join(sorted(known)[:8])}, ..." if known else "; it has no attributes"))
    groups = [group_of(attrs, balance) for _, _, attrs in samples]
    weights = balanced_weights(groups, max_weight)
    by_key = {key: (w, g) for (_, key, _), w, g in zip(samples, weights, groups)}
    files = []
    for shard, rows in shards:
        keys = [key for key, _ in rows]
        table = pa.table({"key": pa.array(keys, pa.string()),
                          "weight": pa.array([by_key[k][0] for k in keys], pa.float64()),
                          "group": pa.array([by_key[k][1] for k in keys], pa.string())})
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        name = contract.weights_name(shard.name)
        write_atomic(output.join(out_dir, *shard.folder.split("/"), name), buffer.getvalue())
        files.append(f"{shard.folder}/{name}")
    sizes = Counter(groups)
    group_weight = dict(zip(groups, weights))  # (a group's samples all weigh the same)
    total = sum(weights)

    def share(name: str, weighted: bool) -> Optional[float]:
        labelled = [(w, attrs[name]) for (_, _, attrs), w in zip(samples, weights) if (attrs or {}).get(name) is not None]
        if not labelled:
            return None
        norm = sum(w if weighted else 1.0 for w, _ in labelled)
        return round(sum((w if weighted else 1.0) for w, v in labelled if v) / norm, 4)

    record = {
        "balance": list(balance), "split": split, "max_weight": max_weight, "samples": len(samples),
        "groups": {g: {"samples": n, "weight": group_weight[g]} for g, n in sorted(sizes.items())},
        "share": {name: {"before": share(name, False), "after": share(name, True)} for name in balance},
        "mean_weight": round(total / len(weights), 6), "files": files,
    }
    manifest["weights"] = record
    write_json(output.join(out_dir, contract.MANIFEST), manifest)
    return record


def format_weights(record: dict) -> str:
    lines = [f"weights for {record['samples']} {record['split']} sample(s), balancing {', '.join(record['balance'])} "
             f"(cap {record['max_weight']:g}):"]
    for group, g in record["groups"].items():
        lines.append(f"  {group:40s} {g['samples']:7d} samples  weight {g['weight']:.4f}")
    for name, s in record["share"].items():
        if s["before"] is not None:
            lines.append(f"  {name}: {s['before']:.1%} of samples -> {s['after']:.1%} of a weighted epoch")
    lines.append(f"written: {len(record['files'])} file(s) beside the shards; manifest.json records it")
    return "\n".join(lines)
