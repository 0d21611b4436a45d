"""`inspect_output`: one self-contained HTML page that shows what an output folder holds.

  summary      counts per domain (manifest vs. found in the shards), reconciliation, shards,
               identities; dead letters per stage and per reason, with examples
  charts       caption length (words), mask foreground fraction, refs per sample, images per
               identity, embedding norms (inline SVG)
  contact sheet  N seeded triplets: image, mask, masked image (white fill), caption with its
               VLM and attribute parts marked, and the reference images side by side

The output is read in two passes (see read.py): every shard once for keys and numbers (from
the parquet sidecars where present), then only the shards holding the chosen samples and
their references for the images.
"""

from __future__ import annotations

import base64
import fnmatch
import io
import json
import os
import random
from typing import Any, Optional, Sequence

from PIL import Image

from prep.atomic import write_atomic
from prep.report.charts import describe, histogram_svg
from prep.report.identity_view import identity_groups, render_identities
from prep.report.identity_view import totals as identity_totals
from prep.report.page import Chart, Ref, ReportPage, Triplet, caption_parts, render_page
from prep.report.read import (
    OutputIndex,
    _iter_shard,
    fetch_samples,
    index_output,
    manifest_shard_counts,
    read_dead_letters,
    read_manifest,
)
from prep.schemas import contract, output
from prep.schemas.output import random_weights_note
from prep.schemas.records import DOMAINS, GENERAL, SPECIFIC
from prep.transforms.write import mask_fraction

THUMB_SIDE = 136
REF_SIDE = 80
WHITE = (255, 255, 255)
# Dead-letter stages in pipeline order (others follow alphabetically).
STAGE_ORDER = ("ingest", "decode", "caption", "mask", "embed", "pair", "write")


def inspect_output(
    out_dir: str,
    html_path: str,
    *,
    samples: int = 24,
    seed: int = 0,
    identity: Optional[str] = None,
    key: Optional[str] = None,
    use_sidecars: bool = True,
    attributes: Optional[Sequence[str]] = None,
) -> dict[str, Any]:
    """Write a report of `out_dir` (local path or any FileSystems URL) to `html_path`.

    samples: triplets on the contact sheet, chosen with `seed` among the samples that match
      `identity` and `key` (shell-style globs, exact match without wildcards; None matches all).
    use_sidecars: read the per-shard parquet sidecars instead of the tars where present (the
      numbers are the same; the report trusts the sidecars, `prep validate` checks the tars).

    Returns the numbers shown: "counts" (the manifest's), "found" (samples per domain in the
    shards), "found_by_folder" (per shard folder: "specific", "val/specific", ...), "shards"
    (per domain), "identities", "reconciled", "dead_letters", "dead_letter_reasons", "stages"
    (dead letters per stage, per the manifest), "charts" (count/min/median/mean/max per
    chart), "matching" (samples matching the filters), "sampled" (the contact sheet's keys, in
    page order), "sidecar_shards", "problems" (what could not be read), "html" and "bytes"
    (the page's path and size).

    Raises FileNotFoundError when `out_dir` has neither a manifest nor shards.
    """
    if samples < 0:
        raise ValueError(f"samples must be >= 0, got {samples}")
    manifest = read_manifest(out_dir)
    index = index_output(out_dir, manifest, use_sidecars=use_sidecars)
    if manifest is None and not index.shards:
        raise FileNotFoundError(f"{out_dir}: no {contract.MANIFEST} and no shards: not an output of `prep run`")
    dead = read_dead_letters(out_dir)
    problems = ([] if manifest is not None else [f"{contract.MANIFEST}: missing or unreadable"]) + dead.problems

    matching = sorted(k for k, e in index.entries.items() if _matches(k, e.identity, identity, key))
    chosen = random.Random(seed).sample(matching, min(samples, len(matching)))
    rank = {d: i for i, d in enumerate(DOMAINS)}
    chosen.sort(key=lambda k: (rank.get(index.entries[k].domain, 9), index.entries[k].identity or "", k))
    needed = set(chosen) | {r for k in chosen for r in index.entries[k].ref_keys}
    fetched = fetch_samples(index, needed)
    run_seed = int(((manifest or {}).get("config") or {}).get("seed") or 0)
    triplets = [_triplet(k, index, fetched, problems, run_seed) for k in chosen]
    problems = index.problems + problems

    counts = dict((manifest or {}).get("counts") or {})
    found = index.found()
    by_folder = index.found_by_folder()
    per_identity = index.images_per_identity()
    reasons = dict((manifest or {}).get("dead_letter_reasons") or {})
    stages = _stages(reasons, dead.by_stage)
    charts, chart_numbers = _charts(index, per_identity)
    shards = {d: sum(1 for s in index.shards if s.domain == d) for d in DOMAINS}
    folder_rows = _folder_rows(index, by_folder, manifest)
    reconciled = (manifest or {}).get("reconciled")

    filters = ", ".join(f"{n}={v!r}" for n, v in (("identity", identity), ("key", key)) if v is not None)
    sheet_note = (
        f"{len(chosen)} of {len(matching)} samples"
        + (f" matching {filters}" if filters else "")
        + f", chosen with seed {seed}. Masked image: the object on white (x ⊗ m)."
    )
    summary: dict[str, Any] = {
        "out": out_dir,
        "counts": counts,
        "found": found,
        "found_by_folder": by_folder,
        "reconciled": reconciled,
        "shards": shards,
        "identities": len(per_identity),
        "dead_letters": dead.total,
        "dead_letter_reasons": dead.by_reason,
        "stages": {s: listed for s, (listed, _) in stages.items()},
        "charts": chart_numbers,
        "matching": len(matching),
        "sampled": chosen,
        "sidecar_shards": index.from_sidecar,
        "problems": problems,
        "random_weights": random_weights_note(manifest) is not None,
    }
    page = ReportPage(
        out_dir=out_dir,
        header=_header(manifest),
        cards=_cards(counts, found, dead.total, len(per_identity), reconciled),
        counts_rows=[
            ("inputs", _num(counts.get("inputs")), "—"),
            *[(d, _num(counts.get(d)), str(found[d])) for d in DOMAINS],
            ("dead-lettered", _num(counts.get("dead_lettered")), f"{dead.total} (dead_letter files)"),
            ("identities", "—", str(len(per_identity))),
        ],
        folder_rows=folder_rows,
        stage_rows=[(s, listed, in_files) for s, (listed, in_files) in stages.items()],
        dead_rows=[(r, n, dead.examples.get(r, [])) for r, n in dead.by_reason.items()],
        charts=charts,
        triplets=triplets,
        sheet_note=sheet_note,
        problems=problems,
        data={k: v for k, v in summary.items() if k != "problems"},
        notices=[n for n in [random_weights_note(manifest)] if n],
    )
    page.identity_html, summary["identity"] = _identity_view(index, manifest, problems)
    page.contradictions_html, summary["caption_contradictions"] = _contradictions_view(index, manifest, problems)
    page.doubts_html, summary["attribute_doubts"] = _doubts_view(index, manifest, problems)
    chosen = list(dict.fromkeys([*BIAS_ATTRIBUTES, *(attributes or ())]))
    page.bias_html, summary["attributes"] = _bias_view(index, problems, chosen)
    html = render_page(page).encode("utf-8")
    target = html_path if "://" in html_path else os.path.abspath(html_path)
    write_atomic(target, html)
    return {**summary, "html": target, "bytes": len(html)}


def format_summary(summary: dict[str, Any]) -> str:
    """What `prep inspect` prints: a few lines from `inspect_output`'s result."""
    found = summary["found"]
    state = {True: "reconciled", False: "NOT RECONCILED"}.get(summary["reconciled"], "no manifest")
    lines = [
        f"{summary['out']}: specific {found[SPECIFIC]}, general {found[GENERAL]} in "
        f"{sum(summary['shards'].values())} shards; {summary['dead_letters']} dead-lettered; "
        f"{summary['identities']} identities ({state})",
        f"contact sheet: {len(summary['sampled'])} of {summary['matching']} matching samples",
    ]
    for reason, n in summary["dead_letter_reasons"].items():
        lines.append(f"dead letter  {n:6d}  {reason}")
    if summary["problems"]:
        lines.append(f"{len(summary['problems'])} problem(s) while reading:")
        lines.extend(f"  - {p}" for p in summary["problems"][:10])
    lines.append(f"report: {summary['html']} ({summary['bytes'] / 1024:.0f} KiB)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- pieces


IDENTITY_GROUPS = 40  # identities shown in the identity view (those with outliers or duplicates first)


def _identity_view(index: OutputIndex, manifest: Optional[dict], problems: list[str]) -> tuple[str, dict]:
    """The identity view's HTML and its totals (also the manifest's, where it has them)."""
    metas = [{"key": k, "identity": e.identity, **e.verdict} for k, e in sorted(index.entries.items()) if e.verdict]
    if not metas:
        return "", {}
    groups = identity_groups(metas)
    shown = groups[:IDENTITY_GROUPS]
    keys = [m.key for g in shown for m in g.members]
    fetched = fetch_samples(index, keys)
    thumbs = {}
    for k in keys:
        sample = fetched.get(k)
        if sample is not None and isinstance(sample.get(contract.EXT_IMAGE), bytes):
            try:
                thumbs[k] = _uri(_open_image(sample[contract.EXT_IMAGE]), 100)
            except Exception:  # PIL raises many types on a malformed JPEG; the cell says "not shown"
                problems.append(f"{k}.{contract.EXT_IMAGE}: does not decode")
    for g in shown:
        for m in g.members:
            m.image = thumbs.get(m.key)
    found = identity_totals(groups)
    listed = ((manifest or {}).get("identity") or {}).get("totals")
    return render_identities(groups, limit=IDENTITY_GROUPS), {"found": found, "manifest": listed}


def _matches(key: str, ident: Optional[str], identity: Optional[str], key_pattern: Optional[str]) -> bool:
    if identity is not None and (ident is None or not fnmatch.fnmatchcase(ident, identity)):
        return False
    return key_pattern is None or fnmatch.fnmatchcase(key, key_pattern)


def _folder_rows(index: OutputIndex, found: dict[str, int], manifest: Optional[dict]) -> list[tuple[str, ...]]:
    """(folder, shards, samples, shards per manifest, samples per manifest) per shard folder."""
    listed: dict[str, list[int]] = {}
    for rel, count in manifest_shard_counts(manifest).items():
        entry = listed.setdefault(rel.rsplit("/", 1)[0], [0, 0])
        entry[0] += 1
        entry[1] += count
    shards: dict[str, int] = {}
    for shard in index.shards:
        shards[shard.folder] = shards.get(shard.folder, 0) + 1
    rows = []
    for folder in list(dict.fromkeys([*shards, *listed])):
        m = listed.get(folder)
        rows.append(
            (
                f"{folder}/",
                str(shards.get(folder, 0)),
                str(found.get(folder, 0)),
                str(m[0]) if m else "—",
                str(m[1]) if m else "—",
            )
        )
    return rows


def _num(value: Any) -> str:
    return str(value) if value is not None else "—"


def _stages(manifest_reasons: dict[str, int], found: dict[str, int]) -> dict[str, tuple[int, int]]:
    """stage -> (dead-lettered per the manifest, dead letters found in the files)."""
    listed: dict[str, int] = {}
    for reason, n in manifest_reasons.items():
        stage = contract.stage_of_count_key(reason)
        listed[stage] = listed.get(stage, 0) + int(n)
    names = set(listed) | set(found)
    order = sorted(names, key=lambda s: (STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER), s))
    return {s: (listed.get(s, 0), found.get(s, 0)) for s in order}


def _header(manifest: Optional[dict]) -> dict[str, str]:
    if manifest is None:
        return {"manifest": "missing"}
    config = manifest.get("config") or {}
    models = manifest.get("models") or {}
    header = {
        "created by": str(manifest.get("created_by", "?")),
        "schema": f"v{manifest.get('schema_version', '?')}",
        "preset": str(config.get("preset", "?")),
        "seed": str(config.get("seed", "?")),
        "refs per sample": str(config.get("refs_per_sample", "?")),
        "embedding dim": str(manifest.get("embedding_dim", "?")),
    }
    for stage in ("caption", "mask", "embed"):
        model = (models.get(stage) or {}).get("model") if isinstance(models.get(stage), dict) else None
        if model:
            header[f"{stage} model"] = str(model)
    return header


def _cards(counts: dict, found: dict[str, int], dead: int, identities: int, reconciled: Any) -> list[tuple[str, str, str]]:
    def n(name: str, fallback: int) -> str:
        value = counts.get(name)
        return str(value if value is not None else fallback)

    state = ("reconciled", "ok") if reconciled else (("NOT reconciled", "bad") if reconciled is False else ("unknown", ""))
    return [
        (n("inputs", found[SPECIFIC] + found[GENERAL] + dead), "inputs", ""),
        (n(SPECIFIC, found[SPECIFIC]), "specific samples", ""),
        (n(GENERAL, found[GENERAL]), "general samples", ""),
        (n("dead_lettered", dead), "dead-lettered", "bad" if (counts.get("dead_lettered") or dead) else ""),
        (str(identities), "identities", ""),
        ("✓" if reconciled else ("✗" if reconciled is False else "?"), state[0], state[1]),
    ]


def _charts(index: OutputIndex, per_identity: dict[str, int]) -> tuple[list[Chart], dict[str, dict]]:
    words = {d: index.caption_words.get(d, []) for d in DOMAINS if index.caption_words.get(d)}
    every_word = [w for values in words.values() for w in values]
    per_identity_counts = list(per_identity.values())
    specs = [  # (name, title, series, integer, x label, fixed range, values described)
        ("caption_words", "Caption length", words, True, "words per caption", None, every_word),
        (
            "mask_fraction", "Mask foreground", {SPECIFIC: index.mask_fraction}, False,
            "fraction of pixels in the mask", (0.0, 1.0), index.mask_fraction,
        ),
        (
            "refs_per_sample", "References per sample", {SPECIFIC: index.refs_per_sample}, True,
            "refs per specific sample", None, index.refs_per_sample,
        ),
        (
            "images_per_identity", "Images per identity", {"identities": per_identity_counts}, True,
            "specific samples per identity", None, per_identity_counts,
        ),
        (
            "emb_norm", "Embedding norm", {SPECIFIC: index.emb_norm}, False,
            "L2 norm of the object embedding", None, index.emb_norm,
        ),
    ]
    charts, numbers = [], {}
    for name, title, series, integer, x_label, value_range, values in specs:
        stats = describe(values)
        numbers[name] = stats
        svg = histogram_svg(
            title, series, integer=integer, x_label=x_label, value_range=value_range, chart_id=f"chart-{name}"
        )
        charts.append(Chart(svg=svg, note=_note(stats, integer)))
    if index.emb_norm:
        charts[-1].note += f" · max |norm − 1| {max(abs(v - 1.0) for v in index.emb_norm):.2g}"
    if index.general_nonzero_emb:
        charts[-1].note += f" · {index.general_nonzero_emb} general samples have a non-zero embedding"
    return charts, numbers


def _note(stats: dict, integer: bool) -> str:
    if not stats["count"]:
        return "no values"

    def f(v: float) -> str:
        return f"{v:g}" if integer else f"{v:.6g}"

    return (
        f"n={stats['count']} · min {f(stats['min'])} · median {f(stats['median'])} · "
        f"mean {stats['mean']:.4g} · max {f(stats['max'])}"
    )


def _uri(image: Image.Image, side: int, *, png: bool = False) -> str:
    thumb = image.copy()
    thumb.thumbnail((side, side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if png:
        thumb.save(buf, format="PNG", optimize=True)
        mime = "image/png"
    else:
        thumb.convert("RGB").save(buf, format="JPEG", quality=82, optimize=True)
        mime = "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _open_image(data: Any) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


CONTRADICTIONS_SHOWN = 48


BIAS_ATTRIBUTES = ("Male", "Young", "Pale_Skin", "Attractive", "Eyeglasses")  # the paper's skew, and glasses


def _bias_view(index: OutputIndex, problems: list[str], chosen: Sequence[str]) -> tuple[str, dict]:
    """The attributes' shares per split and domain, labelled and predicted apart (from each
    shard's stats: no tar is read), each against a balanced 50%: the skew a model trained on
    this data learns (the paper's limitation: CelebA leans young, attractive, light-skinned)."""
    from html import escape

    from prep.report.charts import share_bars_svg

    totals: dict[tuple[str, str, str], dict] = {}
    for shard in index.shards:
        if not shard.stats:
            continue
        try:
            stats = json.loads(output.read_bytes(shard.stats).decode("utf-8"))
        except (*output.READ_ERRORS, ValueError) as exc:
            problems.append(f"{shard.rel}: stats unreadable ({type(exc).__name__}: {exc})")
            continue
        for source, entry in (stats.get("attributes") or {}).items():
            t = totals.setdefault((shard.split, shard.domain, source), {"samples": 0, "true": {}})
            t["samples"] += int(entry.get("samples", 0))
            for name, n in (entry.get("true") or {}).items():
                t["true"][name] = t["true"].get(name, 0) + int(n)
    if not totals:
        return "", {}
    order = {s: i for i, s in enumerate(contract.SPLITS)}
    groups = sorted(totals, key=lambda g: (order.get(g[0], 9), g[1], g[2]))
    charts, data = [], {}
    for name in chosen:
        rows = []
        for split, domain, source in groups:
            t = totals[(split, domain, source)]
            share = t["true"][name] / t["samples"] if name in t["true"] and t["samples"] else None
            rows.append((f"{split} {domain} · {source}", share, t["samples"], 0 if source == "labels" else 1))
            data.setdefault(name, {})[f"{split}/{domain}/{source}"] = None if share is None else round(share, 4)
        charts.append(f"<figure>{share_bars_svg(name, rows, chart_id='bias-' + name)}</figure>")
    html = ('<section id="bias"><h2>Attributes in the data</h2>'
            "<p>The share of samples with each attribute, per split and domain, labelled and predicted "
            "(<code>--attribute-model</code>) apart, against a balanced 50%. A model trained on this data learns this "
            "mix; <code>prep weights OUT --balance " + escape(",".join(chosen[:2])) + "</code> counters it "
            "(<code>prep train --weights</code>).</p><div class=\"charts\">" + "".join(charts) + "</div></section>")
    return html, data


def _flagged_samples(index: OutputIndex, manifest: Optional[dict], problems: list[str], field: str,
                     cells) -> tuple[list[str], list[str]]:
    """(table rows, keys) of the samples whose KEY.json has a non-empty `field`, with
    thumbnails: read from the shards the manifest counts them in (its shard entries' `field`),
    and no other. `cells(meta)` gives the row's text cells after the thumbnail and the key."""
    from html import escape

    shards = {(e.get("split", contract.TRAIN), e["domain"], e["name"]) for e in (manifest or {}).get("shards", [])
              if e.get(field)}
    rows, found = [], []
    for shard in index.shards:
        if (shard.split, shard.domain, shard.name) not in shards:
            continue
        for sample in _iter_shard(shard, problems):
            meta = sample.get(contract.EXT_JSON)
            if not isinstance(meta, dict) or not meta.get(field):
                continue
            found.append(sample["__key__"])
            if len(rows) >= CONTRADICTIONS_SHOWN:
                continue
            thumb = ""
            try:
                thumb = _uri(_open_image(sample[contract.EXT_IMAGE]).convert("RGB"), REF_SIDE)
            except Exception as e:  # noqa: BLE001 - PIL raises many types; the row shows without it
                problems.append(f"{shard.rel}: {sample['__key__']}: image does not decode ({type(e).__name__}: {e})")
            img = f'<img src="{thumb}" alt="">' if thumb else ""
            rows.append(f"<tr><td>{img}</td><td><code>{escape(sample['__key__'])}</code></td>"
                        + "".join(f"<td>{escape(c)}</td>" for c in cells(meta)) + "</tr>")
    return rows, found


def _contradictions_view(index: OutputIndex, manifest: Optional[dict], problems: list[str]) -> tuple[str, list]:
    """Samples whose VLM caption contradicts their labels (transforms/caption_labels.py)."""
    def cells(meta: dict) -> list[str]:
        said = "; ".join(f"{c['attribute']} is {'1' if c['label'] else '-1'}, the caption says "
                         f"\u201c{c['words']}\u201d" for c in meta["caption_contradictions"])
        return [said, str(meta.get("caption_vlm") or "")]

    rows, found = _flagged_samples(index, manifest, problems, "caption_contradictions", cells)
    if not found:
        return "", []
    more = f" (the first {len(rows)} shown)" if len(found) > len(rows) else ""
    html = ('<section id="contradictions"><h2>Captions against their labels</h2>'
            f"<p>{len(found)} sample(s) whose VLM caption contradicts one of their attribute labels{more}. "
            "Labels are not changed: the label or the captioner may be the wrong one.</p>"
            "<table><tr><th></th><th>key</th><th>contradiction</th><th>VLM caption</th></tr>"
            + "".join(rows) + "</table></section>")
    return html, found


def _doubts_view(index: OutputIndex, manifest: Optional[dict], problems: list[str]) -> tuple[str, list]:
    """Labels the attribute probe contradicts with high confidence (--attribute-model)."""
    def cells(meta: dict) -> list[str]:
        return ["; ".join(f"{d['attribute']} is {'1' if d['label'] else '-1'}, the probe gives "
                          f"p = {d['probability']:.3f}" for d in meta["attribute_doubts"])]

    rows, found = _flagged_samples(index, manifest, problems, "attribute_doubts", cells)
    if not found:
        return "", []
    counts = ", ".join(f"{a} {n}" for a, n in ((manifest or {}).get("attribute_doubts") or {}).items())
    more = f" (the first {len(rows)} shown)" if len(found) > len(rows) else ""
    html = ('<section id="doubts"><h2>Labels the attribute probe doubts</h2>'
            f"<p>{len(found)} sample(s) with a label the probe contradicts with high confidence{more}; per "
            f"attribute: {counts}. Labels are not changed: look, then fix the annotation or keep it.</p>"
            "<table><tr><th></th><th>key</th><th>doubted label</th></tr>" + "".join(rows) + "</table></section>")
    return html, found


def _triplet(key: str, index: OutputIndex, fetched: dict[str, dict], problems: list[str], run_seed: int = 0) -> Triplet:
    from prep.transforms.mask import (
        masked_image,  # the embed stage's own x ⊗ m (imports torch: lazily)
    )
    from prep.transforms.views import is_view_key, parent_of, view_jpeg

    entry = index.entries[key]
    shard = index.shards[entry.shard].rel
    sample = fetched.get(key, {})
    meta = sample.get(contract.EXT_JSON) if isinstance(sample.get(contract.EXT_JSON), dict) else {}
    caption = sample.get(contract.EXT_TEXT) if isinstance(sample.get(contract.EXT_TEXT), str) else str(meta.get("caption", ""))
    image = mask = masked = None
    fraction = None
    size = "?"
    try:
        if contract.EXT_IMAGE in sample:
            rgb = _open_image(sample[contract.EXT_IMAGE]).convert("RGB")
            size = f"{rgb.width}×{rgb.height}"
            image = _uri(rgb, THUMB_SIDE)
            if contract.EXT_MASK in sample:
                m = _open_image(sample[contract.EXT_MASK]).convert("L")
                fraction = mask_fraction(sample[contract.EXT_MASK])
                mask = _uri(m, THUMB_SIDE, png=True)
                masked = _uri(masked_image(rgb, m, WHITE), THUMB_SIDE)
    except Exception as e:  # PIL raises many types on malformed input; the row shows what decoded
        problems.append(f"{shard}: {key}: image or mask does not decode ({type(e).__name__}: {e})")
    refs = []
    for ref in entry.ref_keys:
        ref_sample = fetched.get(ref)
        uri = None
        if is_view_key(ref) and contract.EXT_IMAGE in sample:  # an augmented view: drawn again, as the run drew it
            parent, j = parent_of(ref)
            try:
                view = view_jpeg(sample[contract.EXT_IMAGE], run_seed, parent, j)
                uri = _uri(_open_image(view).convert("RGB"), REF_SIDE)
            except Exception as e:  # as below
                problems.append(f"{ref}: the augmented view cannot be drawn ({type(e).__name__}: {e})")
            refs.append(Ref(key=ref, image=uri, kind="augmented"))
            continue
        if ref_sample is not None and contract.EXT_IMAGE in ref_sample:
            try:
                uri = _uri(_open_image(ref_sample[contract.EXT_IMAGE]).convert("RGB"), REF_SIDE)
            except Exception as e:  # as above
                problems.append(f"{ref}: reference image does not decode ({type(e).__name__}: {e})")
        refs.append(Ref(key=ref, image=uri))
    return Triplet(
        key=key,
        domain=entry.domain,
        identity=entry.identity,
        shard=shard,
        caption_parts=caption_parts(caption, meta.get("caption_vlm"), meta.get("caption_attributes")),
        caption_vlm=meta.get("caption_vlm"),
        caption_attributes=meta.get("caption_attributes"),
        image=image,
        mask=mask,
        masked=masked,
        size=size,
        mask_fraction=fraction,
        refs=refs,
    )
