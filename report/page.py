"""The report page: one self-contained HTML string.

Everything is inline: CSS, the SVG charts, the images (data: URIs) and a few lines of script
for the filter box. A Content-Security-Policy meta tag forbids every fetch that is not a data:
URI, so the page provably opens offline and never calls out.

Rendering is pure: `render_page(ReportPage)` turns plain data into text; reading the output
and making thumbnails happen in `inspect.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from html import escape
from typing import Any, Optional

from prep.report.identity_view import CSS as IDENTITY_CSS

# Caption part classes (also the legend): the VLM's words, the attribute caption, a general
# sample's given text, and anything else (separators, text that matches neither part).
CAP_VLM, CAP_ATTR, CAP_TEXT, CAP_SEP = "cap-vlm", "cap-attr", "cap-text", "cap-sep"

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

_CSS = """
:root { --fg: #1d232b; --muted: #5f6b78; --line: #d8dde3; --bg: #f6f7f9; --vlm: #dce8fa;
  --vlm-line: #3b6fb6; --attr: #fcebd3; --attr-line: #e08a1e; --bad: #b3261e; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: var(--fg); background: #fff; }
header { padding: 16px 24px 8px; border-bottom: 1px solid var(--line); background: var(--bg); }
header h1 { margin: 0 0 4px; font-size: 20px; }
header .meta { color: var(--muted); font-size: 12px; word-break: break-all; }
main { padding: 8px 24px 40px; }
h2 { font-size: 16px; margin: 22px 0 8px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { text-align: left; padding: 3px 10px 3px 0; vertical-align: top; }
th { color: var(--muted); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; }
.tables { display: flex; flex-wrap: wrap; gap: 10px 48px; margin-top: 12px; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 8px 12px; min-width: 120px; }
.card .n { font-size: 22px; font-weight: 600; font-variant-numeric: tabular-nums; }
.card .l { color: var(--muted); font-size: 12px; }
.ok { color: #1e7d32; } .bad { color: var(--bad); }
.problems { border-left: 4px solid var(--bad); background: #fdf0ef; padding: 6px 12px; margin: 10px 0; }
.notice { border-left: 4px solid #c77c02; background: #fff6e0; padding: 6px 12px; margin: 10px 0; }
.problems li { font-size: 12px; }
.charts { display: flex; flex-wrap: wrap; gap: 14px; }
figure { margin: 0; border: 1px solid var(--line); border-radius: 6px; padding: 6px; }
figcaption { font-size: 11px; color: var(--muted); padding: 0 4px; max-width: 380px; }
svg.chart text { font: 10px system-ui, sans-serif; fill: var(--muted); }
svg.chart .chart-title { font-size: 12px; font-weight: 600; fill: var(--fg); }
svg.chart .grid { stroke: #eceff2; } svg.chart .axis { stroke: #9aa4ae; }
.examples { font-size: 12px; color: var(--muted); }
.examples code { color: var(--fg); }
.filterbar { position: sticky; top: 0; background: #fff; padding: 8px 0; z-index: 1;
  border-bottom: 1px solid var(--line); display: flex; gap: 12px; align-items: center; }
.filterbar input { font: inherit; padding: 4px 8px; width: 280px; border: 1px solid #aab3bd; border-radius: 4px; }
.legend span { margin-right: 10px; font-size: 12px; }
.triplet { display: grid; grid-template-columns: 150px 136px 136px 136px minmax(200px, 1fr) auto;
  gap: 10px; padding: 10px 0; border-bottom: 1px solid var(--line); align-items: start; }
.triplet[hidden] { display: none; }
.triplet .id { font-size: 12px; word-break: break-all; }
.triplet .id b { font-size: 13px; }
.triplet .id .dom { display: inline-block; padding: 0 6px; border-radius: 8px; font-size: 11px;
  background: #e7ebef; margin-top: 2px; }
.triplet img { display: block; max-width: 136px; max-height: 136px; border: 1px solid var(--line);
  background: repeating-conic-gradient(#eee 0 25%, #fff 0 50%) 0 0 / 12px 12px; }
.triplet .cell { font-size: 11px; color: var(--muted); }
.triplet .none { width: 136px; height: 60px; border: 1px dashed var(--line); display: flex;
  align-items: center; justify-content: center; color: #aab3bd; font-size: 11px; }
.caption { font-size: 13px; }
.caption .cap-vlm { background: var(--vlm); border-bottom: 2px solid var(--vlm-line); }
.caption .cap-attr { background: var(--attr); border-bottom: 2px solid var(--attr-line); }
.caption .cap-text { background: #eef0f2; }
.caption .cap-sep { color: var(--muted); }
.parts { margin-top: 4px; font-size: 11px; color: var(--muted); }
.refs { display: flex; gap: 6px; }
.refs figure { border: 0; padding: 0; }
.refs img { max-width: 80px; max-height: 80px; }
.refs figcaption { font-size: 9px; max-width: 80px; word-break: break-all; padding: 0; }
"""

# The filter: hides contact-sheet rows whose key and identity both miss the text (substring,
# case-insensitive). `#q=TEXT` in the URL pre-fills it, so a filtered view can be linked.
_SCRIPT = """
(function () {
  "use strict";
  var box = document.getElementById("filter");
  var shown = document.getElementById("shown");
  var rows = Array.prototype.slice.call(document.querySelectorAll(".triplet"));
  function apply() {
    var q = box.value.trim().toLowerCase();
    var n = 0;
    rows.forEach(function (row) {
      var key = (row.getAttribute("data-key") || "").toLowerCase();
      var identity = (row.getAttribute("data-identity") || "").toLowerCase();
      var hit = q === "" || key.indexOf(q) !== -1 || identity.indexOf(q) !== -1;
      row.hidden = !hit;
      if (hit) { n += 1; }
    });
    shown.textContent = n + " of " + rows.length + " shown";
  }
  var m = /[#&]q=([^&]*)/.exec(window.location.hash);
  if (m) {
    try { box.value = decodeURIComponent(m[1].replace(/\\+/g, " ")); } catch (e) { box.value = m[1]; }
  }
  box.addEventListener("input", apply);
  apply();
}());
"""


@dataclass
class Ref:
    key: str
    image: Optional[str]  # data: URI, None when the sample was not found
    kind: str = "identity"  # or "augmented": a view of the sample itself (--singleton-refs), drawn again


@dataclass
class Triplet:
    """One contact-sheet row."""

    key: str
    domain: str
    identity: Optional[str]
    shard: str
    caption_parts: list[tuple[str, str]]  # (text, CAP_* class)
    caption_vlm: Optional[str]
    caption_attributes: Optional[str]
    image: Optional[str]
    mask: Optional[str]
    masked: Optional[str]
    size: str
    mask_fraction: Optional[float]
    refs: list[Ref] = field(default_factory=list)


@dataclass
class Chart:
    svg: str
    note: str


@dataclass
class ReportPage:
    out_dir: str
    header: dict[str, str]  # label -> value, shown under the title
    cards: list[tuple[str, str, str]]  # (number, label, css class)
    counts_rows: list[tuple[str, str, str]]  # (what, manifest, found in shards)
    folder_rows: list[tuple[str, ...]]  # (folder, shards, samples, manifest shards, manifest samples)
    stage_rows: list[tuple[str, int, int]]  # (stage, per manifest, in the dead_letter files)
    dead_rows: list[tuple[str, int, list[dict]]]  # (stage: reason, count, examples)
    charts: list[Chart]
    triplets: list[Triplet]
    sheet_note: str
    problems: list[str]
    data: dict[str, Any] = field(default_factory=dict)  # embedded as JSON (#summary-data)
    identity_html: str = ""  # the identity view (report/identity_view.py), already rendered
    notices: list[str] = field(default_factory=list)  # one line each, above everything (e.g. random weights)
    contradictions_html: str = ""  # report/inspect.py: captions against their labels, already rendered
    doubts_html: str = ""  # report/inspect.py: labels the attribute probe doubts, already rendered
    bias_html: str = ""  # report/inspect.py: attributes per split and domain against a balanced mix


def caption_parts(caption: str, vlm: Optional[str], attributes: Optional[str]) -> list[tuple[str, str]]:
    """Split the final caption into its VLM part, separator and attribute part.

    The attribute caption is found at the end, the VLM caption (less trailing periods, as
    join_captions writes it) at the start; what lies between is the separator. A caption
    with neither part (a general sample's given text) is one CAP_TEXT span.
    """
    attr = (attributes or "").strip()
    head = (vlm or "").strip().rstrip(".").rstrip()
    tail_at = len(caption) - len(attr) if attr and caption.endswith(attr) else len(caption)
    head_end = len(head) if head and caption.startswith(head) and len(head) <= tail_at else 0
    if head_end == 0 and tail_at == len(caption):
        return [(caption, CAP_TEXT)]
    parts = []
    if head_end:
        parts.append((caption[:head_end], CAP_VLM))
    if caption[head_end:tail_at]:
        parts.append((caption[head_end:tail_at], CAP_SEP))
    if tail_at < len(caption):
        parts.append((caption[tail_at:], CAP_ATTR))
    return parts


def render_page(page: ReportPage) -> str:
    title = f"prep inspect: {page.out_dir}"
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',
        f"<title>{escape(title)}</title>",
        f"<style>{_CSS}{IDENTITY_CSS}</style></head><body>",
        "<header>",
        f"<h1>{escape(title)}</h1>",
        '<div class="meta">' + " · ".join(f"{escape(k)}: <b>{escape(v)}</b>" for k, v in page.header.items()) + "</div>",
        "</header><main>",
    ]
    for notice in page.notices:
        out.append(f'<div class="notice" id="notice"><b>Note</b> {escape(notice)}</div>')
    if page.problems:
        shown = page.problems[:20]
        more = f"<li>... and {len(page.problems) - len(shown)} more</li>" if len(page.problems) > len(shown) else ""
        out.append(
            '<div class="problems" id="problems"><b>Problems found while reading</b><ul>'
            + "".join(f"<li>{escape(p)}</li>" for p in shown)
            + more
            + "</ul></div>"
        )
    out.append('<section id="summary"><h2>Summary</h2><div class="cards">')
    for number, label, css in page.cards:
        out.append(f'<div class="card"><div class="n {css}">{escape(number)}</div><div class="l">{escape(label)}</div></div>')
    out.append("</div>")
    out.append('<div class="tables">')
    out.append(_table(["", "manifest", "found in shards"], page.counts_rows, numeric=(1, 2), table_id="counts"))
    out.append(
        _table(
            ["shard folder", "shards", "samples", "manifest: shards", "samples"],
            page.folder_rows,
            numeric=(1, 2, 3, 4),
            table_id="folders",
        )
    )
    out.append("</div>")
    out.append("</section>")

    out.append('<section id="stages"><h2>Dead letters per stage</h2>')
    if page.stage_rows:
        rows = [(s, str(listed), str(found)) for s, listed, found in page.stage_rows]
        out.append(_table(["stage", "manifest", "dead_letter files"], rows, numeric=(1, 2), table_id="stage-table"))
    else:
        out.append("<p>No input was dead-lettered.</p>")
    out.append("</section>")

    out.append('<section id="dead-letters"><h2>Dead-letter reasons</h2>')
    if page.dead_rows:
        out.append('<table id="reasons"><tr><th>stage: reason</th><th class="num">count</th><th>examples</th></tr>')
        for reason, count, examples in page.dead_rows:
            cells = "<br>".join(_letter(e) for e in examples)
            out.append(
                f'<tr><td>{escape(reason)}</td><td class="num">{count}</td><td class="examples">{cells}</td></tr>'
            )
        out.append("</table>")
    else:
        out.append("<p>None.</p>")
    out.append("</section>")

    out.append('<section id="charts"><h2>Distributions</h2><div class="charts">')
    for chart in page.charts:
        out.append(f"<figure>{chart.svg}<figcaption>{escape(chart.note)}</figcaption></figure>")
    out.append("</div></section>")

    if page.bias_html:
        out.append(page.bias_html)
    if page.identity_html:
        out.append(f'<section id="identity-view">{page.identity_html}</section>')
    if page.contradictions_html:
        out.append(page.contradictions_html)
    if page.doubts_html:
        out.append(page.doubts_html)

    out.append('<section id="contact-sheet"><h2>Contact sheet</h2>')
    out.append(f"<p>{escape(page.sheet_note)}</p>")
    out.append(
        '<div class="filterbar"><label>Filter <input id="filter" type="search" '
        'placeholder="key or identity" autocomplete="off"></label>'
        '<span id="shown"></span><span class="legend caption">'
        f'<span class="{CAP_VLM}">VLM caption</span><span class="{CAP_ATTR}">attribute caption</span>'
        f'<span class="{CAP_TEXT}">given text</span></span></div>'
    )
    out.append('<div id="sheet">')
    for t in page.triplets:
        out.append(_triplet(t))
    out.append("</div></section></main>")
    out.append(json_script(page.data))
    out.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(out) + "\n"


def _table(head: list[str], rows: list[tuple[str, ...]], *, numeric: tuple[int, ...] = (), table_id: str = "") -> str:
    def cell(tag: str, i: int, text: str) -> str:
        cls = ' class="num"' if i in numeric else ""
        return f"<{tag}{cls}>{escape(text)}</{tag}>"

    ident = f' id="{table_id}"' if table_id else ""
    lines = [f"<table{ident}><tr>" + "".join(cell("th", i, h) for i, h in enumerate(head)) + "</tr>"]
    for row in rows:
        lines.append("<tr>" + "".join(cell("td", i, str(v)) for i, v in enumerate(row)) + "</tr>")
    lines.append("</table>")
    return "".join(lines)


def _letter(letter: dict[str, Any]) -> str:
    """One dead letter: key, reason and source (its path as a tooltip)."""
    key = escape(str(letter.get("key", "?")))
    reason = escape(str(letter.get("reason", "")))
    source = escape(str(letter.get("source", "")))
    where = escape(str(letter.get("path") or letter.get("source") or ""), quote=True)
    return f'<code>{key}</code> {reason} <span title="{where}">({source})</span>'


def _img(uri: Optional[str], alt: str, empty: str) -> str:
    if uri is None:
        return f'<div class="none">{escape(empty)}</div>'
    return f'<img src="{uri}" alt="{escape(alt, quote=True)}" loading="eager">'


def _triplet(t: Triplet) -> str:
    identity = t.identity or ""
    caption = "".join(f'<span class="{cls}">{escape(text)}</span>' for text, cls in t.caption_parts)
    parts = []
    if t.caption_vlm is not None:
        parts.append(f'VLM: <span class="{CAP_VLM}">{escape(t.caption_vlm)}</span>')
    if t.caption_attributes is not None:
        parts.append(f'attributes: <span class="{CAP_ATTR}">{escape(t.caption_attributes)}</span>')
    if t.refs:
        refs = "".join(
            f"<figure>{_img(r.image, r.key, 'not found')}<figcaption>"
            f"{escape(r.key if r.kind != 'augmented' else 'augmented view ' + r.key.rsplit('#aug', 1)[-1])}"
            f"</figcaption></figure>"
            for r in t.refs
        )
    else:
        refs = '<div class="cell">no references</div>'
    fraction = f"foreground {t.mask_fraction:.1%}" if t.mask_fraction is not None else ""
    return (
        f'<div class="triplet" data-key="{escape(t.key, quote=True)}" data-identity="{escape(identity, quote=True)}">'
        f'<div class="id"><b>{escape(t.key)}</b><br>identity {escape(identity or "none")}<br>'
        f'<span class="dom">{escape(t.domain)}</span><br><span class="cell">{escape(t.shard)} · {escape(t.size)}</span></div>'
        f'<div>{_img(t.image, "image " + t.key, "no image")}<div class="cell">image</div></div>'
        f'<div>{_img(t.mask, "mask " + t.key, "no mask (general)")}<div class="cell">mask {escape(fraction)}</div></div>'
        f'<div>{_img(t.masked, "masked " + t.key, "no mask (general)")}<div class="cell">masked (x ⊗ m)</div></div>'
        f'<div><div class="caption">{caption}</div><div class="parts caption">{"<br>".join(parts)}</div></div>'
        f'<div><div class="refs">{refs}</div></div>'
        "</div>"
    )


def json_script(data: Any) -> str:
    """Data embedded for machines (the summary numbers), safe inside <script>."""
    text = json.dumps(data, sort_keys=True).replace("<", "\\u003c")
    return f'<script type="application/json" id="summary-data">{text}</script>'
