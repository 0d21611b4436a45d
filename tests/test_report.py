"""`prep inspect`: the report's numbers agree with the manifest and the shards, the page is
self-contained, the contact sheet is seeded and filterable, and a damaged output is reported
rather than fatal. (The page in a real browser: test_report_browser.py.)"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from collections import Counter
from html.parser import HTMLParser

import pytest
from PIL import Image

from prep.report import format_summary, inspect_output
from prep.report.charts import histogram_svg, make_bins
from prep.report.page import CAP_ATTR, CAP_SEP, CAP_TEXT, CAP_VLM, caption_parts
from prep.transforms.attributes import join_captions

SAMPLES = 12


class Rows(HTMLParser):
    """The contact sheet's rows: attributes, images and caption spans of each .triplet."""

    def __init__(self):
        super().__init__()
        self.rows: list[dict] = []
        self._depth = 0  # div depth inside the current row
        self._span: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div" and "triplet" in (a.get("class") or "").split():
            self.rows.append({"key": a["data-key"], "identity": a["data-identity"], "imgs": [], "spans": []})
            self._depth = 1
            return
        if not self._depth:
            return
        if tag == "div":
            self._depth += 1
        elif tag == "img":
            self.rows[-1]["imgs"].append(a)
        elif tag == "span":
            self._span.append(a.get("class") or "")
            self.rows[-1]["spans"].append([a.get("class") or "", ""])

    def handle_endtag(self, tag):
        if self._depth and tag == "div":
            self._depth -= 1
        elif self._depth and tag == "span" and self._span:
            self._span.pop()

    def handle_data(self, data):
        if self._depth and self._span:
            self.rows[-1]["spans"][-1][1] += data


def parse_rows(html: str) -> list[dict]:
    parser = Rows()
    parser.feed(html)
    return parser.rows


@pytest.fixture(scope="module")
def report(pipeline_run, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("report") / "report.html")
    summary = inspect_output(pipeline_run["out"], path, samples=SAMPLES, seed=0)
    return summary, open(path, encoding="utf-8").read()


@pytest.fixture(scope="module")
def shards(pipeline_run):
    from test_stats import read_tar, shard_paths

    return {s["__key__"]: s for p in shard_paths(pipeline_run["out"]) for s in read_tar(p)}


def test_summary_agrees_with_manifest_and_shards(report, pipeline_run, shards):
    summary, _ = report
    manifest = pipeline_run["manifest"]
    assert summary["counts"] == manifest["counts"] and summary["reconciled"] is True
    found = Counter(s["json"]["domain"] for s in shards.values())
    assert summary["found"] == {"specific": found["specific"], "general": found["general"]}
    assert summary["found"]["specific"] == manifest["counts"]["specific"]
    assert summary["dead_letters"] == manifest["counts"]["dead_lettered"] == 1
    assert summary["dead_letter_reasons"] == manifest["dead_letter_reasons"]
    assert summary["stages"] == {"decode": 1}
    identities = Counter(s["json"]["identity"] for s in shards.values() if s["json"]["identity"])
    assert summary["identities"] == len(identities)
    charts = summary["charts"]
    assert charts["caption_words"]["count"] == len(shards)
    assert charts["caption_words"]["max"] == max(len(s["txt"].split()) for s in shards.values())
    assert charts["mask_fraction"]["count"] == found["specific"]
    assert 0 < charts["mask_fraction"]["min"] <= charts["mask_fraction"]["max"] <= 1
    assert charts["refs_per_sample"]["count"] == found["specific"]
    assert charts["refs_per_sample"]["max"] == pipeline_run["config"].refs_per_sample
    assert charts["images_per_identity"]["count"] == len(identities)
    assert charts["images_per_identity"]["max"] == max(identities.values())
    assert charts["emb_norm"]["min"] == pytest.approx(1.0, abs=1e-4) == charts["emb_norm"]["max"]
    assert summary["sidecar_shards"] == sum(summary["shards"].values()) > 0
    assert summary["problems"] == []


def test_reading_the_tars_gives_the_same_numbers_as_the_sidecars(report, pipeline_run, tmp_path):
    summary, _ = report
    again = inspect_output(pipeline_run["out"], str(tmp_path / "r.html"), samples=SAMPLES, seed=0, use_sidecars=False)
    assert again["sidecar_shards"] == 0
    for name in ("counts", "found", "found_by_folder", "identities", "dead_letter_reasons", "sampled", "matching"):
        assert again[name] == summary[name], name
    for chart, numbers in summary["charts"].items():
        for stat, value in numbers.items():
            assert again["charts"][chart][stat] == pytest.approx(value, abs=1e-12), (chart, stat)


def test_page_is_one_self_contained_file(report):
    _, html = report
    assert html.startswith("<!DOCTYPE html>")
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    refs = re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]+)""", html)
    assert refs and all(r.startswith("data:") for r in refs), [r for r in refs if not r.startswith("data:")][:5]
    assert not re.search(r"https?://", html)
    assert "<link rel=\"stylesheet\"" not in html and "@import" not in html and "url(" not in html
    assert html.count("<svg") == 5 + 5  # the five distribution charts and the five bias-view charts, inline
    assert html.count("bias-chart") == 5
    data = json.loads(re.search(r'<script type="application/json" id="summary-data">(.*?)</script>', html).group(1))
    assert data["counts"]["specific"] > 0


def test_contact_sheet_rows_show_triplets_and_refs(report, shards):
    summary, html = report
    rows = parse_rows(html)
    assert [r["key"] for r in rows] == summary["sampled"] and len(rows) == SAMPLES
    domains = {shards[r["key"]]["json"]["domain"] for r in rows}
    assert domains == {"specific", "general"}
    for row in rows:
        s = shards[row["key"]]
        meta = s["json"]
        assert row["identity"] == (meta["identity"] or "")
        for img in row["imgs"]:
            uri = img["src"]
            assert uri.startswith(("data:image/jpeg;base64,", "data:image/png;base64,"))
            Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).load()
        if meta["domain"] == "specific":
            # image, mask, masked image, then one image per reference
            assert len(row["imgs"]) == 3 + len(meta["ref_keys"]) and meta["ref_keys"]
            assert [i["alt"] for i in row["imgs"][3:]] == meta["ref_keys"]
            vlm = "".join(t for c, t in row["spans"] if c == CAP_VLM)
            attr = "".join(t for c, t in row["spans"] if c == CAP_ATTR)
            assert vlm.startswith(meta["caption_vlm"].rstrip(".")) and attr.startswith(meta["caption_attributes"])
        else:
            assert len(row["imgs"]) == 1  # no mask, no references
            assert any(c == CAP_TEXT and t == s["txt"] for c, t in row["spans"])
    assert "not found" not in html


def test_sampling_is_seeded(pipeline_run, report, tmp_path):
    summary, _ = report
    same = inspect_output(pipeline_run["out"], str(tmp_path / "a.html"), samples=SAMPLES, seed=0)
    other = inspect_output(pipeline_run["out"], str(tmp_path / "b.html"), samples=SAMPLES, seed=1)
    assert same["sampled"] == summary["sampled"]
    assert other["sampled"] != summary["sampled"]
    assert (tmp_path / "a.html").read_bytes() == open(summary["html"], "rb").read()


def test_filters_by_identity_and_key(pipeline_run, shards, tmp_path):
    identity = sorted({s["json"]["identity"] for s in shards.values() if s["json"]["identity"]})[0]
    members = sorted(k for k, s in shards.items() if s["json"]["identity"] == identity)
    got = inspect_output(pipeline_run["out"], str(tmp_path / "i.html"), samples=50, identity=identity)
    assert got["matching"] == len(members) and sorted(got["sampled"]) == members
    rows = parse_rows((tmp_path / "i.html").read_text())
    assert {r["identity"] for r in rows} == {identity}

    got = inspect_output(pipeline_run["out"], str(tmp_path / "k.html"), samples=3, key="wds_*")
    assert got["matching"] == sum(k.startswith("wds_") for k in shards) and len(got["sampled"]) == 3
    assert all(k.startswith("wds_") for k in got["sampled"])

    one = sorted(shards)[0]
    assert inspect_output(pipeline_run["out"], str(tmp_path / "o.html"), key=one)["sampled"] == [one]
    none = inspect_output(pipeline_run["out"], str(tmp_path / "n.html"), identity="no such identity")
    assert none["sampled"] == [] and parse_rows((tmp_path / "n.html").read_text()) == []


def test_damaged_output_is_reported_not_fatal(pipeline_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(pipeline_run["out"], out)
    tar = out / "specific" / "000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 3])  # cut in the middle
    (out / "specific" / "000001.parquet").unlink()  # so the tar itself is read
    (out / "dead_letter" / "000000.jsonl").open("a").write("not json\n")
    summary = inspect_output(str(out), str(tmp_path / "r.html"), samples=40, seed=0)
    problems = "\n".join(summary["problems"])
    assert "specific/000001.tar: unreadable" in problems
    assert "dead_letter/000000.jsonl:2: not valid JSON" in problems
    assert summary["found"]["specific"] < summary["counts"]["specific"]
    html = (tmp_path / "r.html").read_text()
    assert 'id="problems"' in html and "specific/000001.tar: unreadable" in html


def test_not_an_output_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an output"):
        inspect_output(str(tmp_path), str(tmp_path / "r.html"))
    with pytest.raises(ValueError, match="samples"):
        inspect_output(str(tmp_path), str(tmp_path / "r.html"), samples=-1)


def test_caption_parts_mark_vlm_and_attribute_text():
    vlm, attr = "a woman in a park.", "a smiling young woman"
    caption = join_captions(vlm, attr)
    parts = caption_parts(caption, vlm, attr)
    assert "".join(t for t, _ in parts) == caption
    assert parts == [("a woman in a park", CAP_VLM), (". ", CAP_SEP), (attr, CAP_ATTR)]
    assert caption_parts("two houses", None, None) == [("two houses", CAP_TEXT)]
    assert caption_parts("a dog", "a dog", None) == [("a dog", CAP_VLM)]
    assert caption_parts("edited by hand", "a dog", "a smiling dog") == [("edited by hand", CAP_TEXT)]


def test_histogram_bins_and_bars():
    assert make_bins([3, 3, 5], integer=True).edges == (3.0, 4.0, 5.0, 6.0)
    wide = make_bins(list(range(0, 1000)), integer=True)
    assert len(wide.edges) - 1 <= 40 and wide.edges[0] == 0 and wide.edges[-1] >= 999
    flat = make_bins([1.0, 1.0], integer=False)
    assert len(flat.edges) == 2 and flat.index(1.0) == 0
    svg = histogram_svg("t", {"a": [1, 2, 2], "b": [2, 3]}, integer=True, x_label="x")
    assert svg.count("<rect") == 4 + 2  # bars: a@1, a@2, b@2, b@3; two legend swatches
    assert "2: 2 a" in svg and "<title>" in svg
    assert "no data" in histogram_svg("t", {"a": []}, integer=False, x_label="x")
    assert histogram_svg("t", {"a": [0.0, 1.0]}, integer=False, x_label="x", value_range=(0.0, 1.0)).count("<rect") == 2


def test_format_summary_names_counts_and_page(report):
    summary, _ = report
    text = format_summary(summary)
    assert f"specific {summary['found']['specific']}" in text and "reconciled" in text
    assert "decode: not a decodable image" in text and summary["html"] in text


def test_cli_inspect_writes_the_page(pipeline_run, tmp_path):
    from typer.testing import CliRunner

    from prep.cli import app

    page = tmp_path / "r.html"
    result = CliRunner().invoke(app, ["inspect", pipeline_run["out"], "--out", str(page), "--samples", "3", "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert page.exists() and "contact sheet: 3 of" in result.output
    assert len(parse_rows(page.read_text())) == 3
