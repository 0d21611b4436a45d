"""What augmented refs cost per singleton: a tiny-preset run over an LSUN-layout database with
`--singleton-refs none` against the same run with `augment` (K views per record), interleaved.

    python -m bench.singleton_refs [--records 200] [--k 2] [--rounds 3] [--threads 2]

Each run is a fresh `prep run` process (interpreter start and model load included in both
arms, so they cancel in the difference), one worker, thread counts fixed. Prints one JSON line
per run, then the summary: median seconds per arm, the extra seconds per singleton
((augment - none) / records), and the same per view; min-max over the rounds as the spread.
What it costs is K more images through mask and embed per singleton (plus making the views);
caption and the identity step do not see views.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    from bench.common import fixed_threads, timed_prep_run
    from prep.demo import write_demo_data
    from prep.models.tiny import ensure_tiny_models

    work = tempfile.mkdtemp(prefix="bench-singleton-")
    cache = os.path.join(work, "models")
    ensure_tiny_models(cache)
    data = write_demo_data(os.path.join(work, "data"), identities=1, images_per_identity=1, general_shards=0,
                           lsun_records=args.records)
    env = {**os.environ, **fixed_threads(args.threads)}
    times: dict[str, list[float]] = {"none": [], "augment": []}
    for round_ in range(args.rounds):
        for arm in ("none", "augment"):
            out = os.path.join(work, f"out-{arm}-{round_}")
            cmd = ["--input", f"lsun:{data['lsun_dir']}", "--preset", "tiny", "--model-cache", cache, "--out", out,
                   "--workers", "1", "--no-progress", "--singleton-refs", arm, "--singleton-refs-k", str(args.k)]
            seconds = timed_prep_run(cmd, env)
            times[arm].append(seconds)
            print(json.dumps({"round": round_, "arm": arm, "records": args.records, "k": args.k,
                              "seconds": round(seconds, 2)}), flush=True)
    none, aug = statistics.median(times["none"]), statistics.median(times["augment"])
    per = [(a - n) / args.records for a, n in zip(times["augment"], times["none"])]
    print(json.dumps({
        "records": args.records, "k": args.k, "none_s": round(none, 2), "augment_s": round(aug, 2),
        "ratio": round(aug / none, 3), "extra_ms_per_singleton": round(1000 * statistics.median(per), 1),
        "extra_ms_per_singleton_range": [round(1000 * min(per), 1), round(1000 * max(per), 1)],
        "extra_ms_per_view": round(1000 * statistics.median(per) / args.k, 1),
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
