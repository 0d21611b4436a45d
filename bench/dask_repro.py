"""Minimal reproduction, with no prep code, of why Beam's DaskRunner cannot run prep's graph.

    pip install 'apache-beam[dask]'     # dask and distributed: not among prep's own dependencies
    python -m bench.dask_repro [--elements 40] [--cluster local|none]

prep's pipeline needs four things of a runner that Beam's DaskRunner (apache-beam 2.77,
`apache_beam/runners/dask/`) does not do; each is checked here on a pipeline of plain DoFns,
against the in-memory runner, on a dask.distributed cluster of a scheduler and two worker
processes on 127.0.0.1 (`--cluster none`: the Client's default LocalCluster):

1. **tagged outputs are not split.** `transform_evaluator.ParDo` collects a DoFn's main and
   tagged outputs into one list (`OneReceiver.values`; tagged ones wrapped in `TaggedOutput`),
   and the visitor hands a consumer of *any* output of that ParDo the producer's whole bag. A
   dead-letter branch (`.with_outputs("dead", main="ok")`) sees the good elements too: in prep,
   `'Sample' object has no attribute 'stage'`.
2. **finish_bundle's outputs are dropped.** `apply_dofn_to_bundle` reads the receivers'
   values *before* `invoke_finish_bundle()`, so what a DoFn emits there (BatchElements'
   last batch, RunInference's, every buffering DoFn's) is lost without an error.
3. **only one leaf runs.** `run_pipeline` computes `list(bags.values())[-1]`, the last
   transform visited, assuming it depends on everything; a pipeline with two sinks (prep
   writes shards, dead letters and a manifest) runs one branch and skips the others silently.
4. **no metrics.** `DaskRunnerResult.metrics()` raises NotImplementedError; prep reconciles
   its counts from the result's counters.

Each check runs its own small pipeline (checks 1 and 2 with a single leaf, so that 3 cannot
hide them) and prints one JSON line: what the in-memory runner gives, what DaskRunner gives.
Exit status 1 when DaskRunner differs, 0 when every check agrees (a Beam release that fixed
them: then prep can try it again). Also: Beam does not know the short name `DaskRunner`
(`--runner=DaskRunner` fails in `create_runner`); it takes the class's full path.

Measured 2026-12-04 (apache-beam 2.77.0, dask/distributed 2026.8.0, scheduler + 2 workers on
127.0.0.1, 40 elements), all four silent (no error raised):
  1  the "odd" sink got 40 elements (in memory: the 20 odd ones): evens leak into it
  2  0 elements from finish_bundle (in memory: 40)
  3  the first of two sinks got 0 elements, the second 40 (in memory: 40 and 40)
  4  metrics(): NotImplementedError
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

# Beam does not know the short name "DaskRunner" (create_runner: "Unexpected pipeline runner"):
# it must be given by its full path.
DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"


class SplitEvenOdd(beam.DoFn):
    """Main output: even numbers; tagged "odd": odd numbers."""

    def process(self, x):
        if x % 2:
            yield beam.pvalue.TaggedOutput("odd", x)
        else:
            yield x


class BufferAll(beam.DoFn):
    """Emits nothing per element, then everything it saw, in finish_bundle (as a batcher does)."""

    def start_bundle(self):
        self.seen = []

    def process(self, x):
        self.seen.append(x)

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindow
        from apache_beam.utils.windowed_value import WindowedValue

        for x in self.seen:
            yield WindowedValue(x, 0, [GlobalWindow()])


def _collect(tag: str, folder: str):
    """A sink: writes the elements it gets, one file per element (no grouping needed)."""

    def write(x):
        with open(os.path.join(folder, f"{tag}-{os.getpid()}-{time.monotonic_ns()}.json"), "w") as f:
            json.dump(x if isinstance(x, int) else repr(x), f)
        return x

    return beam.Map(write)


def _read(folder: str) -> dict[str, list]:
    found: dict[str, list] = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name)) as f:
            found.setdefault(name.split("-")[0], []).append(json.load(f))
    return {k: sorted(v, key=str) for k, v in found.items()}


def _pipeline(runner: str, dask_args: list[str]) -> beam.Pipeline:
    if runner == "dask":
        return beam.Pipeline(options=PipelineOptions([f"--runner={DASK_RUNNER}", *dask_args]))
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    return beam.Pipeline(runner=FnApiRunner(), options=PipelineOptions([]))


def _finish(p: beam.Pipeline) -> tuple[object, str | None]:
    result = p.run()
    error = None
    try:
        result.wait_until_finish()
    except Exception as exc:  # noqa: BLE001 - reported, it is the finding
        error = f"{type(exc).__name__}: {exc}"[:300]
    return result, error


def _close(result) -> None:
    client = getattr(result, "client", None)
    if client is not None:
        client.close()


def run_checks(runner: str, n: int, dask_args: list[str]) -> dict:
    """Four pipelines, one per check; each of the first two has a single leaf, so that check 3
    (only one leaf runs) cannot hide checks 1 and 2."""
    found: dict = {"errors": []}
    # 1: the tagged output "odd" alone, consumed by one sink.
    folder = tempfile.mkdtemp(prefix=f"dask-repro-{runner}-1-")
    p = _pipeline(runner, dask_args)
    split = p | beam.Create(list(range(n))) | beam.ParDo(SplitEvenOdd()).with_outputs("odd", main="even")
    split.odd | "odd sink" >> _collect("odd", folder)
    result, error = _finish(p)
    _close(result)
    found["odd"] = _read(folder).get("odd", [])
    found["errors"].append(error)
    # 2: a DoFn that emits in finish_bundle, one sink.
    folder = tempfile.mkdtemp(prefix=f"dask-repro-{runner}-2-")
    p = _pipeline(runner, dask_args)
    p | beam.Create(list(range(n))) | beam.ParDo(BufferAll()) | "buffered sink" >> _collect("buffered", folder)
    result, error = _finish(p)
    _close(result)
    found["buffered"] = _read(folder).get("buffered", [])
    found["errors"].append(error)
    # 3: two leaves (two sinks on two branches); 4: a counter read from the result.
    folder = tempfile.mkdtemp(prefix=f"dask-repro-{runner}-3-")
    p = _pipeline(runner, dask_args)
    numbers = p | beam.Create(list(range(n)))
    numbers | "first sink" >> _collect("first", folder)
    numbers | "count" >> beam.Map(lambda x: beam.metrics.Metrics.counter("repro", "seen").inc() or x) \
        | "second sink" >> _collect("second", folder)
    result, error = _finish(p)
    got = _read(folder)
    found["first"], found["second"] = got.get("first", []), got.get("second", [])
    found["errors"].append(error)
    try:
        counters = result.metrics().query()["counters"]
        found["metrics"] = sum(c.committed or c.attempted or 0 for c in counters if c.key.metric.name == "seen")
    except NotImplementedError as exc:
        found["metrics"] = f"NotImplementedError: {exc}"
    _close(result)
    return found


def start_cluster(workers: int = 2) -> tuple[str, list[subprocess.Popen]]:
    """A dask scheduler and `workers` worker processes on 127.0.0.1 (the loopback only)."""
    folder = tempfile.mkdtemp(prefix="dask-cluster-")
    scheduler_file = os.path.join(folder, "scheduler.json")
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", "0", "--dashboard-address", ":0", "--scheduler-file", scheduler_file],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    deadline = time.monotonic() + 60
    while not os.path.exists(scheduler_file) and time.monotonic() < deadline:
        time.sleep(0.2)
    for _ in range(workers):
        procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file",
                                       scheduler_file, "--nworkers", "1", "--nthreads", "1", "--host", "127.0.0.1",
                                       "--dashboard-address", ":0", "--no-nanny"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    from distributed import Client

    with Client(scheduler_file=scheduler_file, timeout=60) as client:
        client.wait_for_workers(workers, timeout=60)
    return scheduler_file, procs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--elements", type=int, default=40)
    parser.add_argument("--cluster", choices=["local", "none"], default="local",
                        help="local: scheduler + 2 workers on 127.0.0.1; none: the Client's own LocalCluster")
    args = parser.parse_args(argv)
    try:
        import dask  # noqa: F401
        import distributed  # noqa: F401
    except ImportError as exc:
        print(f"{exc.name} is not installed: pip install 'apache-beam[dask]'", file=sys.stderr)
        return 2
    procs: list[subprocess.Popen] = []
    dask_args: list[str] = []
    try:
        if args.cluster == "local":
            scheduler_file, procs = start_cluster()
            dask_args = [f"--dask_scheduler_file={scheduler_file}"]
        reference = run_checks("in_memory", args.elements, [])
        dask = run_checks("dask", args.elements, dask_args)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    checks = {
        "1 a tagged output gets only its own elements": (reference["odd"], dask["odd"]),
        "2 finish_bundle outputs are kept": (reference["buffered"], dask["buffered"]),
        "3 every leaf of the graph runs": ((reference["first"], reference["second"]), (dask["first"], dask["second"])),
        "4 metrics from the result": (reference["metrics"], dask["metrics"]),
    }
    for name, (want, got) in checks.items():
        print(json.dumps({"check": name, "ok": want == got, "in_memory": _brief(want), "dask": _brief(got)}))
    print(json.dumps({"errors": {"in_memory": reference["errors"], "dask": dask["errors"]}}))
    return 0 if all(want == got for want, got in checks.values()) else 1


def _brief(value):
    """Counts and a few examples of a list (of lists), a value as it is."""
    if isinstance(value, tuple):
        return [_brief(v) for v in value]
    if isinstance(value, list):
        return {"count": len(value), "first": [str(v)[:60] for v in value[:3]]}
    return value


if __name__ == "__main__":
    raise SystemExit(main())
