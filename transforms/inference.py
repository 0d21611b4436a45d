"""The shape every model stage shares: a Beam `ModelHandler` over `Sample`s, applied with
`RunInference`, whose failures become dead letters instead of crashing the job.

A stage subclasses `StageHandler` and writes four small methods:
  load_model()              heavy: called once per worker process by RunInference
  prepare(sample, model)    per element: decode, resize, normalise (runs inside the batch)
  infer(prepared, model)    per batch: one model call, returns one result per element
  finish(output)            optional, per element: host work on the model's output
                            (binarise, encode), on the pool like prepare; default: as is
  apply(sample, result)     per element: the Sample with the stage's fields filled

`run_inference` isolates failures: if a whole batch fails, each element is retried alone, so
one bad element costs only itself; an element whose prepare/infer fails, or for which infer
returns a `Reject`, leaves the stage as a DeadLetter with the stage name and the reason.

Determinism: a model's output for one element can depend on the batch's size (the matmul
kernels block differently; ViT-B-32 on CPU differs by ~1e-7), and Beam forms batches
differently on every run. Stages with `pad_batches` therefore always call the model with
exactly `max_batch_size` elements (the tail padded with copies of the last one, whose
outputs are dropped): measured, a row's output is then bit-identical whatever its
companions and position, so reruns write byte-identical shards.

Preparing off the model's thread: with `prepare_threads` > 1, `prepare` runs on a small
thread pool (JPEG/PNG decode, PIL resize and composite, numpy release the GIL). Beam's
RunInference calls `run_inference(batch, model)` once per batch from one thread and turns
its result into a list before it asks for the next batch, so a handler cannot prepare the
*next* call's elements while the model runs this one. What it can do, and does: ask
BatchElements for up to `PIPELINE_CHUNKS` model batches per call, submit every element's
`prepare` to the pool at once, and run the model on chunk k (exactly `max_batch_size`
elements, padded as above) while the pool prepares chunks k+1, ... Outputs are matched to
their elements by position, so the order and bytes of the results are those of the serial
path; an element whose prepare raises still dead-letters alone.

Models kept across pipelines: RunInference loads a model once per pipeline (its `Shared`
handle belongs to the DoFn instance, new in every pipeline). A chunked local run
(pipeline/chunks.py) runs one pipeline per chunk in the same process, so inside
`keep_models()` a stage's loaded model is kept and handed to the next pipeline's identical
handler (same class and same pickled configuration) instead of being loaded again.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import logging
import pickle
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, Iterable, Iterator, Optional, Sequence, TypeVar

import apache_beam as beam
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference

from prep.schemas.records import DeadLetter, DeadLetterKind, Sample
from prep.transforms.common import DEAD, counter, dead, progress_load

ModelT = TypeVar("ModelT")
log = logging.getLogger(__name__)

# Guards the lazy, once-per-process creation of what a handler cannot carry when pickled (its
# thread pool, the captioner's processor). Module level on purpose: a lock held by the handler
# would travel in the pipeline graph (tests/test_graph.py refuses that), and creation is rare.
LAZY_LOCK = threading.Lock()

# Model batches per run_inference call when preparing on a pool: the pool prepares chunks
# k+1.. while the model runs chunk k. More chunks overlap more but hold more prepared inputs.
PIPELINE_CHUNKS = 4


@dataclass(frozen=True)
class Reject:
    """A per-element outcome meaning "this element does not pass this stage"."""

    kind: DeadLetterKind
    reason: str


class ModelUnavailable(RuntimeError):
    """A model could not be found or loaded; the message says how to provide it."""

    MARK = "ModelUnavailable: "

    @classmethod
    def said_in(cls, exc: BaseException) -> Optional[str]:
        """The message of a ModelUnavailable that ended a run: the exception itself, or, from
        local worker processes, the last one quoted in the text of Beam's RuntimeError."""
        if isinstance(exc, cls):
            return str(exc)
        text = str(exc)
        at = text.rfind(cls.MARK)
        return " ".join(text[at + len(cls.MARK):].split()) if at >= 0 else None


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


class StageHandler(ModelHandler[Sample, Any, ModelT], Generic[ModelT]):
    stage = "stage"
    pad_batches = True  # see the module docstring; stages whose model runs per image turn it off

    def __init__(
        self,
        *,
        min_batch_size: Optional[int] = None,
        max_batch_size: int = 8,
        large_model: bool = False,
        model_copies: Optional[int] = None,
        prepare_threads: int = 1,
    ):
        # Padded stages pay for a full batch anyway: ask BatchElements for full batches from
        # the start instead of its adaptive ramp from 1.
        explicit_min = min_batch_size is not None
        if min_batch_size is None:
            min_batch_size = max_batch_size if self.pad_batches else 1
        min_batch_size = min(min_batch_size, max_batch_size)
        super().__init__(
            min_batch_size=min_batch_size,
            max_batch_size=max_batch_size,
            large_model=large_model,
            model_copies=model_copies,
        )
        if prepare_threads < 1:
            raise ValueError(f"prepare_threads must be >= 1, got {prepare_threads}")
        self.prepare_threads = prepare_threads
        # With a pool, one call holds several model batches (see the module docstring), and
        # calls are whole: BatchElements' adaptive sizes below a call's worth would leave the
        # pool idle at every call's end (the next call's elements do not exist yet), and in a
        # padded stage each size in between (9, 17, ...) would end in a padded model batch, a
        # full model call for one or two elements.
        per_call = max_batch_size * (PIPELINE_CHUNKS if prepare_threads > 1 else 1)
        if explicit_min:
            call_min = per_call if self.pad_batches and min_batch_size == max_batch_size else min_batch_size
        else:
            call_min = per_call if self.pad_batches or prepare_threads > 1 else 1
        self._batch_kwargs = {"min_batch_size": call_min, "max_batch_size": per_call}
        self.max_batch_size = max_batch_size
        self._pool: Optional[ThreadPoolExecutor] = None

    def __init_subclass__(cls, **kwargs):
        """Each stage's own `load_model` is timed for the console: "caption: loading MODEL" when it
        starts, "... loaded in 3.2 s" when it returns (transforms/common.py: progress_load; only
        where a local run's console listens). A stage says what it loads in `model_label`."""
        super().__init_subclass__(**kwargs)
        load = cls.__dict__.get("load_model")
        if load is not None and not getattr(load, "_timed", False):
            cls.load_model = _timed_load(load)

    def model_label(self) -> Optional[str]:
        """What load_model loads, for the console line (None: no line)."""
        return self.describe().get("model")

    def __getstate__(self):  # a thread pool does not pickle; each worker process makes its own
        state = dict(self.__dict__)
        state["_pool"] = None
        return state

    def _executor(self) -> Optional[ThreadPoolExecutor]:
        if self.prepare_threads <= 1:
            return None
        with LAZY_LOCK:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.prepare_threads, thread_name_prefix=f"prep-{self.stage}")
            return self._pool

    # -- what a stage writes -------------------------------------------------------------
    def load_model(self) -> ModelT:  # pragma: no cover - abstract
        raise NotImplementedError

    def prepare(self, sample: Sample, model: ModelT) -> Any:
        return sample

    def infer(self, prepared: list, model: ModelT) -> list:  # pragma: no cover - abstract
        raise NotImplementedError

    def apply(self, sample: Sample, result: Any) -> Sample:  # pragma: no cover - abstract
        raise NotImplementedError

    def finish(self, output: Any) -> Any:
        """Per-element host work on one model output (runs on the pool); a Reject passes through."""
        return output

    def describe(self) -> dict:
        """Model id and parameters, for the manifest."""
        return {}

    def _infer_fixed(self, prepared: list, model: ModelT) -> list:
        """`infer`, padded to max_batch_size when `pad_batches` (outputs of the padding dropped)."""
        n = len(prepared)
        if self.pad_batches and 0 < n < self.max_batch_size:
            prepared = list(prepared) + [prepared[-1]] * (self.max_batch_size - n)
        outputs = self.infer(prepared, model)
        if len(outputs) != len(prepared):
            raise RuntimeError(f"{self.stage}: {len(outputs)} outputs for {len(prepared)} inputs")
        return list(outputs)[:n]

    # -- Beam plumbing -------------------------------------------------------------------
    def batch_elements_kwargs(self):
        return self._batch_kwargs

    def get_metrics_namespace(self) -> str:
        return f"prep.{self.stage}"

    def get_num_bytes(self, batch: Sequence[Sample]) -> int:
        """RunInference's bytes counter for a batch: its samples' payload (images, mask,
        arrays). Beam's default measures it as `len(pickle.dumps(batch))`, every image copied
        once more per stage: 14.5% of a stage's own time with an instant model (py-spy, mask at
        CelebA size), for a metric."""
        return sum(s.payload_bytes() for s in batch)

    def _prepare_one(self, sample: Sample, model: ModelT) -> tuple[bool, Any]:
        """(True, prepared) or (False, Reject): never raises, so the pool never holds an error."""
        try:
            return True, self.prepare(sample, model)
        except Exception as exc:  # noqa: BLE001 - becomes a dead letter with the reason
            return False, Reject(DeadLetterKind.PREPROCESSING_FAILED, f"preprocessing failed: {_describe(exc)}")

    def run_inference(
        self, batch: Sequence[Sample], model: ModelT, inference_args: Optional[dict] = None
    ) -> Iterable[PredictionResult]:
        batch = list(batch)
        results: list[Any] = [None] * len(batch)
        pool = self._executor()
        if pool is not None:  # every prepare queued now; the model starts on chunk 0 when it is ready
            futures: list[Future] = [pool.submit(self._prepare_one, s, model) for s in batch]
            prepared_at = lambda i: futures[i].result()  # noqa: E731
        else:
            prepared_at = lambda i: self._prepare_one(batch[i], model)  # noqa: E731
        for start in range(0, len(batch), self.max_batch_size):
            ready: list[tuple[int, Any]] = []
            for i in range(start, min(start + self.max_batch_size, len(batch))):
                ok, value = prepared_at(i)
                if ok:
                    ready.append((i, value))
                else:
                    results[i] = value
            if ready:
                self._infer_chunk(ready, model, results)
                for i, _ in ready:  # finish on the pool while the model runs the next chunk
                    if not isinstance(results[i], Reject):
                        results[i] = pool.submit(self._finish_one, results[i]) if pool else self._finish_one(results[i])
        if pool is not None:
            results = [r.result() if isinstance(r, Future) else r for r in results]
        return [PredictionResult(example=s, inference=r) for s, r in zip(batch, results)]

    def _finish_one(self, output: Any) -> Any:
        try:
            return self.finish(output)
        except Exception as exc:  # noqa: BLE001 - becomes a dead letter with the reason
            return Reject(DeadLetterKind.POSTPROCESSING_FAILED, f"postprocessing failed: {_describe(exc)}")

    def _infer_chunk(self, ready: list[tuple[int, Any]], model: ModelT, results: list) -> None:
        """One model batch; if it fails as a whole, each element is retried alone."""
        try:
            outputs = self._infer_fixed([p for _, p in ready], model)
            for (i, _), out in zip(ready, outputs):
                results[i] = out
        except Exception as batch_exc:  # noqa: BLE001 - isolate: retry each element alone
            if len(ready) > 1:
                log.warning("%s: batch of %d failed (%s); retrying one by one",
                            self.stage, len(ready), _describe(batch_exc))
            for i, prepared in ready:
                try:
                    results[i] = self._infer_fixed([prepared], model)[0]
                except Exception as exc:  # noqa: BLE001
                    results[i] = Reject(DeadLetterKind.INFERENCE_FAILED, f"inference failed: {_describe(exc)}")


_kept_lock = threading.Lock()
_kept: Optional[dict[str, Any]] = None  # model key -> loaded model, inside keep_models()


@contextlib.contextmanager
def keep_models() -> Iterator[dict[str, Any]]:
    """Within this block, a loaded model is kept and reused by identical handlers of later
    pipelines in this process (a chunked run's chunks); released when the block ends."""
    global _kept
    with _kept_lock:
        outer = _kept
        if outer is None:
            _kept = {}
        kept = _kept
    try:
        yield kept
    finally:
        if outer is None:
            with _kept_lock:
                _kept = None


def keep_models_in_this_process() -> None:
    """keep_models() for the rest of this process's life (a chunk worker's)."""
    global _kept
    with _kept_lock:
        if _kept is None:
            _kept = {}


def model_key(handler: "StageHandler") -> Optional[str]:
    """What identifies a handler's model: its class and its pickled configuration (None: not
    picklable, so never shared)."""
    try:
        state = pickle.dumps((type(handler).__module__, type(handler).__qualname__,
                              sorted(handler.__getstate__().items())), protocol=4)
    except Exception:  # noqa: BLE001 - an unpicklable handler just loads its own model
        return None
    return hashlib.sha256(state).hexdigest()


def settle_heap() -> None:
    """Take what is alive now (the interpreter's modules, torch, Beam, the model just
    loaded) out of every later garbage collection: collect once, then `gc.freeze()`.

    A worker holds ~0.5 M tracked objects once torch, transformers and Beam are imported, and
    every full (generation-2) collection walks all of them: ~0.17 s here, several times a run,
    each one a pause of the whole stage. They live as long as the process, so the collector
    never frees any of them; frozen, a full collection walks only what the run made since.
    Garbage at the moment of the call is collected first, so nothing dead is frozen; what is
    alive now and dies later in a reference cycle waits for the process's end (a model's
    load-time objects, which a worker keeps anyway)."""
    gc.collect()
    gc.freeze()


def _timed_load(load):
    @functools.wraps(load)
    def timed(self):
        key = model_key(self) if _kept is not None else None
        if key is not None:
            with _kept_lock:
                kept = _kept.get(key) if _kept is not None else None
            if kept is not None:
                return kept
        label = self.model_label()
        if label is None:
            model = load(self)
        else:
            progress_load(self.stage, label)
            start = time.monotonic()
            model = load(self)
            progress_load(self.stage, label, time.monotonic() - start)
        if key is not None:
            with _kept_lock:
                if _kept is not None:
                    _kept[key] = model
        settle_heap()
        return model

    timed._timed = True
    return timed


class _ApplyResults(beam.DoFn):
    def __init__(self, handler: StageHandler):
        self._handler = handler
        self._ok = counter(handler.stage, "ok")
        self._rejected = counter(handler.stage, "dead_lettered")

    def process(self, result: PredictionResult):
        sample: Sample = result.example
        outcome = result.inference
        if isinstance(outcome, Reject):
            self._rejected.inc()
            yield dead(DeadLetter.of(sample, self._handler.stage, outcome.kind, outcome.reason))
            return
        try:
            updated = self._handler.apply(sample, outcome)
        except Exception as exc:  # noqa: BLE001 - becomes a dead letter with the reason
            self._rejected.inc()
            yield dead(DeadLetter.of(
                sample, self._handler.stage, DeadLetterKind.POSTPROCESSING_FAILED, f"postprocessing failed: {_describe(exc)}"
            ))
            return
        self._ok.inc()
        yield updated


class ModelStage(beam.PTransform):
    """Samples -> (samples that passed, dead letters), running `handler` via RunInference."""

    def __init__(self, handler: StageHandler, label: Optional[str] = None):
        super().__init__(label)
        self._handler = handler

    def expand(self, samples):
        inferred = samples | "RunInference" >> RunInference(self._handler)
        outputs = inferred | "Apply" >> beam.ParDo(_ApplyResults(self._handler)).with_outputs(DEAD, main="ok")
        return outputs.ok, outputs[DEAD]

