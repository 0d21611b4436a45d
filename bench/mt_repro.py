"""Minimal reproduction, with no prep code, of Beam's `--direct_running_mode=multi_threading`
losing and garbling elements.

    python -m bench.mt_repro [--elements 50000] [--modes in_memory,multi_threading,...]

The cause (apache-beam 2.77, read in its source):

1. In multi_threading mode the FnApiRunner runs its SDK workers as threads of its own process
   (`EmbeddedGrpcWorkerHandler`) and starts them with `data_buffer_time_limit_ms=1000`
   (`worker_handlers.DATA_BUFFER_TIME_LIMIT_MS`: `config.get(...) or 1000`, and the runner
   builds that environment itself, `EmbeddedPythonGrpcEnvironment.default()`, so no pipeline
   option changes it). multi_processing workers (`sdk_worker_main`, unless the experiment
   `data_buffer_time_limit_ms=N` is given) and the in_memory worker use 0: size-based
   flushing only, at element boundaries.
2. With a time limit above 0 every data output stream is a
   `data_plane.TimeBasedBufferingClosableOutputStream`: a `PeriodicThread` calls `flush()` every
   second, which sends whatever bytes the buffer holds as one `Elements.Data` message.
3. The writer does not hold that lock while it encodes: `DataOutputOperation.process` calls
   `windowed_coder_impl.encode_to_stream(value, stream)` and then `maybe_flush()` (whose own
   comment says it "must be called explicitly to avoid flushing partial elements"). An element
   is written in several pieces (window, timestamp, pane, then e.g. a tuple's fields one by
   one); whenever the encoder runs Python code between two pieces (a `__reduce__`, the pickle
   fallback of a dataclass, ...) the GIL can pass to the flusher thread, and the message it
   sends ends with half an element. The next message starts with the other half.
4. Both ends decode every `Data` message on its own (`GroupingBuffer.append` on the runner,
   `DataInputOperation.process_encoded` on the worker), and with several workers
   `ListBuffer.partition` deals the raw messages round-robin, so the two halves even go to
   different workers. Cython's `InputStream.read` past the end of a message returns padding
   instead of raising, so a split element is mostly not an error: it decodes into a garbled
   value, or the misaligned decode swallows the elements after it (lost). Sometimes the decode
   does fail (`Invalid PaneInfoEncoding`), which is the lucky case.

So the loss is Beam's, not a thread-safety bug of the pipeline's code: this script's DoFns
are pure functions of their input. It needs only that an element's encoding runs some Python
code (here a `fractions.Fraction`, pickled through its Python `__reduce__`), and time: the
flusher fires once a second, so the longer the run, the more split elements.

Modes (each in a fresh process): `in_memory`, `multi_threading` (with `--workers`),
`multi_threading_1` (one worker: the split happens without any parallelism),
`multi_threading_noflush` (multi_threading with `DATA_BUFFER_TIME_LIMIT_MS` patched to -1,
i.e. size-based flushing as in the other modes: the only change, and the loss goes away),
`multi_processing` (with `--workers`).

Measured (2 shared cores, under load, 50,000 elements): with one Fraction per element
(`--fractions 1`) multi_threading x2 lost 2,511 and garbled 1 silently, and multi_threading
x1 failed with `Invalid PaneInfoEncoding: 3`; on a quieter minute the same runs were clean
(about 3 s each: three timer flushes). With the default 16, both multi_threading runs failed
with `Invalid PaneInfoEncoding: 3` in both tries, while in_memory, multi_processing x2 and
multi_threading_noflush x2 delivered all 50,000 intact.

Each mode prints one JSON line: received, lost (planned keys never seen intact), garbled
(elements seen whose value is not the planned one, or whose key is not a planned key),
duplicated, or the error the run raised. Exit status 1 if any mode lost or garbled anything.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from fractions import Fraction

MODES = ("in_memory", "multi_threading_1", "multi_threading", "multi_threading_noflush", "multi_processing")
CHUNK = 1000


FRACTIONS = int(os.environ.get("MT_REPRO_FRACTIONS", "16"))  # set by --fractions, read in every worker


def planned(i: int) -> tuple[str, dict]:
    """Element i: a key and a value whose pickling runs Python code (Fraction.__reduce__)."""
    blob = hashlib.blake2b(i.to_bytes(8, "big")).digest() * 8  # 512 bytes
    fracs = [Fraction(i, k) for k in range(1, FRACTIONS + 1)]  # one pickle call each, through Python code
    return f"k{i:09d}", {"i": i, "blob": blob, "fracs": fracs, "tail": [i, str(i)]}


def elements_of_chunk(c: int, n: int):
    for i in range(c * CHUNK, min(n, (c + 1) * CHUNK)):
        yield planned(i)


def bucket(kv):
    key, _value = kv
    return key[-3:], kv  # 1000 groups: one shuffle, as in any grouping step


def ungroup(kv):
    _bucket, members = kv
    yield from members


def check(kv):
    """-> (index or -1, intact): the element as the consumer sees it, against the plan."""
    try:
        key, value = kv
        i = int(key[1:])
        return i, planned(i) == (key, value)
    except Exception:  # noqa: BLE001 - a garbled element may not even unpack
        return -1, False


def summarize(results, out_path: str) -> None:
    seen: dict[int, int] = {}
    garbled = 0
    for i, ok in results:
        if ok:
            seen[i] = seen.get(i, 0) + 1
        else:
            garbled += 1
    with open(out_path, "w") as f:
        json.dump({"intact": sorted(seen), "duplicated": sum(c - 1 for c in seen.values()), "garbled": garbled}, f)


def run_mode(mode: str, workers: int, n: int) -> dict:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner, worker_handlers

    running_mode, num_workers = {
        "in_memory": ("in_memory", 1),
        "multi_threading_1": ("multi_threading", 1),
        "multi_threading": ("multi_threading", workers),
        "multi_threading_noflush": ("multi_threading", workers),
        "multi_processing": ("multi_processing", workers),
    }[mode]
    if mode == "multi_threading_noflush":
        worker_handlers.DATA_BUFFER_TIME_LIMIT_MS = -1  # <= 0: SizeBasedBufferingClosableOutputStream
    options = PipelineOptions([f"--direct_running_mode={running_mode}", f"--direct_num_workers={num_workers}"])
    with tempfile.TemporaryDirectory(prefix="mt-repro-") as tmp:
        out = os.path.join(tmp, "summary.json")
        start = time.perf_counter()
        try:
            p = beam.Pipeline(runner=FnApiRunner(), options=options)
            (
                p
                | "Chunks" >> beam.Create(list(range((n + CHUNK - 1) // CHUNK)))
                | "Make" >> beam.FlatMap(elements_of_chunk, n=n)
                | "Bucket" >> beam.Map(bucket)
                | "Group" >> beam.GroupByKey()
                | "Ungroup" >> beam.FlatMap(ungroup)
                | "Check" >> beam.Map(check)
                | "All" >> beam.combiners.ToList()
                | "Summarize" >> beam.Map(summarize, out_path=out)
            )
            p.run().wait_until_finish()
        except Exception as exc:  # noqa: BLE001 - a failed run is a result here
            return {"mode": mode, "workers": num_workers, "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]}",
                    "seconds": round(time.perf_counter() - start, 1)}
        seconds = time.perf_counter() - start
        with open(out) as f:
            summary = json.load(f)
    intact = summary["intact"]
    return {
        "mode": mode, "workers": num_workers, "planned": n, "received": len(intact) + summary["duplicated"] + summary["garbled"],
        "lost": n - len(intact), "garbled": summary["garbled"], "duplicated": summary["duplicated"],
        "seconds": round(seconds, 1),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mt_repro", description=__doc__.split("\n\n")[0])
    parser.add_argument("--elements", type=int, default=50_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--fractions", type=int, default=16,
                        help="Fractions per element: more Python code inside each element's encoding, more splits")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        import logging

        logging.getLogger("apache_beam").setLevel(logging.ERROR)
        print(json.dumps(run_mode(args.one, args.workers, args.elements)), flush=True)
        return 0
    bad = False
    for mode in [m for m in args.modes.split(",") if m]:
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}; choose from {MODES}")
        proc = subprocess.run(
            [sys.executable, "-m", "bench.mt_repro", f"--one={mode}", f"--workers={args.workers}", f"--elements={args.elements}"],
            capture_output=True, text=True, env={**os.environ, "MT_REPRO_FRACTIONS": str(args.fractions)},
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        result = json.loads(lines[-1]) if lines else {"mode": mode, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"}
        bad |= bool(result.get("error") or result.get("lost") or result.get("garbled") or result.get("duplicated"))
        print(json.dumps(result), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
