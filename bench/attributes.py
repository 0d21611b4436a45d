"""The attribute probe at CelebA's scale: fit and predict on 202,599 embeddings of D = 768.

    python -m bench.attributes [--samples 202599] [--dim 768] [--attributes 40] [--rounds 3] [--threads 2]

Synthetic data (the probe's cost does not depend on what the embeddings mean): unit-norm
Gaussian embeddings, 40 attributes each a noisy linear rule with CelebA-like positive rates
(4% to 80%), split 80 / 10 / 10 as prep's identity-disjoint splits roughly are. Times, per
round: `fit` (the Gram matrix and one solve over the train split, Platt scaling and thresholds
on val), `predict` (probabilities for every embedding, as `prep run --attribute-model` does per
sample, here in one block) and per-sample `predict` over 2,000 single embeddings (the run's
path). Prints one JSON line per round and a summary (median, min-max). Target: fit < 60 s on
the 2-core development machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=202_599)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--attributes", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(args.threads)
    import numpy as np

    from prep.models.attribute_probe import fit

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.samples, args.dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    rules = rng.standard_normal((args.dim, args.attributes)).astype(np.float32)
    scores = x @ rules + 0.5 * rng.standard_normal((args.samples, args.attributes)).astype(np.float32)
    rates = np.linspace(0.04, 0.8, args.attributes)
    cut = np.array([np.quantile(scores[:, a], 1 - rates[a]) for a in range(args.attributes)], np.float32)
    y = scores > cut
    n_train, n_val = int(0.8 * args.samples), int(0.1 * args.samples)
    names = [f"attr_{i:02d}" for i in range(args.attributes)]
    fits, blocks, singles = [], [], []
    for round_ in range(args.rounds):
        start = time.perf_counter()
        probe = fit(x[:n_train], y[:n_train], x[n_train:n_train + n_val], y[n_train:n_train + n_val], names)
        fits.append(time.perf_counter() - start)
        start = time.perf_counter()
        probe.probabilities(x)
        blocks.append(time.perf_counter() - start)
        start = time.perf_counter()
        for row in x[:2000]:
            probe.predict(row)
        singles.append((time.perf_counter() - start) / 2000)
        balanced = statistics.median(r["balanced_accuracy"] for r in probe.report["attributes"].values())
        print(json.dumps({"round": round_, "fit_s": round(fits[-1], 2), "predict_all_s": round(blocks[-1], 2),
                          "predict_one_ms": round(1000 * singles[-1], 3), "median_balanced_accuracy": balanced}),
              flush=True)
    print(json.dumps({
        "samples": args.samples, "dim": args.dim, "attributes": args.attributes, "threads": args.threads,
        "fit_s": round(statistics.median(fits), 2), "fit_s_range": [round(min(fits), 2), round(max(fits), 2)],
        "predict_all_s": round(statistics.median(blocks), 2),
        "predict_one_ms": round(1000 * statistics.median(singles), 3),
        "target_fit_s": 60, "meets_target": statistics.median(fits) < 60,
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
