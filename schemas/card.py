"""The dataset card, OUT/README.md: what the folder holds, for people and for Hugging Face.

Its YAML header lists one `datasets` config per domain ("specific", "general") with the splits
that domain has, each pointing at that folder's tars. `datasets` reads the header, so
`load_dataset(OUT, "specific")` on the folder (or `load_dataset("user/name", "specific")` on a
hub copy of it) gets the domains apart (their members differ: general samples have no mask)
and the splits right, with no `data_files` to spell out. The body says what a sample holds,
how many there are, and how to read them.

The card is a function of the manifest alone and names no local path (inputs and models are
given by kind and checksum), so it is byte-identical across reruns and folders, and safe to
publish beside the shards; the full provenance stays in manifest.json.
"""

from __future__ import annotations

from typing import Any, Iterable

import yaml
from apache_beam.io.filesystems import FileSystems

from prep.atomic import write_atomic
from prep.schemas import contract, output


def card_configs(shards: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The header's `configs`: per domain that has samples, its splits in contract order."""
    present = {(s.get("split", contract.TRAIN), s["domain"]) for s in shards if s.get("count", 0) > 0}
    configs = []
    for domain in contract.DOMAINS:
        splits = [split for split in contract.SPLITS if (split, domain) in present]
        if not splits:
            continue
        configs.append({
            "config_name": domain,
            "data_files": [
                {"split": contract.HF_SPLIT_NAMES[split], "path": f"{contract.shard_folder(split, domain)}/*{contract.SHARD_SUFFIX}"}
                for split in splits
            ],
        })
    if configs:
        configs[0]["default"] = True  # specific when there is any: the domain the paper is about
    return configs


# Each member's Hugging Face feature, in the YAML form `datasets` reads from a card. Declared,
# not inferred: `datasets` infers features from a folder's first five samples, and a JSON
# field that is null there and a string later (e.g. `near_duplicates`) then fails the load.
# `json` is datasets' Json type, so each sample's object comes back whole, whatever it holds.
_FEATURES = {
    contract.EXT_IMAGE: {"dtype": "image"},
    contract.EXT_JSON: {"dtype": "json"},
    contract.EXT_TEXT: {"dtype": "string"},
    contract.EXT_EMB: {"list": "float32"},
    contract.EXT_REFS: {"list": {"list": "float32"}},
    contract.EXT_MASK: {"dtype": "image"},
    contract.EXT_FACE: {"list": "float32"},
}


def card_features(domain: str, with_face: bool) -> list[dict[str, Any]]:
    """A domain's features: its members in tar order (an optional one only when the run can
    write it: `face.npy` with a face identity model; absent in a sample, it reads as None),
    then the builder's own `__key__` and `__url__`."""
    members = set(contract.REQUIRED[domain]) | ({contract.EXT_FACE} & contract.OPTIONAL[domain] if with_face else set())
    features = [{"name": ext, **_FEATURES[ext]} for ext in contract.MEMBER_ORDER if ext in members]
    return features + [{"name": "__key__", "dtype": "string"}, {"name": "__url__", "dtype": "string"}]


def _count_table(shards: list[dict[str, Any]]) -> list[str]:
    rows = {}
    for s in shards:
        split = s.get("split", contract.TRAIN)
        n_shards, n_samples = rows.get((s["domain"], split), (0, 0))
        rows[(s["domain"], split)] = (n_shards + 1, n_samples + s["count"])
    order = {split: i for i, split in enumerate(contract.SPLITS)}
    lines = ["| config | split | folder | shards | samples |", "|---|---|---|---:|---:|"]
    for (domain, split), (n_shards, n_samples) in sorted(rows.items(), key=lambda r: (r[0][0] != contract.SPECIFIC, order[r[0][1]])):
        lines.append(f"| {domain} | {contract.HF_SPLIT_NAMES[split]} | `{contract.shard_folder(split, domain)}/` | {n_shards} | {n_samples} |")
    return lines


def _augmented_refs(config: dict) -> bool:
    """Whether the run could give augmented refs: --singleton-refs augment, or an lsun: input
    under the default (augment for lsun)."""
    mode = config.get("singleton_refs")
    if mode is not None:
        return mode == "augment"
    return any(str(spec).split("=", 1)[-1].startswith("lsun:") for spec in config.get("inputs") or [])


def _models(manifest: dict[str, Any]) -> list[str]:
    lines = []
    for stage, info in sorted((manifest.get("models") or {}).items()):
        if not isinstance(info, dict):
            continue
        name = str(info.get("model") or info.get("face_model") or info.get("mode") or "")
        # A hub id ("Salesforce/blip2-opt-2.7b") is shown whole; a local path by its last part.
        shown = name.rstrip("/").rsplit("/", 1)[-1] if name.startswith(("/", ".", "~", "gs://")) else name
        sha = ((info.get("fingerprint") or {}).get("sha256") or "")[:12]
        random = " (random weights)" if info.get("random_weights") else ""
        lines.append(f"- {stage}: `{shown}`" + (f" (weights sha256 {sha}...)" if sha else "") + random)
    note = output.random_weights_note(manifest)
    if note:
        lines.extend(["", f"**{note[0].upper()}{note[1:]}.**"])
    return lines


def dataset_card(manifest: dict[str, Any]) -> str:
    """The card's text for a manifest (deterministic: no times, no local paths)."""
    shards = list(manifest.get("shards") or [])
    configs = card_configs(shards)
    identity = manifest.get("identity") or {}
    with_face = "face" in (identity.get("models") or {}).values()
    header = {
        "pretty_name": "prep triplets (image, object embedding, text)",
        "tags": ["webdataset", "text-to-image", "personalization", "prep"],
        "configs": configs,
        "dataset_info": [
            {"config_name": c["config_name"], "features": card_features(c["config_name"], with_face)} for c in configs
        ],
    }
    counts = manifest.get("counts") or {}
    config = manifest.get("config") or {}
    kinds = [str(spec).split(":", 1)[0] for spec in config.get("inputs") or []]
    totals = identity.get("totals") or {}
    default = configs[0]["config_name"] if configs else contract.SPECIFIC
    lines = [
        "---",
        yaml.safe_dump(header, sort_keys=False, default_flow_style=False, width=1000).rstrip("\n"),
        "---",
        contract.DATASET_CARD_MARK,
        "",
        "# Triplets for encoder-based personalised text-to-image training",
        "",
        f"Written by {manifest.get('created_by', 'prep')} (shard contract v{manifest.get('schema_version', contract.SCHEMA_VERSION)}). "
        "Each sample is an image, the CLIP embedding of its masked object and a caption; domain-specific "
        "samples also carry a foreground mask and the embeddings of other photos of the same identity "
        "(`refs.npy`, for cross-reference regularisation). General-domain samples carry a zero object embedding.",
        "",
        *_count_table(shards),
        "",
        f"Inputs: {counts.get('inputs', 0)} ({', '.join(kinds) or 'none'}); "
        f"{counts.get('specific', 0)} specific and {counts.get('general', 0)} general samples written, "
        f"{counts.get('dead_lettered', 0)} dead-lettered ({'reconciled' if manifest.get('reconciled') else 'NOT reconciled'}). "
        f"Embedding dimension: {manifest.get('embedding_dim', '?')}.",
    ]
    if totals:
        lines += [
            "",
            f"Identity: {totals.get('identities', 0)} identities, {totals.get('identities_verified', 0)} verified; "
            "identity refs are verified photos of the same identity, never a near-duplicate of their sample.",
        ]
    if _augmented_refs(config):
        lines += ["", "Refs marked `augmented` in `ref_kinds` (keys `<key>#aug<j>`) are augmented views of the sample's "
                      "own image, for objects with no second photo (`--singleton-refs`)."]
    models = _models(manifest)
    if models:
        lines += ["", f"Models (preset `{config.get('preset', '?')}`):", *models]
    lines += [
        "",
        "## Members of a sample `KEY`",
        "",
        "- `KEY.jpg`: the image (RGB)",
        "- `KEY.txt`: the caption",
        "- `KEY.json`: key, domain, identity, attributes, caption parts, size, `ref_keys`, identity checks, lineage",
        "- `KEY.emb.npy`: float32 [D], unit norm (zeros for general samples)",
        "- `KEY.refs.npy`: float32 [K, D], row i is the embedding of `ref_keys[i]`",
        "- `KEY.mask.png` (specific only): one channel, 0/255, the image's size; decode it as `L`, not RGB",
        "- `KEY.face.npy` (specific, face identity model only): float32 [F], the chosen face's descriptor",
        "",
        "## Reading",
        "",
        "```python",
        "from datasets import load_dataset",
        f'ds = load_dataset("path/to/this/folder", "{default}")  # or a hub copy: load_dataset("user/name", "{default}")',
        "```",
        "",
        "With `webdataset`: `wds.WebDataset(sorted(glob.glob(\"specific/*.tar\")))`; with `wids`: "
        "`wids.ShardListDataset(\"specific/index.wids.json\")`. `manifest.json` has the full config, "
        "the models' checksums, the counts and every shard's sha256; `prep validate` checks the folder.",
        "",
        "Licence: the images' and annotations' own licences apply (see the inputs in `manifest.json`); prep adds none.",
        "",
    ]
    return "\n".join(lines)


def write_dataset_card(out: str, manifest: dict[str, Any]) -> None:
    """OUT/README.md, atomically; a README.md that prep did not write is left alone."""
    path = f"{out.rstrip('/')}/{contract.DATASET_CARD}"
    if FileSystems.exists(path) and not is_prep_card(path):
        return
    write_atomic(path, dataset_card(manifest).encode("utf-8"))


def is_prep_card(path: str) -> bool:
    """Whether the README.md at `path` is a card prep wrote (its marker line is in its head)."""
    try:
        with FileSystems.open(path) as f:
            head = f.read(64 * 1024).decode("utf-8", errors="replace")
    except OSError:
        return False
    return contract.DATASET_CARD_MARK in head


def read_card_configs(text: str) -> list[dict[str, Any]]:
    """The `configs` of a card's YAML header ([] when it has none)."""
    if not text.startswith("---\n"):
        return []
    end = text.find("\n---\n", 4)
    if end < 0:
        return []
    header = yaml.safe_load(text[4:end]) or {}
    return list(header.get("configs") or []) if isinstance(header, dict) else []
