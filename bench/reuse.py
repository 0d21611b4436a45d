"""What `--reuse PREV_OUT` saves: a tiny-preset run, then three reruns with --reuse, each
against a fresh run of the same configuration.

    python -m bench.reuse [--identities 220] [--images-per-identity 10] [--rounds 1] [--threads 2]

(a) nothing changed; (b) the caption prompt changed (with --caption-on-bad keep: the tiny
captioner runs into the token limit under any prompt); (c) 10% of the images replaced by other
pictures. For each, the fresh run and the --reuse run are timed back to back (fresh first), each
in a fresh `prep run` process, one worker, thread counts fixed; the shards of the two are
checked byte-identical. Targets (docs/benchmarks.md): (a) >= 5x faster than fresh; (b) no slower
than the fresh run's caption stage + 25%; (c) within 1.3x of a fresh run over only the changed
10% plus a read of the rest. Prints one JSON line per run and a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path


def _same_shards(a: Path, b: Path) -> bool:
    names = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name not in ("manifest.json", "_run.json"))
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--identities", type=int, default=220)
    parser.add_argument("--images-per-identity", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    from bench.common import fixed_threads, timed_prep_run
    from prep.demo import write_demo_data
    from prep.models.tiny import ensure_tiny_models

    work = Path(tempfile.mkdtemp(prefix="bench-reuse-"))
    cache = str(work / "models")
    ensure_tiny_models(cache)
    data = write_demo_data(str(work / "data"), identities=args.identities, images_per_identity=args.images_per_identity,
                           general_shards=0, lsun_records=0, seed=4)
    changed = work / "changed"  # 10% of the images replaced by other pictures (a rotation of the file list)
    shutil.copytree(data["celeba_dir"], changed)
    images = sorted((changed / "img_align_celeba").glob("*.jpg"))
    picked = images[:: 10]
    contents = [p.read_bytes() for p in picked]
    for path, content in zip(picked, contents[1:] + contents[:1]):
        path.write_bytes(content)
    env = {**os.environ, **fixed_threads(args.threads)}
    base = ["--preset", "tiny", "--model-cache", cache, "--workers", "1", "--no-progress", "--overwrite"]
    prev = work / "prev"
    first = timed_prep_run(["--input", f"celeba:{data['celeba_dir']}", "--out", str(prev), *base], env)
    print(json.dumps({"run": "prev", "images": len(images), "seconds": round(first, 2)}), flush=True)
    cases = {
        "a_nothing_changed": (data["celeba_dir"], []),
        "b_caption_prompt": (data["celeba_dir"], ["--caption-prompt", "a picture showing", "--caption-on-bad", "keep"]),
        "c_10pct_replaced": (str(changed), []),
    }
    results: dict[str, dict[str, list[float]]] = {name: {"fresh": [], "reuse": []} for name in cases}
    for round_ in range(args.rounds):
        for name, (celeba, extra) in cases.items():
            fresh, reused = work / f"{name}-fresh", work / f"{name}-reuse"
            t_fresh = timed_prep_run(["--input", f"celeba:{celeba}", "--out", str(fresh), *base, *extra], env)
            t_reuse = timed_prep_run(["--input", f"celeba:{celeba}", "--out", str(reused), *base, *extra, "--reuse", str(prev)], env)
            same = _same_shards(fresh, reused)
            stages = json.loads((reused / "manifest.json").read_text())["reused_from"]["stages"]
            results[name]["fresh"].append(t_fresh)
            results[name]["reuse"].append(t_reuse)
            print(json.dumps({"round": round_, "case": name, "fresh_s": round(t_fresh, 2), "reuse_s": round(t_reuse, 2),
                              "speedup": round(t_fresh / t_reuse, 2), "byte_identical": same, "stages": stages}),
                  flush=True)
            if not same:
                print(f"{name}: the --reuse output differs from the fresh one", file=sys.stderr)
                return 1
    summary = {name: {"fresh_s": round(statistics.median(r["fresh"]), 2), "reuse_s": round(statistics.median(r["reuse"]), 2),
                      "speedup": round(statistics.median(r["fresh"]) / statistics.median(r["reuse"]), 2)}
               for name, r in results.items()}
    print(json.dumps({"images": len(images), "summary": summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
