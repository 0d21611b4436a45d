"""Conventions shared by every transform: the dead-letter tag, stable hashing, metrics."""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import threading
import time

import apache_beam as beam
from apache_beam.metrics import Metrics

from prep.faults import FAULT_ENV, fault_point  # noqa: F401 - re-exported for the stages

# Every DoFn that can reject an element emits `beam.pvalue.TaggedOutput(DEAD, DeadLetter)`;
# the main output carries the records that go on.
DEAD = "dead_letter"
METRICS_NAMESPACE = "prep"
PROGRESS_ENV = "PREP_PROGRESS"  # a folder: each process leaves its counts there (local runs; _ProgressFile)


def stable_hash(text: str, seed: int | str = 0) -> int:
    """A 64-bit hash that is the same in every process and run (unlike hash())."""
    digest = hashlib.blake2b(f"{seed}:{text}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def dead(letter) -> beam.pvalue.TaggedOutput:
    return beam.pvalue.TaggedOutput(DEAD, letter)




class _ProgressFile:
    """This process's counters, model loads and notes, for the launcher's console
    (pipeline/console.py reads and shows them).

    The Beam counters are the source of truth (Dataflow shows them in its UI; the final table
    reads them from the pipeline result), but the local runners report them only when the
    pipeline ends, and with `--workers N` they tick in N SDK worker processes, not in the
    launcher. So when PREP_PROGRESS names a folder (the launcher's temp dir, never OUT: the
    output bytes do not change), every process that runs prep's DoFns - the launcher itself for
    one worker, each SDK worker process for N - also keeps its own totals here and replaces
    `<folder>/<pid>.json` with them, at most every WRITE_INTERVAL s (written to a temp name,
    then renamed: a reader never sees half a file); a model load or a note is written at once.
    The launcher polls the folder and sums the files. The workers find the folder in the
    environment they copy from the launcher when they start (pipeline/local.py).
    """

    WRITE_INTERVAL = 0.5

    def __init__(self, folder: str):
        self.pid = os.getpid()
        self.path = os.path.join(folder, f"{self.pid}.json")
        self.counts: dict[str, int] = {}
        self.loads: dict[str, dict] = {}
        self.notes: list[str] = []
        self.plan: dict = {}
        self.lock = threading.Lock()
        self.last = 0.0

    def tick(self, name: str, n: int) -> None:
        with self.lock:
            self.counts[name] = self.counts.get(name, 0) + n
            if time.monotonic() - self.last >= self.WRITE_INTERVAL:
                self._write()

    def event(self, *, load: tuple[str, dict] | None = None, note: str | None = None, plan: dict | None = None) -> None:
        with self.lock:
            if load is not None:
                self.loads[load[0]] = load[1]
            if note is not None:
                self.notes.append(note)
            if plan is not None:
                self.plan = plan
            self._write()

    def flush(self) -> None:
        with self.lock:
            self._write()

    def _write(self) -> None:
        self.last = time.monotonic()
        data = {"pid": self.pid, "counts": self.counts, "loads": self.loads, "notes": self.notes, "plan": self.plan}
        tmp = f"{self.path}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f)
            os.replace(tmp, self.path)
        except OSError:  # the launcher removed its folder (the run is over): nothing to show
            pass


_progress_lock = threading.Lock()
_progress: _ProgressFile | None = None


def _console() -> _ProgressFile | None:
    global _progress
    folder = os.environ.get(PROGRESS_ENV)
    if not folder:
        return None
    with _progress_lock:
        if _progress is None or _progress.pid != os.getpid() or not _progress.path.startswith(folder):
            _progress = _ProgressFile(folder)
            atexit.register(_progress.flush)
        return _progress


def progress_load(stage: str, model: str, seconds: float | None = None) -> None:
    """A stage's model load began (seconds None) or took `seconds`: a line on the console."""
    console = _console()
    if console is not None:
        console.event(load=(stage, {"model": model, "seconds": seconds}))


def progress_note(text: str) -> None:
    """A line for the console of a local run (what the launcher is doing before the pipeline runs)."""
    console = _console()
    if console is not None:
        console.event(note=text)


def progress_plan(plan: dict) -> None:
    """The planned counts per stage (pipeline/console.py: planned_totals), for rates' ETAs."""
    console = _console()
    if console is not None:
        console.event(plan=plan)


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
