"""Conventions shared by every transform: the dead-letter tag, stable hashing, metrics."""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time

import apache_beam as beam
from apache_beam.metrics import Metrics

# Every DoFn that can reject an element emits `beam.pvalue.TaggedOutput(DEAD, DeadLetter)`;
# the main output carries the records that go on.
DEAD = "dead_letter"
METRICS_NAMESPACE = "prep"
PROGRESS_ENV = "PREP_PROGRESS"  # seconds between console progress lines (local runs only)
FAULT_ENV = "PREP_FAULT"  # tests only: "POINT:N" kills the process the Nth time POINT is reached


def stable_hash(text: str, seed: int | str = 0) -> int:
    """A 64-bit hash that is the same in every process and run (unlike hash())."""
    digest = hashlib.blake2b(f"{seed}:{text}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def dead(letter) -> beam.pvalue.TaggedOutput:
    return beam.pvalue.TaggedOutput(DEAD, letter)


_fault_hits: dict[str, int] = {}


def fault_point(point: str) -> None:
    """Fault injection for the kill tests: with PREP_FAULT=POINT:N set, the Nth arrival at
    POINT in this process kills it with SIGKILL (no cleanup, like a preempted worker).
    Unset (always, outside tests), this is one dictionary lookup."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != point:
        return
    _fault_hits[point] = _fault_hits.get(point, 0) + 1
    if _fault_hits[point] >= int(nth or 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


class _ConsoleProgress:
    """Per-process console progress for local runs: counts and rates per stage counter.

    The Beam counters are the source of truth (Dataflow shows them in its UI); the local
    runners only report metrics when the pipeline ends, so when PREP_PROGRESS is set the
    counters also tick this reporter, which prints one line every PREP_PROGRESS seconds.
    """

    def __init__(self, interval: float):
        self.interval = interval
        self.start = self.last = time.monotonic()
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()

    def tick(self, name: str, n: int) -> None:
        with self.lock:
            self.counts[name] = self.counts.get(name, 0) + n
            now = time.monotonic()
            if now - self.last < self.interval:
                return
            self.last = now
            elapsed = max(now - self.start, 1e-9)
            parts = [f"{k} {v} ({v / elapsed:.1f}/s)" for k, v in sorted(self.counts.items()) if k.endswith(".ok")]
            parts += [f"{k} {v}" for k, v in sorted(self.counts.items()) if not k.endswith(".ok")]
        print(f"[prep {elapsed:7.1f}s] " + " | ".join(parts), file=sys.stderr, flush=True)


_progress_lock = threading.Lock()
_progress: _ConsoleProgress | None = None


def _console() -> _ConsoleProgress | None:
    global _progress
    interval = os.environ.get(PROGRESS_ENV)
    if not interval:
        return None
    with _progress_lock:
        if _progress is None:
            _progress = _ConsoleProgress(float(interval))
        return _progress


class _Counter:
    def __init__(self, name: str):
        self._name = name
        self._metric = Metrics.counter(METRICS_NAMESPACE, name)

    def inc(self, n: int = 1) -> None:
        self._metric.inc(n)
        console = _console()
        if console is not None:
            console.tick(self._name, n)


def counter(stage: str, name: str) -> _Counter:
    """A Beam counter `prep:<stage>.<name>` that also feeds local console progress."""
    return _Counter(f"{stage}.{name}")
