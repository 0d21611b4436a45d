"""End-to-end benchmark: images/s and peak memory of a whole `prep run --preset tiny`.

    python -m bench.e2e --identities 20 --images-per-identity 10 [--general-shards 2]
                        [--scale 1 10] [--workers 1] [--direct-running-mode in_memory] [--direct-num-workers 1]

For each scale S the parent writes demo data (`prep.demo.write_demo_data`) with S times the
identities and S times the general shards, then runs `prep.pipeline.run.run(RunConfig(...))`
in a fresh process, so the peak RSS of one run is not the leftover of another. The tiny models
are built once beforehand (not timed). Prints one JSON line per scale:

    {"scale", "images", "seconds", "images_per_s", "peak_rss_mb", "peak_tree_rss_mb", ...}

`seconds` is the `run()` call only (planning included, interpreter start and imports not);
`peak_rss_mb` is the kernel's peak for the run's process (the largest process, for a
multi-process runner); `peak_tree_rss_mb` is the sampled peak of all its processes together;
`base_rss_mb` is the process's RSS after imports, before `run()`. With two or more scales it
then prints how RSS grew against the data (`rss_ratio` vs `data_ratio`; the target is
rss_ratio <= 1.3 for 100x data) and the slope, `kb_per_extra_image`.

Large scales run in chunks, as every local `prep run` does (`--chunk-inputs`, default
RunConfig's 4,000; pipeline/chunks.py): `--chunk-inputs 0` measures one job instead, whose
memory grows with the data (~80 KB per image on the tiny preset).

`--workers N` runs it as `prep run --workers N` does (N SDK worker processes, Beam's
multi_processing mode, per-worker thread counts; pipeline/local.py); compare `--workers 2`
with `--workers 1` for the speed-up on a CPU-bound run.

Exits non-zero if a run's manifest is not reconciled (inputs != written + dead-lettered).
(`--direct-running-mode multi_threading` is refused by `run()`: Beam splits elements between
data messages there; see bench/mt_repro.py.)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import current_rss_mb, emit, peak_rss_mb, quiet_beam_logging, run_isolated


def make_data(root: Path, args, scale: int) -> dict:
    from prep.demo import write_demo_data

    return write_demo_data(
        str(root / f"demo-x{scale}"),
        identities=args.identities * scale,
        images_per_identity=args.images_per_identity,
        general_shards=args.general_shards * scale,
        general_per_shard=args.general_per_shard,
        seed=args.seed,
        overwrite=True,
    )


def worker(spec: dict) -> None:
    """Runs one `run()` from a JSON spec; prints the measurements as the last stdout line."""
    import torch  # noqa: F401  (imported by the model stages anyway: count it in the base)
    from prep.pipeline.config import RunConfig
    from prep.pipeline.run import run

    base = current_rss_mb()
    config = RunConfig(**spec["config"])
    start = time.perf_counter()
    manifest = run(config, spec["beam_args"])
    seconds = time.perf_counter() - start
    emit({
        "seconds": seconds,
        "counts": manifest["counts"],
        "reconciled": manifest["reconciled"],
        "base_rss_mb": round(base, 1),
        "peak_rss_mb_self": peak_rss_mb(),
    })


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n\n")[0])
    parser.add_argument("--identities", type=int, default=20)
    parser.add_argument("--images-per-identity", type=int, default=10)
    parser.add_argument("--general-shards", type=int, default=1)
    parser.add_argument("--general-per-shard", type=int, default=20)
    parser.add_argument("--scale", type=int, nargs="+", default=[1], help="data multipliers, e.g. --scale 1 10")
    parser.add_argument("--samples-per-shard", type=int, default=100)
    parser.add_argument("--refs-per-sample", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--direct-running-mode", default="in_memory", choices=["in_memory", "multi_threading", "multi_processing"])
    parser.add_argument("--direct-num-workers", type=int, default=1)
    parser.add_argument("--workers", type=int, default=None, help="prep run --workers N (overrides --direct-*)")
    parser.add_argument("--chunk-inputs", type=int, default=None, help="prep run --chunk-inputs N (0: one job)")
    parser.add_argument("--decoded-cache-mb", type=int, default=None, help="prep run --decoded-cache-mb N")
    parser.add_argument("--model-cache", default=None, help="where the tiny models are built (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the demo data and outputs")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    quiet_beam_logging()
    if args.worker:
        worker(json.loads(Path(args.worker).read_text()))
        return 0

    from prep.models.tiny import ensure_tiny_models

    root = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    model_cache = args.model_cache or str(root / "models")
    ensure_tiny_models(model_cache)
    beam_args = [f"--direct_running_mode={args.direct_running_mode}", f"--direct_num_workers={args.direct_num_workers}"]
    if args.workers is not None:
        beam_args = []
    runner = f"workers={args.workers}" if args.workers is not None else f"{args.direct_running_mode}x{args.direct_num_workers}"
    lines = []
    try:
        for scale in args.scale:
            demo = make_data(root, args, scale)
            inputs = [f"celeba:{demo['celeba_dir']}"] + ([f"wds:{demo['general_pattern']}"] if demo["general_pattern"] else [])
            spec = {
                "config": {
                    "inputs": inputs,
                    "out": str(root / f"out-x{scale}"),
                    "preset": "tiny",
                    "model_cache": model_cache,
                    "samples_per_shard": args.samples_per_shard,
                    "refs_per_sample": args.refs_per_sample,
                    "overwrite": True,
                    **({"workers": args.workers} if args.workers is not None else {}),
                    **({"chunk_inputs": args.chunk_inputs} if args.chunk_inputs is not None else {}),
                    **({"decoded_cache_mb": args.decoded_cache_mb} if args.decoded_cache_mb is not None else {}),
                },
                "beam_args": beam_args,
            }
            spec_path = root / f"spec-x{scale}.json"
            spec_path.write_text(json.dumps(spec))
            run = run_isolated("bench.e2e", [f"--worker={spec_path}"])
            r = run.result
            images = r["counts"]["inputs"]
            line = {
                "scale": scale,
                "runner": runner,
                "images": images,
                "specific": r["counts"]["specific"],
                "general": r["counts"]["general"],
                "seconds": round(r["seconds"], 2),
                "images_per_s": round(images / r["seconds"], 2),
                "peak_rss_mb": run.peak_rss_mb,
                "peak_tree_rss_mb": run.peak_tree_rss_mb,
                "base_rss_mb": r["base_rss_mb"],
                "reconciled": r["reconciled"],
            }
            lines.append(line)
            emit(line)
            if not args.keep:
                shutil.rmtree(root / f"demo-x{scale}", ignore_errors=True)
                shutil.rmtree(root / f"out-x{scale}", ignore_errors=True)
    finally:
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    if len(lines) >= 2:
        emit(compare(lines[0], lines[-1]))
    return 0 if all(line["reconciled"] for line in lines) else 1


def compare(first: dict, last: dict) -> dict:
    """How peak memory grew from the smallest to the largest scale, against the data.

    `rss_ratio` is what the target is about (<= 1.3x at 100x data, chunked); `kb_per_extra_image` is the slope, which is
    what decides the memory at a real dataset's size (the base is imports and models).
    """
    extra_images = last["images"] - first["images"]
    return {
        "comparison": f"x{last['scale']}/x{first['scale']}",
        "data_ratio": round(last["images"] / first["images"], 2),
        "rss_ratio": round(last["peak_rss_mb"] / first["peak_rss_mb"], 2),
        "tree_rss_ratio": round(last["peak_tree_rss_mb"] / first["peak_tree_rss_mb"], 2),
        "rss_above_base_ratio": round(
            (last["peak_rss_mb"] - first["base_rss_mb"]) / max(first["peak_rss_mb"] - first["base_rss_mb"], 1e-9), 2
        ),
        "kb_per_extra_image": round((last["peak_rss_mb"] - first["peak_rss_mb"]) * 1024 / max(extra_images, 1), 1),
        "images_per_s_ratio": round(last["images_per_s"] / first["images_per_s"], 2),
    }


if __name__ == "__main__":
    sys.exit(main())
