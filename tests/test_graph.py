"""Level 0 for Dataflow: the FULL pipeline (tiny preset, demo data) built with Dataflow options
and taken through what the DataflowRunner does before it submits a job (the GroupByKey-input,
side-input and CombineFn visitors, its transform overrides, `to_runner_api`, combiner
packing), but never run and without constructing the runner (apache-beam[gcp] is not needed).

`check_graph(build)` lists what Dataflow or its workers would reject:

- the graph does not build or does not convert to the Runner API proto (what is submitted);
- a transform name is repeated, or is an automatic `<lambda at file.py:LINE>` label of prep's
  own code (it changes when code moves: a job can then not be updated in place);
- a GroupByKey or keyed side input whose key coder is not deterministic; and, listed apart
  (`untyped_keys`), a GroupByKey whose key type is not a plain str/int/bytes/None: an `Any` key
  gets Beam's deterministic fallback coder, which works for str/int values but is checked only
  at run time, per element;
- a pickled DoFn / CombineFn / WindowFn that does not unpickle in a fresh interpreter which,
  like a worker, has only the installed packages (no test modules, no `__main__` helpers);
- an unpickled function object that holds a model (torch Module, onnxruntime session) or a
  lock, socket or open file: models must load in `setup()`/`load_model()`, and Beam's pickler
  silently replaces a captured lock by a new one on every worker;
- a payload over 1 MB, or a whole graph over Dataflow's 10 MB job-graph limit.

Run as a script (`python -I tests/test_graph.py PAYLOADS`), this file is the fresh process.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pickle
import random
import re
import subprocess
import sys
import tempfile
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import apache_beam as beam
import pytest
from apache_beam.runners.runner import PipelineRunner

# The README's Dataflow options (no job is submitted: nothing here reaches Google Cloud).
DATAFLOW_ARGS = [
    "--runner=DataflowRunner", "--project=p", "--region=r", "--temp_location=gs://b/tmp",
    "--sdk_container_image=r-docker.pkg.dev/p/prep/prep:0.1.0", "--experiments=use_runner_v2",
    "--machine_type=g2-standard-8", "--number_of_worker_harness_threads=1",
]
CELEBA_IMAGES = 202_599
SCALE_ITEMS = 60_000  # the staging test's plan: over INLINE_ITEMS, two items files

# Dataflow's documented limits: a job graph of at most 10 MB (the JSON request: 20 MB).
JOB_GRAPH_LIMIT = 10 * 2**20
PAYLOAD_LIMIT = 2**20

# Objects no pickled function may carry, by fully qualified class name (matched on the MRO,
# so torch / onnxruntime need not be imported to check for them).
FORBIDDEN_TYPES = {
    "torch.nn.modules.module.Module": "a torch model (load it in setup() / ModelHandler.load_model())",
    "torch.Tensor": "a torch tensor (weights belong in the model file, loaded on the worker)",
    "torch._C.TensorBase": "a torch tensor (weights belong in the model file, loaded on the worker)",
    "onnxruntime.capi.onnxruntime_inference_collection.InferenceSession": "an onnxruntime session (create it in setup())",
    "_thread.lock": "a threading.Lock (Beam's pickler replaces it by a new lock on each worker; create it in setup())",
    "_thread.RLock": "a threading.RLock (Beam's pickler replaces it by a new lock on each worker; create it in setup())",
    "socket.socket": "a socket (open connections in setup())",
    "_io._IOBase": "an open file (open it in process() or setup())",
}

# Keys that a standard, deterministic coder encodes.
PLAIN_KEY_TYPES = (str, int, bytes, bool, type(None))

_AUTO_LABEL = re.compile(r"<lambda at (?P<file>[\w.]+\.py):\d+>")
_PAYLOAD_URNS = {
    "beam:transform:pardo:v1": "do_fn",
    "beam:transform:combine_per_key:v1": "combine_fn",
    "beam:transform:combine_globally:v1": "combine_fn",
    "beam:transform:combine_grouped_values:v1": "combine_fn",
    "beam:transform:window_into:v1": "window_fn",
}


# --------------------------------------------------------------------------------------
# The checker
# --------------------------------------------------------------------------------------


@dataclass
class GraphReport:
    problems: list[str] = field(default_factory=list)  # what Dataflow or a worker would reject
    untyped_keys: list[str] = field(default_factory=list)  # GroupByKeys of prep's with an Any key
    payloads: dict[str, int] = field(default_factory=dict)  # transform -> pickled bytes
    group_by_keys: dict[str, str] = field(default_factory=dict)  # transform -> key type
    graph_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


class BuildOnlyRunner(PipelineRunner):
    """Stands in for the runner: the pipeline is built and translated, never run."""

    def run_pipeline(self, pipeline, options):
        raise RuntimeError("this pipeline is built for a graph check only")


def dataflow_pipeline(args=DATAFLOW_ARGS):
    from apache_beam.options.pipeline_options import PipelineOptions

    return beam.Pipeline(runner=BuildOnlyRunner(), options=PipelineOptions(list(args)))


def prepare_like_dataflow(p) -> None:
    """The pipeline rewrites DataflowRunner.run_pipeline does before `to_runner_api`."""
    from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner
    from apache_beam.runners.pipeline_utils import group_by_key_input_visitor

    p.visit(group_by_key_input_visitor(True))
    p.visit(DataflowRunner.combinefn_visitor())
    p.visit(DataflowRunner.side_input_visitor(deterministic_key_coders=True))
    p.replace_all(DataflowRunner._PTRANSFORM_OVERRIDES)


def _own_label(full_label: str) -> bool:
    """Whether an automatic label comes from prep's code rather than Beam's internals."""
    m = _AUTO_LABEL.search(full_label)
    return bool(m) and m.group("file") not in _beam_files()


@functools.lru_cache(maxsize=1)
def _beam_files() -> frozenset[str]:
    import apache_beam

    return frozenset(p.name for p in Path(apache_beam.__file__).parent.rglob("*.py"))


def _key_type_name(key_type) -> str:
    if key_type is None:
        return "None"
    return getattr(key_type, "__name__", None) or str(key_type)


def _check_group_by_keys(p, report: GraphReport) -> None:
    """The key type of every GroupByKey (Beam's own, e.g. in Reshuffle, are typed int/None)."""
    from apache_beam.pipeline import PipelineVisitor
    from apache_beam.typehints import typehints

    class Visitor(PipelineVisitor):
        def visit_transform(self, node):
            if not isinstance(node.transform, beam.GroupByKey):
                return
            element_type = node.inputs[0].element_type
            key_type = typehints.coerce_to_kv_type(element_type, node.full_label).tuple_types[0]
            report.group_by_keys[node.full_label] = _key_type_name(key_type)
            plain = key_type is None or (isinstance(key_type, type) and issubclass(key_type, PLAIN_KEY_TYPES))
            if not plain:
                report.untyped_keys.append(
                    f"{node.full_label}: GroupByKey key type is {_key_type_name(key_type)}, not str/int/bytes "
                    "(type the step before it, e.g. .with_output_types(tuple[str, V]), so the key gets a "
                    "standard deterministic coder)"
                )

    p.visit(Visitor())


def _check_key_coders(proto, context, report: GraphReport) -> None:
    """Every GroupByKey input, and every keyed (multimap) side input, has a deterministic key coder."""
    from apache_beam.portability.api import beam_runner_api_pb2

    components = proto.components

    def key_coder_of(pcoll_id: str):
        coder = context.coders.get_by_id(components.pcollections[pcoll_id].coder_id)
        return coder.key_coder() if coder.is_kv_coder() else None

    for t in components.transforms.values():
        checks = []
        if t.spec.urn == "beam:transform:group_by_key:v1":
            checks = [("GroupByKey input", pid) for pid in t.inputs.values()]
        elif t.spec.urn == "beam:transform:pardo:v1":
            payload = beam_runner_api_pb2.ParDoPayload.FromString(t.spec.payload)
            checks = [
                (f"side input {tag}", t.inputs[tag])
                for tag, si in payload.side_inputs.items()
                if si.access_pattern.urn == "beam:side_input:multimap:v1"
            ]
        for what, pid in checks:
            key_coder = key_coder_of(pid)
            if key_coder is None or not key_coder.is_deterministic():
                report.problems.append(f"{t.unique_name}: {what} key coder {key_coder} is not deterministic")


def _check_names(proto, report: GraphReport) -> None:
    names = [t.unique_name for t in proto.components.transforms.values() if t.unique_name]
    repeated = sorted({n for n in names if names.count(n) > 1})
    report.problems += [f"transform name {n!r} is used more than once" for n in repeated]
    for name in names:
        leaf = name.rsplit("/", 1)[-1]
        if _own_label(leaf):
            report.problems.append(f"{name}: automatic label (name the step: 'Label' >> ...)")


def _payloads(proto) -> Iterator[tuple[str, str, bytes]]:
    """(transform name, kind, pickled payload) of every pickled Python function in the graph."""
    from apache_beam.portability.api import beam_runner_api_pb2

    messages = {
        "do_fn": beam_runner_api_pb2.ParDoPayload,
        "combine_fn": beam_runner_api_pb2.CombinePayload,
        "window_fn": beam_runner_api_pb2.WindowIntoPayload,
    }
    for t in proto.components.transforms.values():
        kind = _PAYLOAD_URNS.get(t.spec.urn)
        if kind is None:
            continue
        spec = getattr(messages[kind].FromString(t.spec.payload), kind)
        if "pickled" in spec.urn:  # e.g. beam:dofn:pickled_python_info:v1 (others name a runner-known fn)
            yield t.unique_name, kind, spec.payload


def _check_payloads_in_fresh_process(proto, report: GraphReport) -> None:
    entries = list(_payloads(proto))
    for name, _kind, payload in entries:
        report.payloads[name] = len(payload)
        if len(payload) > PAYLOAD_LIMIT:
            report.problems.append(f"{name}: pickled function is {len(payload) / 2**20:.1f} MB (data or a model in a closure?)")
    with tempfile.TemporaryDirectory(prefix="graph-check-") as tmp:
        path = Path(tmp) / "payloads.pkl"
        path.write_bytes(pickle.dumps(entries))
        # -I: no script directory, cwd, user site or PYTHON* variables on the path, like a
        # worker that has only the installed packages.
        proc = subprocess.run(
            [sys.executable, "-I", str(Path(__file__).resolve()), str(path)],
            check=False, cwd=tmp, capture_output=True, text=True, timeout=600,
        )
    if proc.returncode != 0:
        report.problems.append(f"fresh-process unpickling crashed ({proc.returncode}): {proc.stderr[-2000:]}")
        return
    for finding in json.loads(proc.stdout.strip().splitlines()[-1]):
        report.problems.append(finding)


def check_graph(build: Callable[[Any], None], args=DATAFLOW_ARGS, *, fresh_process: bool = True) -> GraphReport:
    """Build a pipeline with `build(p)` on Dataflow-like options and check it (see module doc).

    `fresh_process=False` skips unpickling the payloads in a subprocess (a few seconds).
    """
    report = GraphReport()
    p = dataflow_pipeline(args)
    try:
        build(p)
        prepare_like_dataflow(p)
    except Exception as exc:  # a construction error is a finding: ParDo pickles fns when built
        report.problems.append(f"building the pipeline failed: {type(exc).__name__}: {exc}")
        return report
    _check_group_by_keys(p, report)
    try:
        proto, context = p.to_runner_api(return_context=True)
    except Exception as exc:
        report.problems.append(f"to_runner_api failed: {type(exc).__name__}: {exc}")
        return report
    report.graph_bytes = proto.ByteSize()
    if report.graph_bytes > JOB_GRAPH_LIMIT:
        report.problems.append(f"job graph is {report.graph_bytes / 2**20:.1f} MB, over Dataflow's 10 MB limit")
    try:
        from apache_beam.runners.portability.fn_api_runner import translations

        translations.optimize_pipeline(
            proto, phases=[translations.pack_combiners, translations.sort_stages], known_runner_urns=frozenset(), partial=True
        )
    except Exception as exc:
        report.problems.append(f"Dataflow's combiner packing failed: {type(exc).__name__}: {exc}")
    _check_names(proto, report)
    _check_key_coders(proto, context, report)
    if fresh_process:
        _check_payloads_in_fresh_process(proto, report)
    return report


# --------------------------------------------------------------------------------------
# The fresh-process side: unpickle each payload, then look through what it holds
# --------------------------------------------------------------------------------------


def _qualified_names(obj) -> Iterator[str]:
    for cls in type(obj).__mro__:
        yield f"{cls.__module__}.{cls.__qualname__}"


def _children(obj) -> Iterator[tuple[str, Any]]:
    """(attribute path step, value) of what an object holds, as far as pickling carries it."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield f"[{k!r}]", v
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for i, v in enumerate(obj):
            yield f"[{i}]", v
    elif isinstance(obj, functools.partial):
        yield ".func", obj.func
        yield ".args", obj.args
        yield ".keywords", obj.keywords
    elif isinstance(obj, types.MethodType):
        yield ".__self__", obj.__self__
        yield ".__func__", obj.__func__
    elif isinstance(obj, types.FunctionType):
        for name, cell in zip(obj.__code__.co_freevars, obj.__closure__ or ()):
            try:
                yield f".<closure {name}>", cell.cell_contents
            except ValueError:  # empty cell
                pass
        yield ".__defaults__", obj.__defaults__ or ()
        yield ".__kwdefaults__", obj.__kwdefaults__ or {}
        module = sys.modules.get(obj.__module__)
        if module is None or obj.__globals__ is not vars(module):
            # Pickled by value (a lambda, a local function): the module-level objects it
            # uses travelled with it. (A function pickled by reference brings none: they
            # come from importing its module on the worker.)
            for name in obj.__code__.co_names:
                if name in obj.__globals__:
                    yield f".<global {name}>", obj.__globals__[name]
    else:
        state = getattr(obj, "__dict__", None)
        if isinstance(state, dict):
            for k, v in state.items():
                yield f".{k}", v
        for slot in getattr(type(obj), "__slots__", ()):
            if isinstance(slot, str) and hasattr(obj, slot):
                yield f".{slot}", getattr(obj, slot)


# Not looked into: plain values, and what pickles by name and so comes from the worker's own
# imports rather than from the payload (classes, modules, builtins, loggers).
_LEAVES = (
    str, bytes, bytearray, int, float, complex, bool, type(None),
    type, types.ModuleType, types.BuiltinFunctionType, logging.Logger,
)


def forbidden_objects(root, limit: int = 200_000) -> list[str]:
    """Paths to forbidden objects reachable from `root` (see FORBIDDEN_TYPES)."""
    found, seen, todo = [], set(), [("fn", root)]
    while todo and len(seen) < limit:
        path, obj = todo.pop()
        if id(obj) in seen or isinstance(obj, _LEAVES):
            continue
        seen.add(id(obj))
        reason = next((FORBIDDEN_TYPES[n] for n in _qualified_names(obj) if n in FORBIDDEN_TYPES), None)
        if reason:
            found.append(f"{path}: {reason}")
            continue
        if type(obj).__module__.startswith("numpy"):
            continue
        todo.extend((path + step, child) for step, child in _children(obj))
    return found


def check_payloads(entries: list[tuple[str, str, bytes]]) -> list[str]:
    """Unpickle every payload first (a clean interpreter), then inspect what each holds."""
    from apache_beam.internal import pickler

    loaded, problems = [], []
    for name, kind, payload in entries:
        try:
            loaded.append((name, kind, pickler.loads(payload)))
        except Exception as exc:
            problems.append(f"{name}: {kind} does not unpickle in a fresh process: {type(exc).__name__}: {exc}")
    for name, kind, obj in loaded:
        problems += [f"{name}: {kind} holds {finding}" for finding in forbidden_objects(obj)]
    return problems


# --------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plan(demo, tiny, tiny_cache):
    from conftest import demo_config
    from prep.pipeline.build import plan_run

    return plan_run(demo_config(demo, "gs://b/out", tiny_cache))


@pytest.fixture(scope="module")
def report(plan) -> GraphReport:
    from prep.pipeline.build import build_pipeline

    return check_graph(lambda p: build_pipeline(p, plan))


def test_full_pipeline_passes_the_dataflow_graph_check(report):
    assert report.ok, "\n".join(report.problems)
    assert report.graph_bytes < JOB_GRAPH_LIMIT


def test_checker_saw_every_step(report):
    """The check looked at the real graph: model stages, pairing, writers, manifest."""
    for step in ("ReadImages", "Decode", "Caption/", "Mask/", "Embed/", "Pair/PickRefs", "WriteSpecific/", "WriteManifest/"):
        assert any(name.startswith(step) for name in report.payloads), step
    assert "Pair/GroupByIdentity" in report.group_by_keys


def test_model_stages_carry_paths_not_weights(report):
    stages = [n for n in report.payloads if n.split("/")[0] in ("Caption", "Mask", "Embed")]
    assert max(report.payloads[n] for n in stages) < 64 * 1024, {n: report.payloads[n] for n in stages}


def test_job_graph_fits_at_celeba_scale(plan):
    """`beam.Create(plan.items)` puts every input's SourceItem into the job graph: measure the
    bytes per item and extrapolate to all of CelebA (the graph must stay under 10 MB)."""
    from prep.pipeline.build import build_pipeline
    from prep.transforms.attributes import CELEBA_ATTRIBUTES

    def graph_bytes(n: int) -> int:
        rng = random.Random(0)  # random attributes compress worst: a conservative estimate
        items = [
            dataclasses.replace(
                plan.items[0],
                key=f"celeba_{i:06d}",
                path=f"gs://bucket/celeba/img_align_celeba/{i:06d}.jpg",
                identity=str(rng.randint(1, 10177)),
                attributes={a: rng.random() < 0.5 for a in CELEBA_ATTRIBUTES},
            )
            for i in range(1, n + 1)
        ]
        larger = dataclasses.replace(plan, items=items)
        report = check_graph(lambda p: build_pipeline(p, larger), fresh_process=False)
        assert report.ok, report.problems
        return report.graph_bytes

    base, n = graph_bytes(0), 10_000
    per_item = (graph_bytes(n) - base) / n
    estimate = base + per_item * CELEBA_IMAGES
    assert estimate < JOB_GRAPH_LIMIT, f"{per_item:.0f} B/item: a CelebA-sized graph would be {estimate / 2**20:.1f} MB"


def test_group_by_keys_are_typed_str_or_int(report):
    assert not report.untyped_keys, "\n".join(report.untyped_keys)


# ---- the checker catches real mistakes ---------------------------------------------------


def _two_words(p):
    return p | "Create" >> beam.Create(["a", "b"])


def test_lambda_closing_over_a_lock_is_caught():
    import threading

    lock = threading.Lock()

    class Guarded(beam.DoFn):  # a local class: pickled by value, so it unpickles anywhere
        def __init__(self):
            self.guarded = lambda x: (lock, x)[1]

        def process(self, x):
            yield self.guarded(x)

    report = check_graph(lambda p: _two_words(p) | "Guarded" >> beam.ParDo(Guarded()))
    assert any(m.startswith("Guarded:") and "<closure lock>: a threading.Lock" in m for m in report.problems), report.problems


def test_unpicklable_closure_is_caught_when_built():
    import socket

    with socket.socket() as sock:
        report = check_graph(lambda p: _two_words(p) | "Send" >> beam.Map(lambda x: (sock, x)[1]))
    assert len(report.problems) == 1 and "Unable to pickle fn" in report.problems[0], report.problems


class _NotOnWorkers(beam.DoFn):
    """Defined in a test module: the fresh process, like a worker, cannot import it."""

    def process(self, x):
        yield x


def test_dofn_from_a_module_workers_lack_is_caught():
    report = check_graph(lambda p: _two_words(p) | "Local" >> beam.ParDo(_NotOnWorkers()))
    assert any(m.startswith("Local:") and "does not unpickle in a fresh process" in m for m in report.problems), report.problems


def test_model_held_by_a_dofn_is_caught():
    import torch

    class Holder(beam.DoFn):
        def __init__(self):
            self.net = torch.nn.Linear(2, 2)

        def process(self, x):
            yield x

    report = check_graph(lambda p: _two_words(p) | "Holder" >> beam.ParDo(Holder()))
    assert any(m.startswith("Holder:") and "fn[0].net: a torch model" in m for m in report.problems), report.problems


def test_untyped_key_and_automatic_label_are_caught():
    owner = {"a": "x", "b": "y"}

    def build(p):
        keyed = _two_words(p) | beam.Map(lambda s: (owner[s], s))  # no label; Beam cannot infer the key type
        keyed | "Group" >> beam.GroupByKey()

    report = check_graph(build)
    assert report.untyped_keys and report.untyped_keys[0].startswith("Group:"), report.untyped_keys
    assert any("automatic label" in m for m in report.problems), report.problems


if __name__ == "__main__":
    print(json.dumps(check_payloads(pickle.loads(Path(sys.argv[1]).read_bytes()))))  # deliberate: our own DoFn payloads, written by this test


def test_items_from_files_keep_the_graph_small_at_any_scale(plan, tmp_path):
    """Planned items inline (beam.Create) grow the job graph with every item (at CelebA scale,
    megabytes of Dataflow's 10 MB limit); stage_items() writes them under OUT/_plan/ and the
    graph reads them there, so it stays the size of the demo's. Checked at 60,000 items (over
    INLINE_ITEMS, two staged files): fails if staging stops happening (the threshold, the
    files, or build_pipeline reading them)."""
    from prep.pipeline.build import build_pipeline
    from prep.pipeline.items import INLINE_ITEMS, stage_items
    from prep.schemas import contract

    def graph_bytes(p):
        report = check_graph(lambda pipeline: build_pipeline(pipeline, p), fresh_process=False)
        assert report.ok, report.problems
        return report.graph_bytes

    n = len(plan.items)
    items = [dataclasses.replace(plan.items[i % n], key=f"celeba_{i:06d}", path=f"/data/img/{i:06d}.jpg")
             for i in range(SCALE_ITEMS)]
    big = dataclasses.replace(plan, items=items, items_pattern=None)
    out = tmp_path / "out"
    big.items_pattern = stage_items(big.items, str(out))
    assert big.items_pattern == f"{out}/{contract.PLAN_DIR}/items-*.jsonl"
    staged_lines = sum(len(f.read_text().splitlines()) for f in (out / contract.PLAN_DIR).glob("items-*.jsonl"))
    assert staged_lines == SCALE_ITEMS and len(list((out / contract.PLAN_DIR).glob("items-*.jsonl"))) == 2
    demo = dataclasses.replace(plan, items_pattern=None)
    demo.items_pattern = stage_items(demo.items, str(tmp_path / "small"))
    assert demo.items_pattern is None and len(demo.items) <= INLINE_ITEMS  # the demo stays inline
    staged, small = graph_bytes(big), graph_bytes(demo)
    assert staged < JOB_GRAPH_LIMIT / 20 and abs(staged - small) < 0.05 * small, (staged, small)
    # The same items inline: every item is in the graph (the check above can fail).
    inline = graph_bytes(dataclasses.replace(big, items_pattern=None))
    assert inline - small > 10 * SCALE_ITEMS, (inline, small)
