"""What a local run shows on the console while it runs, and the per-stage table at its end.

How the launcher gets the counts, for 1 and N worker processes alike: every process that runs
prep's DoFns (the launcher itself with one worker; each SDK worker process with `--workers N`)
keeps its counter totals, model loads and notes in a small JSON file of its own,
`<folder>/<pid>.json`, replaced atomically at most twice a second (transforms/common.py:
_ProgressFile). The folder is a temp dir made here and named to the workers through the
environment they copy when they start (PREP_PROGRESS); it is never inside OUT, so the output
bytes do not change. `RunConsole` polls the folder, sums the files and draws:
  - on a terminal: one rich progress row per stage (count, bar and ETA where the total is
    known, rate), with model loads and notes printed above it;
  - otherwise (CI, logs, tests): a plain line every `interval` seconds when counts moved, and
    one plain line per model load or note. No cursor movement, no spinner.
Why not Beam's metrics: the FnApiRunner reports them only when the pipeline ends. They are the
source of truth for the final table (`stage_counters`), which reconciles with the manifest.

Worker processes' own output (Beam's start-up notes, INFO logs) goes to one log file per worker
in the run's temp dir unless --verbose (`QuietWorkersRunner`); a failed run keeps that dir and
says where it is.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Any, Optional

from prep.schemas import contract
from prep.transforms.common import METRICS_NAMESPACE, PROGRESS_ENV

WORKER_LOGS_ENV = "PREP_WORKER_LOGS"  # a folder: local SDK worker processes write their output there

# The stages the console shows, in pipeline order: (counter prefix, label, counters that mean
# "passed", counters that mean "dead-lettered here").
STAGES = (
    ("read", "read files", ("read.ok",), ("read.failed", "read.empty", "read.too_large")),
    ("read_wds", "read tars", ("read_wds.samples",), ("read_wds.no_image", "read_wds.incomplete", "read_wds.tar_error")),
    ("decode", "decode", ("decode.ok",), ("decode.dead_lettered",)),
    ("caption", "caption", ("caption.ok",), ("caption.dead_lettered",)),
    ("mask", "mask", ("mask.ok",), ("mask.dead_lettered",)),
    ("embed", "embed", ("embed.ok",), ("embed.dead_lettered",)),
    ("identity", "identity", ("identity.ok",), ("identity.dead_lettered",)),
    ("write", "write", ("write.specific_samples", "write.general_samples"), ()),
)


# ---------------------------------------------------------------------------- launcher side


def planned_totals(plan, resume=None) -> dict[str, Optional[int]]:
    """What each stage will see, where it is known before the run: celeba:/folder: inputs are
    listed up front (plan_run); a tar's sample count is known only once it is read. The totals
    downstream of decode are upper bounds (a dead letter never reaches the next stage)."""
    only = getattr(resume, "only_keys", None)
    items = [i for i in plan.items if only is None or i.key in only]
    done = len(getattr(resume, "done_keys", None) or ())
    specific = max(0, sum(1 for i in items if i.domain == "specific") - done)
    tars = bool(plan.wds_urls) and only is None
    totals: dict[str, Optional[int]] = {"read": len(items), "decode": None if tars else max(0, len(items) - done)}
    caption = specific if not plan.config.caption_general else totals["decode"]
    totals.update(caption=caption, mask=specific, embed=specific, identity=specific if plan.identity else None)
    return totals


def stage_counters(result) -> dict[str, int]:
    """The prep counters of a finished pipeline, summed over steps ({} if the runner has none)."""
    try:
        from apache_beam.metrics.metric import MetricsFilter

        found = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))["counters"]
    except Exception:  # noqa: BLE001 - a runner without metrics: the table falls back to the manifest
        return {}
    counts: dict[str, int] = {}
    for c in found:
        value = c.committed if c.committed is not None else c.attempted
        counts[c.key.metric.name] = counts.get(c.key.metric.name, 0) + int(value or 0)
    return dict(sorted(counts.items()))


def _short(model: str) -> str:
    """A local model path as its last two parts (the tiny preset's live under a cache dir)."""
    if os.sep in model and os.path.exists(model):
        return os.path.join(*os.path.normpath(model).split(os.sep)[-2:])
    return model


def _seconds(s: float) -> str:
    s = int(s + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class RunConsole:
    """The console of one local run (see the module docstring). Use as a context manager around
    `run()`; `tty=None` asks the terminal; `enabled=False` shows nothing but still keeps the
    workers' output off the console (unless `verbose`)."""

    POLL = 0.25

    def __init__(self, *, interval: float = 10.0, tty: Optional[bool] = None, enabled: bool = True,
                 verbose: bool = False, stream=None):
        self.interval, self.enabled, self.verbose = interval, enabled, verbose
        self.stream = stream if stream is not None else sys.stderr
        if tty is None:
            tty = bool(getattr(self.stream, "isatty", lambda: False)()) and not verbose
        self.tty = tty
        self.start = time.monotonic()
        self.dir = ""
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._saved_env: dict[str, Optional[str]] = {}
        self._shown_notes: dict[str, int] = {}
        self._shown_loads: set[tuple[str, str, bool]] = set()
        self._last_line = 0.0
        self._last_counts: dict[str, int] = {}
        self._seen: dict[str, tuple[Optional[float], float, int]] = {}
        self._rich = None
        self._tasks: dict[str, Any] = {}
        self._handlers: list[tuple[logging.StreamHandler, Any]] = []

    # -- lifecycle
    def __enter__(self) -> "RunConsole":
        self.dir = tempfile.mkdtemp(prefix="prep-run-")
        env = {}
        if self.enabled:
            os.makedirs(os.path.join(self.dir, "progress"))
            env[PROGRESS_ENV] = os.path.join(self.dir, "progress")
        if not self.verbose:
            os.makedirs(os.path.join(self.dir, "workers"))
            env[WORKER_LOGS_ENV] = os.path.join(self.dir, "workers")
        for name, value in env.items():
            self._saved_env[name] = os.environ.get(name)
            os.environ[name] = value
        if self.enabled:
            if self.tty:
                self._start_rich()
            self.note("planning inputs and models")
            self._thread = threading.Thread(target=self._loop, name="prep-console", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            from prep.transforms import common

            if common._progress is not None:  # one worker: this process's last counts, not yet written
                common._progress.flush()
            self._poll(final=True)
        if self._rich is not None:
            self._rich.stop()
            for handler, stream in self._handlers:
                handler.setStream(stream)
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        logs = glob.glob(os.path.join(self.dir, "workers", "*.log"))
        if exc_type is not None and any(os.path.getsize(f) for f in logs):
            self._print(f"worker logs: {os.path.join(self.dir, 'workers')}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)

    def note(self, text: str) -> None:
        self._print(text)

    # -- drawing
    def _start_rich(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(file=self.stream, force_terminal=True)
        self._rich = Progress(
            TextColumn("{task.description:<10}"),
            BarColumn(bar_width=24),
            TextColumn("{task.fields[count]:>13}"),
            TextColumn("{task.fields[rate]:>9}"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[dead]}"),
            console=console,
            redirect_stderr=False,
            redirect_stdout=False,
        )
        self._rich.start()
        # Log records go above the live rows instead of through them.
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stderr, self.stream):
                self._handlers.append((handler, handler.stream))
                handler.setStream(_RichLines(self._rich.console))

    def _print(self, text: str) -> None:
        if self._rich is not None:
            self._rich.console.print(text, highlight=False, markup=False)
        else:
            print(f"[prep {time.monotonic() - self.start:7.1f}s] {text}", file=self.stream, flush=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.POLL):
            try:
                self._poll()
            except Exception:  # noqa: BLE001 - the console never fails a run
                logging.getLogger(__name__).debug("console poll failed", exc_info=True)

    def _read(self) -> list[dict]:
        found = []
        for path in sorted(glob.glob(os.path.join(self.dir, "progress", "*.json"))):
            try:
                with open(path, encoding="utf-8") as f:
                    found.append(json.load(f))
            except (OSError, ValueError):
                continue  # replaced while we read it: next poll
        return found

    def _poll(self, final: bool = False) -> None:
        files = self._read()
        counts: dict[str, int] = {}
        plan: dict = {}
        for data in files:
            for name, n in data.get("counts", {}).items():
                counts[name] = counts.get(name, 0) + n
            plan = data.get("plan") or plan
            key = str(data.get("pid"))
            notes = data.get("notes", [])
            for text in notes[self._shown_notes.get(key, 0):]:
                self._print(text)
            self._shown_notes[key] = len(notes)
        self._show_loads(files)
        rows = self._rows(counts, plan)
        if self._rich is not None:
            self._draw_rich(rows, final)
        elif rows and counts != self._last_counts and (
                final or time.monotonic() - self._last_line >= self.interval):
            self._last_line, self._last_counts = time.monotonic(), counts
            self._print(" | ".join(self._plain(r) for r in rows))

    def _show_loads(self, files: list[dict]) -> None:
        """One line when a stage's model starts loading, one when it has loaded (the slowest
        process's time, and how many processes loaded it)."""
        by_stage: dict[str, list[dict]] = {}
        for data in files:
            for stage, load in data.get("loads", {}).items():
                by_stage.setdefault(stage, []).append(load)
        for stage, loads in sorted(by_stage.items()):
            model = _short(loads[0]["model"])
            if (stage, model, False) not in self._shown_loads:
                self._shown_loads.add((stage, model, False))
                self._print(f"{stage}: loading {model}")
            done = [x["seconds"] for x in loads if x.get("seconds") is not None]
            if done and len(done) == len(loads) and (stage, model, True) not in self._shown_loads:
                self._shown_loads.add((stage, model, True))
                where = f" ({len(done)} processes, slowest)" if len(done) > 1 else ""
                self._print(f"{stage}: {model} loaded in {max(done):.1f} s{where}")

    def _rows(self, counts: dict[str, int], plan: dict) -> list[dict]:
        now = time.monotonic()
        rows = []
        for stage, label, ok_names, dead_names in STAGES:
            ok = sum(counts.get(n, 0) for n in ok_names)
            dead = sum(counts.get(n, 0) for n in dead_names)
            total = plan.get(stage)
            if not ok + dead and total is None:
                continue
            first, last = self._seen_times(stage, ok + dead, now)
            elapsed = last - first if first is not None else 0.0  # a finished stage keeps its rate
            rate = (ok + dead) / elapsed if elapsed > 0.5 else None
            eta = (total - ok - dead) / rate if rate and total is not None and total >= ok + dead else None
            rows.append({"stage": stage, "label": label, "done": ok + dead, "dead": dead, "total": total,
                         "rate": rate, "eta": eta})
        return rows

    def _seen_times(self, stage: str, done: int, now: float) -> tuple[Optional[float], float]:
        """When the stage's count first moved, and when it last did."""
        first, last, before = self._seen.get(stage, (None, now, 0))
        if done and first is None:
            first = now
        if done != before:
            last = now
        self._seen[stage] = (first, last, done)
        return first, last

    @staticmethod
    def _plain(row: dict) -> str:
        text = f"{row['label']} {row['done']}" + (f"/{row['total']}" if row["total"] is not None else "")
        if row["rate"] is not None:
            text += f" {row['rate']:.1f}/s"
        if row["eta"] is not None and row["done"] < (row["total"] or 0):
            text += f" ETA {_seconds(row['eta'])}"
        if row["dead"]:
            text += f" ({row['dead']} dead)"
        return text

    def _draw_rich(self, rows: list[dict], final: bool = False) -> None:
        if not self._tasks:  # every stage's row, hidden until it has counts: rows stay in pipeline order
            for stage, label, _, _ in STAGES:
                self._tasks[stage] = self._rich.add_task(label, total=None, visible=False, count="", rate="", dead="")
        for row in rows:
            fields = {
                "count": f"{row['done']}" + (f"/{row['total']}" if row["total"] is not None else ""),
                "rate": f"{row['rate']:.1f}/s" if row["rate"] is not None else "",
                "dead": f"{row['dead']} dead" if row["dead"] else "",
            }
            total = row["done"] if final else row["total"]  # at the end: every bar full (totals are upper bounds)
            self._rich.update(self._tasks[row["stage"]], completed=row["done"], total=total, visible=True, **fields)


class _RichLines:
    """A stream for logging handlers that prints each record above rich's live rows."""

    def __init__(self, console):
        self._console = console

    def write(self, text: str) -> None:
        if text.strip():
            self._console.print(text.rstrip("\n"), highlight=False, markup=False)

    def flush(self) -> None:
        pass


# ---------------------------------------------------------------------------- logging


class WarnOnce(logging.Filter):
    """Each warning (or error) reaches the console once: the same message again, from the same
    process or another worker, is dropped. INFO and DEBUG pass (they are for --verbose)."""

    def __init__(self):
        super().__init__()
        self._seen: set[tuple[int, str]] = set()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.levelno, record.getMessage())
        with self._lock:
            if key in self._seen:
                return False
            self._seen.add(key)
        return True


class WorkerLogEntries(logging.Filter):
    """The FnApiRunner logs each record a worker process sends it as the whole LogEntry proto
    in text form (timestamp, thread, instruction id, ... over many lines). This keeps the
    record's level and turns its text into "worker: <message>" (so WarnOnce sees the message
    alone: N workers' same warning is one line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.funcName != "Logging" or not record.pathname.endswith("worker_handlers.py"):
            return True
        try:
            from google.protobuf import text_format

            from apache_beam.portability.api import beam_fn_api_pb2

            entry = text_format.Parse(record.getMessage(), beam_fn_api_pb2.LogEntry())
        except Exception:  # noqa: BLE001 - not the shape we know: leave it as it is
            return True
        where = f" ({entry.log_location})" if entry.log_location else ""
        record.msg, record.args = f"worker: {entry.message}{where}", ()
        return True


# ---------------------------------------------------------------------------- worker output


def quiet_workers_command(command: str, folder: str) -> str:
    """A local SDK worker's command line (run by a shell) with its stdout and stderr in a log
    file of its own: Beam's start-up notes and anything a library prints stay off the console."""
    import shlex

    return f'{command} >> {shlex.quote(folder)}/worker-"${{WORKER_ID:-$$}}".log 2>&1'


def make_local_runner(provision_info=None):
    """Beam's in-memory FnApiRunner; with WORKER_LOGS_ENV set (prep run without --verbose), its
    multi_processing workers write their output to files there instead of the console."""
    from apache_beam.portability import python_urns
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    class QuietWorkersRunner(FnApiRunner):
        def run_via_runner_api(self, pipeline_proto, options):
            folder = os.environ.get(WORKER_LOGS_ENV)
            if folder:
                for env in pipeline_proto.components.environments.values():
                    if env.urn == python_urns.SUBPROCESS_SDK:
                        env.payload = quiet_workers_command(env.payload.decode("utf-8"), folder).encode("utf-8")
            return super().run_via_runner_api(pipeline_proto, options)

    return QuietWorkersRunner(provision_info=provision_info)


# ---------------------------------------------------------------------------- the final table


def computed_samples(counters: dict[str, int], stage: str) -> int:
    """The samples a model stage computed, from its counters (ok + dead-lettered). Augmented views
    (--singleton-refs) pass mask and embed too; they are not samples (their own row), so they are
    taken out of those stages' counts."""
    views = counters.get("views.made", 0)
    not_samples = {"mask": views, "embed": views - counters.get("views.failed_mask", 0)}.get(stage, 0)
    return max(counters.get(f"{stage}.ok", 0) + counters.get(f"{stage}.dead_lettered", 0) - not_samples, 0)


def stage_rows(manifest: dict) -> list[tuple[str, Optional[int], Optional[int], int]]:
    """(stage, in, ok, dead-lettered) per stage, in pipeline order, then "total".

    dead-lettered is the manifest's own count per stage (dead_letter_reasons), so the column
    sums to counts.dead_lettered. "in" of read is the manifest's inputs (ingest's letters,
    duplicate keys, count there); of a model stage, what its counters saw enter it (ok +
    dead-lettered, Beam metrics of this run: manifest["stage_counters"], set by run()); ok =
    in - dead-lettered. write is the manifest's written samples; total reconciles
    inputs = written + dead-lettered. Without counters, only the manifest's columns are filled.
    """
    counts = manifest["counts"]
    dead: dict[str, int] = {}
    for key, n in (manifest.get("dead_letter_reasons") or {}).items():
        stage = contract.stage_of_count_key(key)
        stage = "read" if stage == "ingest" else stage
        dead[stage] = dead.get(stage, 0) + n
    counters = manifest.get("stage_counters") or {}
    rows: list[tuple[str, Optional[int], Optional[int], int]] = []
    read_dead = dead.pop("read", 0)
    rows.append(("read", counts["inputs"], counts["inputs"] - read_dead, read_dead))
    kept = counters.get("resume.skipped", 0)
    if kept:
        rows.append(("kept (resume)", kept, kept, 0))
    views = counters.get("views.made", 0)
    for stage in ("decode", "caption", "mask", "embed", "identity"):
        entered = computed_samples(counters, stage) + counters.get(f"reuse.{stage}_reused", 0)  # --reuse: from PREV_OUT
        d = dead.pop(stage, 0)
        if counters and entered:
            rows.append((stage, entered, entered - d, d))
        elif d:
            rows.append((stage, None, None, d))
        if stage == "embed" and views:
            failed = counters.get("views.failed_mask", 0) + counters.get("views.failed_embed", 0)
            rows.append(("views (refs)", views, views - failed, 0))
    written = counts["specific"] + counts["general"]
    for stage, d in sorted(dead.items()):  # any other stage that dead-letters (write, ...)
        if stage != "write":
            rows.append((stage, None, None, d))
    write_dead = dead.get("write", 0)
    rows.append(("write", written + write_dead, written, write_dead))
    rows.append(("total", counts["inputs"], written, counts["dead_lettered"]))
    return rows


def format_stage_table(manifest: dict) -> list[str]:
    rows = stage_rows(manifest)
    width = max(len(r[0]) for r in rows)
    num = max(6, *(len(str(v)) for r in rows for v in r[1:] if v is not None))

    def cell(v: Optional[int]) -> str:
        return f"{'-' if v is None else v:>{num}}"

    lines = [f"{'stage':<{width}}  {'in':>{num}}  {'ok':>{num}}  dead-lettered"]
    for stage, n_in, ok, d in rows:
        if stage == "total":
            lines.append("-" * len(lines[0]))
        lines.append(f"{stage:<{width}}  {cell(n_in)}  {cell(ok)}  {d:>{len('dead-lettered')}}")
    return lines
