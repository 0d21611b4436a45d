"""CelebA-scale run: every row of CelebA's real identity file through `prep run --preset tiny`.

    python -m bench.celeba_scale [--rows N] [--size 44x54] [--workers 2] [--chunk-inputs 4000]
                                 [--caption-batch-size 32] [--data DIR] [--keep] [--validate]

The data: a `celeba:` folder with CelebA's real annotation files from ../shared/data/celeba
(the identity file, all 202,599 rows and 10,177 identities; the attribute file as it is there,
truncated to its first 20,000 rows, so most images have no attribute labels, a quirk the run
must survive) and one small generated JPEG per row (`--size`, default 44x54, a quarter of
CelebA's 178x218 per side): a per-identity colour with per-image noise, so no two images are
equal. Written once under `--data` (default: a temporary folder) and reused by a later run with
the same rows and size.

The run: `prep.pipeline.run.run(RunConfig(preset="tiny", workers=N, ...))` in a fresh process,
with the tiny captioner's batches at 32 (its cost is Python overhead per decoding step, so a
batch of 32 costs little more than one of 8)
(not timed: interpreter start and imports; timed: planning, the chunks, the stitch). Prints
one JSON line: images, seconds, images_per_s, peak_rss_mb (the largest process), and
peak_tree_rss_mb (all processes together, sampled), the manifest's counts and reconciliation,
and the output's size on disk. Exits non-zero unless every input is accounted for.

`--rows N` takes the first N rows (a quick check of the set-up; the figure in docs/benchmarks.md is
the whole file).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench.common import REPO_ROOT, current_rss_mb, emit, quiet_beam_logging, run_isolated

CELEBA = REPO_ROOT.parent / "shared" / "data" / "celeba"
IDENTITY_FILE = "identity_CelebA.txt"
ATTRIBUTE_FILE = "list_attr_celeba.txt"
COMPLETE = "_bench_complete.json"


def read_rows(limit: int | None) -> list[tuple[str, str]]:
    """(file name, identity) in the file's order (its header line skipped), the first `limit`."""
    rows = []
    with gzip.open(CELEBA / f"{IDENTITY_FILE}.gz", "rt") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 2 and parts[0].endswith(".jpg"):
                rows.append((parts[0], parts[1]))
                if limit and len(rows) == limit:
                    break
    return rows


def make_image(identity: int, index: int, size: tuple[int, int]) -> bytes:
    """A small JPEG: the identity's colour, a lighter oval, and noise drawn from (identity, index)."""
    import io

    from PIL import Image

    w, h = size
    base = np.random.default_rng([identity]).integers(40, 216, 3)
    rng = np.random.default_rng([identity, index])
    yy, xx = np.mgrid[0:h, 0:w]
    oval = ((xx - w / 2) / (w * 0.32)) ** 2 + ((yy - h / 2) / (h * 0.38)) ** 2 < 1
    pixels = np.empty((h, w, 3), np.float32)
    pixels[:] = base
    pixels[oval] = np.clip(base * 0.5 + 120, 0, 255)
    pixels += rng.normal(0, 18, pixels.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_data(root: Path, rows: list[tuple[str, str]], size: tuple[int, int]) -> dict:
    """The celeba: folder under `root` (reused when it was written with the same rows and size)."""
    folder = root / "celeba"
    wanted = {"rows": len(rows), "size": list(size), "last": rows[-1][0]}
    marker = folder / COMPLETE
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return {"celeba_dir": str(folder), "written_seconds": 0.0, "reused": True}
    shutil.rmtree(folder, ignore_errors=True)
    images = folder / "img_align_celeba"
    images.mkdir(parents=True)
    start = time.perf_counter()
    with open(folder / IDENTITY_FILE, "w") as f:
        f.write("".join(f"{name} {identity}\n" for name, identity in rows))
    with gzip.open(CELEBA / f"{ATTRIBUTE_FILE}.gz", "rb") as src, open(folder / ATTRIBUTE_FILE, "wb") as dst:
        shutil.copyfileobj(src, dst)
    for i, (name, identity) in enumerate(rows):
        (images / name).write_bytes(make_image(int(identity), i, size))
    marker.write_text(json.dumps(wanted))
    return {"celeba_dir": str(folder), "written_seconds": round(time.perf_counter() - start, 1), "reused": False}


def folder_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20, 1)


def worker(spec: dict) -> None:
    from prep.pipeline.config import RunConfig
    from prep.pipeline.run import run

    base = current_rss_mb()
    start = time.perf_counter()
    manifest = run(RunConfig(**spec["config"]), [])
    emit({"seconds": time.perf_counter() - start, "counts": manifest["counts"], "reconciled": manifest["reconciled"],
          "shards": len(manifest["shards"]), "base_rss_mb": round(base, 1),
          "dead_letter_reasons": manifest.get("dead_letter_reasons", {})})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.celeba_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=None, help="only the first N rows (default: all 202,599)")
    parser.add_argument("--size", default="44x54", help="generated image size WxH")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunk-inputs", type=int, default=None, help="prep run --chunk-inputs (default: RunConfig's)")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--caption-batch-size", type=int, default=32,
                        help="prep run --caption-batch-size (the tiny captioner's cost is per decoding step)")
    parser.add_argument("--data", default=None, help="where the generated data is (kept; reused when it matches)")
    parser.add_argument("--model-cache", default=None, help="where the tiny models are built")
    parser.add_argument("--keep", action="store_true", help="keep the output")
    parser.add_argument("--validate", action="store_true", help="then run prep validate on the output (not timed)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    quiet_beam_logging()
    if args.worker:
        worker(json.loads(Path(args.worker).read_text()))
        return 0

    from prep.models.tiny import ensure_tiny_models

    size = tuple(int(v) for v in args.size.lower().split("x"))
    scratch = Path(tempfile.mkdtemp(prefix="bench-celeba-scale-"))
    data_root = Path(args.data) if args.data else scratch
    model_cache = args.model_cache or str(scratch / "models")
    ensure_tiny_models(model_cache)
    rows = read_rows(args.rows)
    data = write_data(data_root, rows, size)
    out = scratch / "out"
    config = {"inputs": [f"celeba:{data['celeba_dir']}"], "out": str(out), "preset": "tiny",
              "model_cache": model_cache, "workers": args.workers, "samples_per_shard": args.samples_per_shard,
              "caption_batch_size": args.caption_batch_size,
              **({"chunk_inputs": args.chunk_inputs} if args.chunk_inputs is not None else {})}
    spec = scratch / "spec.json"
    spec.write_text(json.dumps({"config": config}))
    try:
        run = run_isolated("bench.celeba_scale", [f"--worker={spec}"])
        r = run.result
        line = {
            "rows": len(rows), "identities": len({i for _, i in rows}), "image_size": list(size),
            "workers": args.workers, "chunk_inputs": args.chunk_inputs,
            "images": r["counts"]["inputs"], "written": r["counts"]["specific"] + r["counts"]["general"],
            "dead_lettered": r["counts"]["dead_lettered"], "shards": r["shards"],
            "seconds": round(r["seconds"], 1), "images_per_s": round(r["counts"]["inputs"] / r["seconds"], 1),
            "peak_rss_mb": run.peak_rss_mb, "peak_tree_rss_mb": run.peak_tree_rss_mb,
            "base_rss_mb": r["base_rss_mb"], "reconciled": r["reconciled"], "output_mb": folder_mb(out),
            "data_written_seconds": data["written_seconds"], "dead_letter_reasons": r["dead_letter_reasons"],
        }
        if args.validate:
            from prep.schemas.validate import validate_output

            start = time.perf_counter()
            report = validate_output(str(out))
            line.update(validate_ok=report.ok, validate_seconds=round(time.perf_counter() - start, 1))
        emit(line)
        complete = r["reconciled"] and r["counts"]["inputs"] == len(rows)
        return 0 if complete and line.get("validate_ok", True) else 1
    finally:
        if args.keep:
            print(f"kept {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(out, ignore_errors=True)
            if not args.data:
                shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
