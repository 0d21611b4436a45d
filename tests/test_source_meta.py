"""Web samples stay traceable: img2dataset's KEY.json kept verbatim as `source_meta` (capped),
the parquet sidecar's `url` column, and `--exclude FILE` takedowns by URL, key and sha256."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from prep.schemas.contract import SOURCE_META_DROPPED, SOURCE_META_MAX_BYTES
from prep.transforms.sources.readers import capped_source_meta, parse_source_meta


def test_metadata_under_the_cap_is_kept_as_it_came():
    meta = {"url": "https://x.invalid/a.jpg", "sha256": "ab" * 32, "exif": {"Image Make": "Canon"}, "width": 3}
    assert parse_source_meta(json.dumps(meta).encode()) == meta


def test_over_the_cap_the_largest_fields_go_first_and_are_named():
    meta = {"url": "https://x.invalid/a.jpg", "sha256": "ab" * 32, "exif": "x" * (SOURCE_META_MAX_BYTES + 10),
            "caption": "y" * 2000, "width": 3}
    capped = capped_source_meta(meta)
    assert capped[SOURCE_META_DROPPED] == ["exif"]
    assert {k: v for k, v in capped.items() if k != SOURCE_META_DROPPED} == {k: v for k, v in meta.items() if k != "exif"}
    assert len(json.dumps(capped, sort_keys=True).encode()) <= SOURCE_META_MAX_BYTES


def test_nan_and_infinity_become_null_so_key_json_stays_json():
    assert parse_source_meta(b'{"width": NaN, "height": Infinity, "url": "u"}') == {"width": None, "height": None, "url": "u"}


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b"\xff\xfe", b'"a string"'])
def test_a_json_member_that_is_not_an_object_gives_none(raw):
    assert parse_source_meta(raw) is None


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def img2dataset_tar(path: Path, n: int) -> list[dict]:
    """A tar as img2dataset writes one, with its JSON fields (exif included)."""
    metas = []
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            key = f"{i:09d}"
            image = _jpeg(i)
            meta = {"url": f"https://example.invalid/photos/{i}.jpg", "key": key, "status": "success",
                    "error_message": None, "width": 80, "height": 64, "original_width": 800, "original_height": 640,
                    "exif": {"Image Make": "Canon", "Image Model": f"EOS {i}"},
                    "sha256": hashlib.sha256(image).hexdigest(), "caption": f"photo number {i}"}
            metas.append(meta)
            for name, data in ((f"{key}.jpg", image), (f"{key}.txt", meta["caption"].encode()),
                               (f"{key}.json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return metas


def _run(inputs: list[str], out: Path, tiny_cache: str, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "prep.cli", "run", *[a for spec in inputs for a in ("--input", spec)],
            "--preset", "tiny", "--model-cache", tiny_cache, "--out", str(out), "--no-progress", "--workers", "1",
            *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=600)


def _written(out: Path) -> dict[str, dict]:
    import webdataset as wds

    found = {}
    for tar in sorted(out.rglob("*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False):
            found[s["__key__"]] = json.loads(s["json"])
    return found


@pytest.fixture(scope="module")
def web(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("web")
    metas = img2dataset_tar(root / "00000.tar", 6)
    return root, metas


@pytest.mark.slow
def test_source_metadata_round_trips_and_the_sidecar_has_the_url(web, tiny, tiny_cache, tmp_path):
    root, metas = web
    out = tmp_path / "out"
    proc = _run([f"wds:{root}"], out, tiny_cache)
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = _written(out)
    assert {k: m["source_meta"] for k, m in written.items()} == {f"wds_{m['key']}": m for m in metas}
    table = pq.read_table(out / "general" / "000000.parquet").to_pydict()
    assert dict(zip(table["key"], table["url"])) == {f"wds_{m['key']}": m["url"] for m in metas}
    from prep.schemas.validate import validate_output

    assert validate_output(str(out)).ok


@pytest.mark.slow
def test_exclude_drops_by_url_key_and_sha256_and_counts_reconcile(web, demo, tiny, tiny_cache, tmp_path):
    root, metas = web
    celeba_file = sorted(Path(demo["celeba_dir"], "img_align_celeba").glob("*.jpg"))[0]
    listed = tmp_path / "takedowns.txt"
    listed.write_text("\n".join([
        "# takedown requests",
        metas[0]["url"],                      # by URL (img2dataset's json)
        f"wds_{metas[1]['key']}",             # by sample key
        metas[2]["sha256"].upper(),           # by img2dataset's sha256, any case
        hashlib.sha256(celeba_file.read_bytes()).hexdigest(),  # by the file's own sha256
        "https://example.invalid/never-seen.jpg",
        metas[4]["key"],                      # a bare img2dataset key: repeats across downloads, never matched
        "",
    ]))
    inputs = [f"wds:{root}", f"celeba:{demo['celeba_dir']}"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert _run(inputs, full, tiny_cache).returncode == 0
    proc = _run(inputs, cut, tiny_cache, "--exclude", str(listed))
    assert proc.returncode == 0, proc.stderr[-2000:]
    gone = {f"wds_{metas[i]['key']}" for i in range(3)} | {f"celeba_{celeba_file.stem}"}
    assert set(_written(full)) - set(_written(cut)) == gone
    manifest = json.loads((cut / "manifest.json").read_text())
    before = json.loads((full / "manifest.json").read_text())
    assert manifest["reconciled"] and manifest["counts"]["inputs"] == before["counts"]["inputs"]
    assert manifest["dead_letter_reasons"]["ingest: excluded"] == 4
    letters = [json.loads(line) for line in (cut / "dead_letter" / "000000.jsonl").read_text().splitlines()]
    reasons = {d["key"]: d["reason"] for d in letters if d["kind"] == "excluded"}
    assert set(reasons) == gone
    assert metas[0]["url"] in reasons[f"wds_{metas[0]['key']}"]
    assert "sha256" in reasons[f"wds_{metas[2]['key']}"]


def test_an_unreadable_exclude_list_stops_the_run_before_out_is_touched(web, tiny_cache, tmp_path):
    root, _ = web
    out = tmp_path / "out"
    proc = _run([f"wds:{root}"], out, tiny_cache, "--exclude", str(tmp_path / "missing.txt"))
    assert proc.returncode == 2 and "--exclude" in proc.stderr and "missing.txt" in proc.stderr, proc.stderr
    assert not out.exists()
