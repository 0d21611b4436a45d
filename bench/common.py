"""Helpers shared by the benchmarks: isolated subprocess runs and memory readings.

Peak RSS comes from the kernel: `os.wait4` returns the rusage of the one child it reaped,
whose `ru_maxrss` is the child's own peak, or the peak of its largest reaped descendant if
that was larger (Linux reports the maximum, not the sum, for descendants). A multi-process
Beam runner's workers are therefore also summed by sampling /proc (`peak_tree_rss_mb`).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
_PAGE = os.sysconf("SC_PAGE_SIZE")


def current_rss_mb() -> float:
    """This process's resident set size now (from /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * _PAGE / 2**20


def peak_rss_mb() -> dict[str, float]:
    """Peak RSS of this process and of its reaped children (ru_maxrss is in KiB on Linux)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"self": round(own, 1), "children": round(children, 1)}


def tree_rss_mb(pid: int) -> float:
    """Summed RSS of `pid` and all its descendants now (0 for processes already gone)."""
    total_kb, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total_kb += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total_kb / 1024


class _TreeSampler(threading.Thread):
    """Samples `tree_rss_mb(pid)` every `interval` s; `peak` is the largest sum seen.

    The kernel's ru_maxrss cannot add up processes (it reports the largest one), so a
    multi-process runner's total is only visible by sampling; short spikes may be missed.
    """

    def __init__(self, pid: int, interval: float = 0.1, max_interval: float = 1.0):
        super().__init__(daemon=True)
        self.pid, self.interval, self.max_interval, self.peak = pid, interval, max_interval, 0.0
        self._stop_event = threading.Event()

    def run(self) -> None:
        # Every 0.1 s at first, then less often (up to every 1 s): walking /proc for a runner
        # with many threads every 0.1 s cost ~20% of a core over a 40-minute run.
        interval = self.interval
        while not self._stop_event.is_set():
            self.peak = max(self.peak, tree_rss_mb(self.pid))
            self._stop_event.wait(interval)
            interval = min(self.max_interval, interval * 1.1)

    def stop(self) -> float:
        self._stop_event.set()
        self.join()
        return round(self.peak, 1)


@dataclass
class IsolatedRun:
    """What one `run_isolated` call measured from the outside."""

    result: dict
    seconds: float  # wall time of the whole child, interpreter start and imports included
    peak_rss_mb: float  # ru_maxrss of the child (max with its reaped descendants)
    peak_tree_rss_mb: float  # sampled peak of the child's and its descendants' summed RSS
    returncode: int


def run_isolated(module: str, args: Sequence[str], *, env: dict | None = None) -> IsolatedRun:
    """Run `python -m module *args` in a fresh process from the repository root.

    The child must print its result as one JSON object on the last line of stdout; its stderr
    passes through. Raises RuntimeError (with the child's output) if it fails.
    """
    cmd = [sys.executable, "-m", module, *args]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, env=env)
    sampler = _TreeSampler(proc.pid)
    sampler.start()
    assert proc.stdout is not None
    stdout = proc.stdout.read().decode("utf-8", "replace")
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    tree_peak = sampler.stop()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}; stdout:\n{stdout[-4000:]}")
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise RuntimeError(f"{' '.join(cmd)} printed no result line")
    return IsolatedRun(
        result=json.loads(lines[-1]),
        seconds=seconds,
        peak_rss_mb=round(usage.ru_maxrss / 1024, 1),
        peak_tree_rss_mb=tree_peak,
        returncode=proc.returncode,
    )


def emit(record: dict) -> None:
    """Print one JSON result line (flushed: the parent reads it as soon as the child exits)."""
    print(json.dumps(record, sort_keys=False), flush=True)


def quiet_beam_logging() -> None:
    """Beam logs a few warnings per run (missing GCP extras, runner notes); keep stderr readable."""
    import logging

    logging.getLogger().setLevel(logging.ERROR)
    logging.getLogger("apache_beam").setLevel(logging.ERROR)


# -- feeding a pipeline benchmark ----------------------------------------------------------

_BY_KEY: dict = {}  # this process's samples by key: the in-memory runner runs in this process


def lookup(key: str):
    return _BY_KEY[key]


def feed_by_key(p, samples):
    """The samples as a PCollection whose graph carries only their keys, looked up in this
    process. `beam.Create(samples)` pickles and compresses every image into the graph and
    unpickles it again: measured 12 s for 48 web-size JPEGs (8 MB), more than the face stage
    itself spent on them; that is a cost of the benchmark's input, not of any stage. (Run the
    benchmark as an importable module, so `lookup` pickles by name, not with `_BY_KEY`.)"""
    import apache_beam as beam

    _BY_KEY.update((s.key, s) for s in samples)
    return (p | "Keys" >> beam.Create([s.key for s in samples], reshuffle=False)
            | "Samples" >> beam.Map(lookup))


def fixed_threads(threads: int) -> dict[str, str]:
    """Every thread-count variable prep's workers read (pipeline/local.py THREAD_ENV) set to
    `threads`: a benchmark's runs then use the same count whatever the caller's environment."""
    from prep.pipeline.local import THREAD_ENV

    return {name: str(threads) for name in THREAD_ENV}


def timed_prep_run(args: Sequence[str], env: dict) -> float:
    """Seconds of one `prep run ARGS` in a fresh process; exits with its stderr if it fails."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "prep.cli", "run", *args], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return seconds
