"""Local runs on every core (`prep run --workers N`), and the guard against Beam's
multi_threading mode.

A chunked run (pipeline/chunks.py) with `--workers N` runs N chunks at a time in N processes
of its own (`chunk_pool`, with `thread_environment`). One job with `--workers N` (N > 1, no
`--runner`) runs the in-memory FnApiRunner in Beam's multi_processing mode: N SDK worker processes (`python -m apache_beam.runners.worker.sdk_worker_main`,
started by `subprocess.Popen` with a copy of the launcher's `os.environ` when the pipeline
starts). So the per-worker thread counts are environment variables set around `p.run()`:
`OMP_NUM_THREADS` / `MKL_NUM_THREADS` / `OPENBLAS_NUM_THREADS` (torch sizes its intra-op pool
from `OMP_NUM_THREADS` when it is imported, which in a worker is after the process starts),
`NUMBA_NUM_THREADS` (rembg's import starts numba's OpenMP layer, which would reset the OpenMP
count torch shares to all cores: transforms/mask.py, import_rembg) and
`PREP_THREADS` (read by the mask stage for onnxruntime's `intra_op_num_threads`, which ignores
OpenMP's variables), each `max(1, cores // N)`. The workers' own logging is set to WARNING
(`--default_sdk_harness_log_level`, which the FnApiRunner does not pass to its workers by
itself: `worker_provision_info`), so the console shows prep's progress and summary, plus
one line per worker from Beam's import (apitools not found, logged before any option is read).
Each worker loads every model once (N copies in memory), hence the memory cap of `auto`.

Output does not depend on N: every step is a pure function of its input and the seed, and the
shard writer orders samples by key, so the shards are byte-identical for any N (tested).

multi_threading is refused, for every N: there Beam's embedded workers flush their data
streams from a timer thread (`data_buffer_time_limit_ms=1000`), which can cut an element in
two and lose or garble it (see bench/mt_repro.py). The experiment
`data_buffer_time_limit_ms=N` (N > 0) turns the same timer on in any SDK harness, Dataflow's
included, and is refused for the same reason.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Sequence
from typing import Optional

from apache_beam.options.pipeline_options import DebugOptions, DirectOptions, PipelineOptions, StandardOptions

AUTO = 0  # `--workers 0` / `auto`: the machine's cores, capped by memory
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS", "PREP_THREADS")
# Peak RSS of one worker process holding a preset's three models (CPU), rounded up: tiny
# measured ~1.3 GB for a whole run; small and paper are estimates from the models' sizes.
WORKER_MEMORY_GB = {"tiny": 1.5, "small": 4.0, "paper": 16.0}

MULTI_THREADING_REFUSED = (
    "--direct_running_mode=multi_threading is refused: Beam's embedded multi_threading workers flush "
    "their output streams from a timer thread (data_buffer_time_limit_ms=1000), which can send half "
    "an element in one message and the rest in the next, so elements are lost or garbled silently "
    "(python -m bench.mt_repro reproduces it without prep). Use --workers N (Beam's multi_processing "
    "mode, byte-identical output) instead."
)
TIME_FLUSH_REFUSED = (
    "--experiments=data_buffer_time_limit_ms={ms} is refused: it makes Beam's SDK harness flush its "
    "output streams from a timer thread, which can split an element between two messages and lose or "
    "garble it (python -m bench.mt_repro). Leave it unset (0: size-based flushing)."
)


class UnsafeRunnerOptions(ValueError):
    """Beam options known to lose or garble elements."""


def is_local(options: PipelineOptions) -> bool:
    return not options.view_as(StandardOptions).runner


def check_options(options: PipelineOptions) -> None:
    """Refuse the Beam options that lose or garble elements (see the module docstring), and a
    runner prep does not run (pipeline/beam_options.py)."""
    from prep.pipeline.beam_options import runner_problem

    problem = runner_problem(options.view_as(StandardOptions).runner)
    if problem:
        raise UnsafeRunnerOptions(problem)
    if is_local(options) and options.view_as(DirectOptions).direct_running_mode == "multi_threading":
        raise UnsafeRunnerOptions(MULTI_THREADING_REFUSED)
    for experiment in options.view_as(DebugOptions).experiments or []:
        match = re.fullmatch(r"data_buffer_time_limit_ms=(-?\d+)", experiment)
        if match and int(match.group(1)) > 0:
            raise UnsafeRunnerOptions(TIME_FLUSH_REFUSED.format(ms=match.group(1)))


def machine_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def available_memory_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def has_gpu() -> bool:
    """Without importing torch in the launcher (docs/design.md: no torch work in the launcher)."""
    return os.path.exists("/dev/nvidiactl")


def auto_workers(preset: str, device: str, cores: Optional[int] = None, memory: Optional[int] = None) -> int:
    """The machine's cores, capped by what N copies of the preset's models leave free (80% of
    MemAvailable). 1 when the run uses a GPU: sharing one GPU between workers is not done yet."""
    if device.startswith("cuda") or (device == "auto" and has_gpu()):
        return 1
    cores = machine_cores() if cores is None else cores
    memory = available_memory_bytes() if memory is None else memory
    if memory is not None:
        cores = min(cores, int(0.8 * memory // (WORKER_MEMORY_GB.get(preset, 16.0) * 2**30)))
    return max(1, cores)


# Below this many inputs (planned images, and SAMPLES_PER_TAR_GUESS per input tar) auto picks
# one process: each SDK worker process costs ~10-20 s to start and load its models here, more
# than a small run's whole work (the demo: 21 s in one process, docs/benchmarks.md).
AUTO_MIN_INPUTS = 5000
SAMPLES_PER_TAR_GUESS = 1000


def resolve_workers(workers: int, preset: str, device: str, planned_inputs: Optional[int] = None) -> int:
    if workers != AUTO:
        return workers
    if planned_inputs is not None and planned_inputs < AUTO_MIN_INPUTS:
        return 1
    return auto_workers(preset, device)


def worker_args(workers: int, beam_args: Sequence[str]) -> list[str]:
    """Beam arguments for a local run on `workers` processes (the user's own direct_* win)."""
    args = list(beam_args)
    if workers <= 1 or sets_direct_options(args):
        return args
    return ["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"] + args


def threads_per_worker(workers: int, cores: Optional[int] = None) -> int:
    return max(1, (machine_cores() if cores is None else cores) // max(1, workers))


def worker_provision_info(options: PipelineOptions):
    """For local multi_processing runs: what the FnApiRunner tells its SDK worker processes.

    Its default provision info carries no pipeline options (the workers log
    `Pipeline_options: {}`), so `--default_sdk_harness_log_level` never reaches them and they
    print INFO to the console. This passes the logging options only (WARNING by default, the
    harness's own start-up notes at ERROR); None for any other run.
    """
    if not is_local(options) or options.view_as(DirectOptions).direct_running_mode != "multi_processing":
        return None
    from google.protobuf import struct_pb2

    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner.fn_runner import ExtendedProvisionInfo

    given = options.get_all_options(drop_default=True)
    logging_options = {
        "default_sdk_harness_log_level": given.get("default_sdk_harness_log_level") or "WARNING",
        "sdk_harness_log_level_overrides": {"__main__": "ERROR", **(given.get("sdk_harness_log_level_overrides") or {})},
    }
    struct = struct_pb2.Struct()
    struct.update({"options": logging_options})
    return ExtendedProvisionInfo(
        beam_provision_api_pb2.ProvisionInfo(retrieval_token="unused-retrieval-token", pipeline_options=struct)
    )


@contextlib.contextmanager
def worker_environment(options: PipelineOptions) -> Iterator[dict]:
    """Around `p.run()`: per-worker thread counts in os.environ, which the SDK worker processes
    copy when they start (then restored). Only for local multi_processing runs; a variable the
    user set already is kept."""
    direct = options.view_as(DirectOptions)
    workers = machine_cores() if direct.direct_num_workers == 0 else (direct.direct_num_workers or 1)
    if not is_local(options) or direct.direct_running_mode != "multi_processing" or workers <= 1:
        yield {}
        return
    with thread_environment(workers) as added:
        yield added


@contextlib.contextmanager
def thread_environment(workers: int) -> Iterator[dict]:
    """os.environ with the thread counts of one of `workers` processes sharing the cores, for the
    processes started inside the block (restored after; a variable the user set is kept)."""
    threads = str(threads_per_worker(workers))
    added = {name: threads for name in THREAD_ENV if name not in os.environ}
    os.environ.update(added)
    try:
        yield added
    finally:
        for name in added:
            os.environ.pop(name, None)


def sets_direct_options(beam_args: Sequence[str]) -> bool:
    """The user chose Beam's local running mode or worker count themselves."""
    return any(a.startswith(("--direct_running_mode", "--direct_num_workers")) for a in beam_args)
