"""Benchmark of the pairing step alone, at CelebA's real scale.

    python -m bench.pairing [--identity-file PATH] [--dim 768] [--k 4] [--limit N]

Inputs: CelebA's real identity file (202,599 images, 10,177 identities, 1 to 35 images each),
parsed with `prep.transforms.sources.read_identity_file`, and fake unit-norm float32
embeddings drawn from a seed (a chunk of rows per `default_rng([seed, chunk])`, so every
variant sees the same vectors without holding them twice).

Variants, each in a fresh process so that their peak RSS are separate:

  numpy  one process, no Beam: group rows by identity with numpy, `choose_refs` per key,
         refs gathered by fancy indexing. The floor for this work on one core.
  beam   `prep.transforms.pair.PairByIdentity` on Beam's in-memory FnApiRunner, fed minimal
         `Sample`s (key, source, domain, path, identity, embedding) made inside the pipeline.
         `--pair-shuffle files` (the default) pairs through files in a temporary folder, as
         every local `prep run` does (pipeline/run.py); `--pair-shuffle beam` through Beam's
         GroupByKey, as on Dataflow (and as every local run did before; with `--pair-impl`
         of an older pair.py, which has no `spill_dir`, use `beam`).
         (`--direct-running-mode multi_threading` is kept to show Beam's bug: at this size it
         lost 718 of 202,599 samples or failed with `Invalid PaneInfoEncoding`. The cause is
         Beam's, not PairByIdentity's: multi_threading workers flush their data streams from a
         timer thread (`data_buffer_time_limit_ms=1000`), which can cut an element between two
         data messages. With only `worker_handlers.DATA_BUFFER_TIME_LIMIT_MS = -1` patched in,
         the same run was complete and identical to numpy. bench/mt_repro.py reproduces it
         without prep; `prep run` refuses that mode.)

Both variants reduce every output to the same summary: the count, an order-independent
digest over all (key, ref_keys, refs bytes), and, for a deterministic sample of keys (about
one in `--check-every`), the ref keys and a hash of the refs. The parent compares the two, so
"identical" means identical for all samples (digest) and spot-checked key by key.

Prints one JSON line per variant, then one comparing beam with numpy.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from bench.common import current_rss_mb, emit, peak_rss_mb, quiet_beam_logging, run_isolated

DEFAULT_IDENTITY_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "celeba" / "identity_CelebA.txt.gz"
CHUNK = 1024  # rows per embedding-generation chunk (and per element of the Beam input)
_MASK64 = (1 << 64) - 1
VARIANTS = ("numpy", "beam")


# --------------------------------------------------------------------------------------
# Inputs, identical for every variant
# --------------------------------------------------------------------------------------


def load_rows(identity_file: str, limit: int | None) -> list[tuple[str, str]]:
    """[(image file name, identity id)] in the file's order, the first `limit` if given."""
    from prep.transforms.sources import read_identity_file

    by_name, _warnings = read_identity_file(identity_file)
    rows = list(by_name.items())
    return rows[:limit] if limit else rows


def sample_key(name: str) -> str:
    """The key the CelebA source gives `000001.jpg` (`celeba_000001`)."""
    from prep.schemas.records import make_key

    return make_key("celeba", name.rsplit(".", 1)[0])


def chunk_embeddings(seed: int, chunk: int, n: int, dim: int) -> np.ndarray:
    """Unit-norm float32 [n, dim] for rows chunk*CHUNK .. chunk*CHUNK+n-1."""
    rng = np.random.default_rng([seed, chunk])
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def chunks(rows: Sequence[tuple[str, str]]) -> list[tuple[int, list[tuple[str, str]]]]:
    return [(c, list(rows[start : start + CHUNK])) for c, start in enumerate(range(0, len(rows), CHUNK))]


def encode_chunk(chunk: tuple[int, list[tuple[str, str]]]) -> tuple[int, str]:
    """(index, rows) -> (index, "name identity" lines): flat, so `beam.Create` infers its type
    in O(chunks) (it walks nested values element by element: 3.6 s for 60k row tuples)."""
    c, part = chunk
    return c, "\n".join(f"{name} {identity}" for name, identity in part)


def decode_chunk(element: tuple[int, str]) -> tuple[int, list[tuple[str, str]]]:
    c, text = element
    return c, [tuple(line.split(" ", 1)) for line in text.split("\n")]


# --------------------------------------------------------------------------------------
# The summary both variants reduce their output to
# --------------------------------------------------------------------------------------


def refs_hash(refs: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(refs, dtype=np.float32).tobytes(), digest_size=8).digest()


def output_digest(key: str, ref_keys: Sequence[str], refs: np.ndarray) -> int:
    """A 64-bit hash of one output; summed mod 2**64 it is independent of output order."""
    h = hashlib.blake2b(digest_size=8)
    h.update("\0".join([key, *ref_keys]).encode("utf-8"))
    h.update(refs_hash(refs))
    h.update(str(refs.shape).encode())
    return int.from_bytes(h.digest(), "big")


def is_checked(key: str, every: int) -> bool:
    from prep.transforms.common import stable_hash

    return stable_hash(key, "bench-check") % every == 0


class Summary:
    """count, digest (sum of `output_digest` mod 2**64), singletons, and the checked keys."""

    def __init__(self, every: int):
        self.every = every
        self.count = 0
        self.digest = 0
        self.without_refs = 0
        self.checked: dict[str, list] = {}

    def add(self, key: str, ref_keys: Sequence[str], refs: np.ndarray) -> None:
        self.count += 1
        self.digest = (self.digest + output_digest(key, ref_keys, refs)) & _MASK64
        self.without_refs += not ref_keys
        if is_checked(key, self.every):
            self.checked[key] = [list(ref_keys), refs_hash(refs).hex()]

    def merge(self, other: Summary) -> Summary:
        self.count += other.count
        self.digest = (self.digest + other.digest) & _MASK64
        self.without_refs += other.without_refs
        self.checked.update(other.checked)
        return self

    def to_json(self) -> dict:
        return {"count": self.count, "digest": f"{self.digest:016x}", "without_refs": self.without_refs, "checked": self.checked}


# --------------------------------------------------------------------------------------
# Variant: plain numpy in one process
# --------------------------------------------------------------------------------------


def pair_numpy(
    keys: Sequence[str], identities: Sequence[str], embeddings: np.ndarray, k: int, seed: int
) -> Iterator[tuple[str, list[str], np.ndarray]]:
    """(key, ref_keys, refs[K, D]) per row: group rows by identity, `choose_refs` per key."""
    from prep.transforms.pair import choose_refs

    _, inverse = np.unique(np.asarray(identities), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.flatnonzero(np.diff(inverse[order])) + 1
    for rows in np.split(order, bounds):
        group = [keys[i] for i in rows]
        row_of = dict(zip(group, rows.tolist()))
        for key in group:
            ref_keys = choose_refs(key, group, k, seed)
            yield key, ref_keys, embeddings[[row_of[r] for r in ref_keys]]


def run_numpy(rows: list[tuple[str, str]], args) -> dict:
    start = time.perf_counter()
    keys = [sample_key(name) for name, _ in rows]
    identities = [identity for _, identity in rows]
    embeddings = np.empty((len(rows), args.dim), np.float32)
    for c, part in chunks(rows):
        embeddings[c * CHUNK : c * CHUNK + len(part)] = chunk_embeddings(args.seed, c, len(part), args.dim)
    inputs_s = time.perf_counter() - start
    summary = Summary(args.check_every)
    for key, ref_keys, refs in pair_numpy(keys, identities, embeddings, args.k, args.seed):
        summary.add(key, ref_keys, refs)
    return {"seconds": time.perf_counter() - start, "inputs_seconds": inputs_s, "summary": summary.to_json()}


# --------------------------------------------------------------------------------------
# Variant: PairByIdentity on the in-memory FnApiRunner
# --------------------------------------------------------------------------------------


def make_samples(element: tuple[int, str], dim: int, seed: int):
    """An encoded chunk -> minimal Samples with their seeded embeddings."""
    from prep.schemas.records import SPECIFIC, Sample

    c, part = decode_chunk(element)
    vectors = chunk_embeddings(seed, c, len(part), dim)
    for (name, identity), vector in zip(part, vectors):
        yield Sample(
            key=sample_key(name),
            source="celeba",
            domain=SPECIFIC,
            path=f"img_align_celeba/{name}",
            identity=identity,
            embedding=vector.copy(),
        )


def _summary_combine_fn(every: int):
    import apache_beam as beam

    class SummarizeOutputs(beam.CombineFn):
        def create_accumulator(self):
            return Summary(every)

        def add_input(self, acc, entry):
            if isinstance(entry, tuple):  # (key, Refs): the current PairByIdentity
                key, refs = entry
                acc.add(key, refs.ref_keys, refs.refs)
            else:  # a Sample with refs attached (earlier versions, via --pair-impl)
                acc.add(entry.key, entry.ref_keys, entry.refs)
            return acc

        def merge_accumulators(self, accs):
            accs = iter(accs)
            first = next(accs)
            for acc in accs:
                first.merge(acc)
            return first

        def extract_output(self, acc):
            return acc.to_json()

    return SummarizeOutputs()


def _write_json(value, path: str) -> None:
    import json

    with open(path, "w") as f:
        json.dump(value, f)


def load_pair_transform(path: str | None):
    """`PairByIdentity` from prep.transforms.pair, or from another file (to compare versions)."""
    if not path:
        from prep.transforms.pair import PairByIdentity

        return PairByIdentity
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_pair_impl", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # so Beam's pickler can refer to its DoFns by name
    spec.loader.exec_module(module)
    return module.PairByIdentity


def run_beam(rows: list[tuple[str, str]], args) -> dict:
    import json
    import tempfile

    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    PairByIdentity = load_pair_transform(args.pair_impl)
    beam_args = [f"--direct_running_mode={args.direct_running_mode}", f"--direct_num_workers={args.direct_num_workers}"]
    with tempfile.TemporaryDirectory(prefix="bench-pairing-") as tmp:
        out = os.path.join(tmp, "summary.json")
        pair_kwargs = {}
        if args.pair_shuffle == "files":  # as local `prep run`s pair (pipeline/run.py)
            pair_kwargs["spill_dir"] = os.path.join(tmp, "pair-spill")
            os.mkdir(pair_kwargs["spill_dir"])
        start = time.perf_counter()
        p = beam.Pipeline(runner=FnApiRunner(), options=PipelineOptions(beam_args))
        (
            p
            | "Chunks" >> beam.Create([encode_chunk(c) for c in chunks(rows)])
            | "MakeSamples" >> beam.FlatMap(make_samples, dim=args.dim, seed=args.seed)
            | "Pair" >> PairByIdentity(args.k, args.seed, args.dim, **pair_kwargs)
            | "Summarize" >> beam.CombineGlobally(_summary_combine_fn(args.check_every))
            | "WriteSummary" >> beam.Map(_write_json, path=out)
        )
        p.run().wait_until_finish()
        seconds = time.perf_counter() - start
        with open(out) as f:
            summary = json.load(f)
    return {"seconds": seconds, "summary": summary}


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------


def worker(args) -> None:
    """One variant in this process; prints its result as the last stdout line."""
    rows = load_rows(args.identity_file, args.limit)
    rss_before = current_rss_mb()
    result = (run_numpy if args.worker == "numpy" else run_beam)(rows, args)
    result.update(variant=args.worker, inputs=len(rows), rss_before_mb=round(rss_before, 1), peak_rss_mb_self=peak_rss_mb())
    emit(result)


def compare(numpy_summary: dict, beam_summary: dict) -> dict:
    shared = sorted(set(numpy_summary["checked"]) & set(beam_summary["checked"]))
    mismatched = [k for k in shared if numpy_summary["checked"][k] != beam_summary["checked"][k]]
    return {
        "same_count": numpy_summary["count"] == beam_summary["count"],
        "same_digest": numpy_summary["digest"] == beam_summary["digest"],
        "checked_keys": len(shared),
        "checked_keys_expected": len(numpy_summary["checked"]),
        "mismatched_keys": mismatched[:10],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pairing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--identity-file", default=str(DEFAULT_IDENTITY_FILE))
    parser.add_argument("--dim", type=int, default=768, help="embedding size (768: ViT-L-14)")
    parser.add_argument("--k", type=int, default=4, help="refs per sample")
    parser.add_argument("--limit", type=int, default=None, help="only the first N rows of the identity file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-every", type=int, default=100, help="spot-check about one key in N")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    parser.add_argument("--direct-running-mode", default="in_memory", choices=["in_memory", "multi_threading", "multi_processing"])
    parser.add_argument("--direct-num-workers", type=int, default=1)
    parser.add_argument("--pair-impl", default=None, help="a file defining PairByIdentity to run instead of prep's")
    parser.add_argument("--pair-shuffle", default="files", choices=["files", "beam"],
                        help="files: members spilled to local files, as local runs pair; beam: Beam's grouping, as on Dataflow")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        quiet_beam_logging()
        worker(args)
        return 0

    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s) {sorted(unknown)}; choose from {VARIANTS}")
    passthrough = [
        f"--identity-file={args.identity_file}", f"--dim={args.dim}", f"--k={args.k}", f"--seed={args.seed}",
        f"--check-every={args.check_every}", f"--direct-running-mode={args.direct_running_mode}",
        f"--direct-num-workers={args.direct_num_workers}", f"--pair-shuffle={args.pair_shuffle}",
    ] + ([f"--limit={args.limit}"] if args.limit else []) + ([f"--pair-impl={args.pair_impl}"] if args.pair_impl else [])
    results = {}
    for variant in variants:
        run = run_isolated("bench.pairing", [*passthrough, f"--worker={variant}"])
        r = run.result
        r["peak_rss_mb"] = run.peak_rss_mb
        results[variant] = r
        line = {
            "variant": variant + ("" if variant == "numpy" else f"[{args.direct_running_mode}x{args.direct_num_workers},{args.pair_shuffle}]"),
            "samples": r["summary"]["count"],
            "complete": r["summary"]["count"] == r["inputs"],
            "without_refs": r["summary"]["without_refs"],
            "dim": args.dim,
            "k": args.k,
            "seconds": round(r["seconds"], 2),
            "samples_per_s": round(r["summary"]["count"] / r["seconds"]),
            "process_seconds": round(run.seconds, 2),
            "rss_before_mb": r["rss_before_mb"],
            "peak_rss_mb": run.peak_rss_mb,
        }
        if "inputs_seconds" in r:
            line["inputs_seconds"] = round(r["inputs_seconds"], 2)
        emit(line)
    if not all(r["summary"]["count"] == r["inputs"] for r in results.values()):
        return 1  # a variant lost or duplicated samples (seen with --direct-running-mode multi_threading)
    if "numpy" in results and "beam" in results:
        n, b = results["numpy"], results["beam"]
        check = compare(n["summary"], b["summary"])
        identical = check["same_count"] and check["same_digest"] and not check["mismatched_keys"]
        emit({
            "comparison": "beam/numpy",
            "seconds_ratio": round(b["seconds"] / n["seconds"], 2),
            "peak_rss_ratio": round(b["peak_rss_mb"] / n["peak_rss_mb"], 2),
            "identical": identical,
            **check,
        })
        return 0 if identical else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
