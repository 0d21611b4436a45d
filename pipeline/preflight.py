"""One preflight before anything runs: every model the run needs and every input, checked
before OUT is touched; `prep run --dry-run` prints what it found and the plan.

Models resolve from local files only (models/locate.py, one function per loader; nothing is
downloaded here). A model that is not on disk is accepted only when the run may download it:
HF_HUB_OFFLINE is not set (prep applies it to every hub, not only Hugging Face's) and a TCP
connection to the host and port it would come from (HF_ENDPOINT moves the Hugging Face ones)
opens within PROBE_TIMEOUT_S (2 s). It is then reported as "will download from <url> at run
time"; otherwise it is an error. All problems (each missing model,
where it was looked for and the ways out; each missing input) are raised together as one
`PreflightFailed`, which the CLI prints in a few lines, exit status 2, with no traceback.
On a non-local runner (Dataflow) the workers load the models, often from weights baked into
their image (Dockerfile, pipeline/bake.py): there a model missing on this machine is a warning.

The preflight is fast on purpose (it imports neither torch nor rembg nor open_clip): offline,
a failed `--preset small` is known in seconds instead of after workers have started, each
retried downloads and printed tracebacks.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Optional, Sequence
from urllib.parse import urlparse

from prep.models.locate import (
    ModelLocation,
    hf_offline,
    locate_caption_model,
    locate_clip,
    locate_face_model,
    locate_mask_model,
)
from prep.pipeline.beam_options import check_beam_args
from prep.pipeline.config import RunConfig, identity_models, model_names

PROBE_TIMEOUT_S = 2.0
OFFLINE_WAY_OUT = "--preset tiny: small random models built locally, for a run without any network"


class PreflightFailed(ValueError):
    """Missing models or inputs, found before anything was written; the message lists them all."""


def network_reachable(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to host:port opens within `timeout` (through HTTPS_PROXY when set).
    A connection only: no HTTP request is sent, so a hub that answers 404 for the model counts."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy:
        parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = parsed.hostname or host, parsed.port or 8080
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class InputCheck:
    spec: str
    kind: Optional[str] = None
    problem: Optional[str] = None


@dataclass
class Preflight:
    """What the preflight found; `problems` empty means the run may start."""

    models: list[ModelLocation] = field(default_factory=list)
    inputs: list[InputCheck] = field(default_factory=list)
    reachable: dict[tuple[str, int], bool] = field(default_factory=dict)  # (host, port) -> probe result
    offline: bool = False  # HF_HUB_OFFLINE: no probe, nothing may download
    remote: bool = False  # a non-local runner (Dataflow): the workers load the models, not this machine
    memory: object = None  # gpu_plan.GpuPlan when the models run on a GPU
    seconds: float = 0.0

    def will_download(self, m: ModelLocation) -> bool:
        return not m.local and m.problem is None and m.download is not None and self.reachable.get((m.host, m.port), False)

    def missing(self) -> list[ModelLocation]:
        if self.remote:
            return []
        return [m for m in self.models if not m.local and not self.will_download(m)]

    def warnings(self) -> list[str]:
        if self.remote:
            return [f"{m.stage} model {m.model}: not on this machine ({m.problem or 'not in the local cache'}); "
                    "the workers must have it (baked into their image) or download it" for m in self.models if not m.local]
        return [f"{m.stage} model {m.model}: not in the local cache; will download from {m.download} at run time"
                for m in self.models if self.will_download(m)]

    def problems(self) -> list[str]:
        return [f"input {i.spec}: {i.problem}" for i in self.inputs if i.problem] + [
            self._why(m) for m in self.missing()]

    def _why(self, m: ModelLocation) -> str:
        if m.problem:
            return f"{m.stage} model {m.model}: {m.problem}"
        where = "; ".join(m.looked_in) or "nowhere on disk"
        if self.offline:
            net = "HF_HUB_OFFLINE is set, so it is not downloaded"
        else:
            hub = m.host if urlparse(m.download or "").port is None else f"{m.host}:{m.port}"
            net = f"{hub} is not reachable (nothing was downloaded)"
        return f"{m.stage} model {m.model}: not found locally (looked in {where}); {net}"

    def message(self) -> str:
        problems = self.problems()
        missing = self.missing()
        lines = [f"preflight: {len(problems)} problem(s); nothing was run and nothing was written to the output"]
        lines += [f"  - {p}" for p in problems]
        if missing:
            lines.append("ways out:")
            fixes = [fix for m in missing for fix in m.fixes]
            if any(m.download for m in missing):
                fixes.append("run where the hubs are reachable (unset HF_HUB_OFFLINE): downloads go to the caches above; "
                             "or fill the caches elsewhere with `python -m prep.pipeline.bake PRESET` and copy them")
            fixes.append(OFFLINE_WAY_OUT)
            lines += [f"  - {fix}" for fix in dict.fromkeys(fixes)]
        return "\n".join(lines)


def caption_family_checked(where: ModelLocation) -> ModelLocation:
    """A caption model on disk whose family prep does not run is a problem of the preflight
    (transforms/captioners.py lists the families), not a failure of every sample later."""
    from prep.transforms.captioners import (
        UnsupportedCaptioner,
        family_of,
        has_chat_template,
        read_model_type,
        supported,
    )

    local = os.path.expanduser(where.model)
    folder = where.path or (local if os.path.isfile(os.path.join(local, "config.json")) else None)
    if folder:  # (a local folder lacking files still says its family: that comes first)
        model_type = read_model_type(folder)
        try:
            family = family_of(model_type)
        except UnsupportedCaptioner:
            where.problem = f"caption model type {model_type!r} ({folder}) is not one prep runs"
            where.fixes = [f"a model of a supported family: {supported()}"]
            return where
        if where.problem is None and family.chat and os.path.isdir(folder) and not has_chat_template(folder):
            where.problem = (f"caption model {where.path} is a {family.name} chat model without a chat template: "
                             "the instruction cannot be placed")
            where.fixes = ["save its processor with the chat template (processor.save_pretrained keeps "
                           "chat_template.jinja)", "a checkpoint folder that has chat_template.jinja or .json"]
    return where


def needed_models(config: RunConfig) -> list[ModelLocation]:
    """Every model the run loads, located: caption, mask, CLIP, and the face model when an
    input's kind is verified by faces (celeba: in the paper and small presets)."""
    from prep.transforms import sources

    names = model_names(config)
    found = [
        caption_family_checked(locate_caption_model(names["caption_model"])),
        locate_mask_model(names["mask_model"]),
        locate_clip(names["clip_model"], names["clip_pretrained"]),
    ]
    kinds = set()
    for spec in config.inputs:
        try:
            kinds.add(sources.parse_input_spec(spec)[0])
        except ValueError:
            pass  # reported by check_inputs
    if any(identity_models(config).get(kind) == "face" for kind in kinds):
        found.append(locate_face_model(config.face_model))
    return found


def check_input(spec: str) -> InputCheck:
    """That an input exists (a folder, or a tar pattern matching a file); what it holds is
    planned later (transforms/sources), still before anything is written."""
    from apache_beam.io.filesystems import FileSystems

    from prep.transforms import sources

    check = InputCheck(spec)
    try:
        check.kind, location = sources.parse_input_spec(spec)
    except ValueError as exc:
        check.problem = str(exc)
        return check
    try:
        if check.kind == "wds":
            if not FileSystems.exists(location.rstrip("/")):  # a folder of tars, or a pattern
                sources.plan_wds(location)
        elif check.kind == "lsun":
            sources.check_lsun_location(location)
        elif not FileSystems.exists(sources.normalize_root(location)):
            check.problem = f"{location} does not exist"
    except (OSError, ValueError) as exc:
        check.problem = str(exc)
    return check


def check_exclude(path: str) -> InputCheck:
    """That the --exclude list reads (a takedown list that silently does not apply is the
    worst outcome)."""
    from prep.transforms.sources.exclude import read_exclude_list

    check = InputCheck(f"--exclude {path}", kind="exclude")
    try:
        listed = read_exclude_list(path)
    except (OSError, UnicodeDecodeError) as exc:
        check.problem = f"cannot read it ({type(exc).__name__}: {exc})"
        return check
    if not listed:
        check.problem = "it lists nothing (one URL, key or sha256 per line)"
    return check


def check_attribute_model(config: RunConfig, remote: bool = False) -> InputCheck:
    """The probe reads and was fit on this run's embedding model (its weights' sha256, else its
    name): a probe of another embedding space would predict nonsense, silently. On a remote
    runner the workers must reach it: not a local path."""
    from prep.models.attribute_probe import describe_embed_model, read_meta, same_embed_model
    from prep.pipeline.fingerprint import fingerprint_clip

    check = InputCheck(f"--attribute-model {config.attribute_model}", kind="attribute_model")
    if remote and "://" not in config.attribute_model:
        check.problem = "a local path, which the remote workers cannot read: copy the probe to gs:// and give that"
        return check
    try:
        meta = read_meta(config.attribute_model)
    except (OSError, ValueError) as exc:
        check.problem = str(exc)
        return check
    names = model_names(config)
    ours = fingerprint_clip(names["clip_model"], names["clip_pretrained"])
    theirs = meta.get("embed_model") or {}
    if not same_embed_model(theirs, ours):
        check.problem = (f"the probe was fit on embeddings of {describe_embed_model(theirs)}, this run embeds with "
                         f"{describe_embed_model(ours)}: fit a probe on an output of this embedding model")
    return check


def preflight(config: RunConfig, beam_args: Sequence[str] = (), *, raise_on_problems: bool = True) -> Preflight:
    """Check the models, the inputs and the GPU memory plan; raise PreflightFailed listing
    every missing model and input (unless raise_on_problems=False: the dry run shows them).
    The GPU plan raises gpu_plan.PlanDoesNotFit itself, as it always did."""
    from prep.pipeline import gpu_plan

    start = time.monotonic()
    config.validate()
    check_beam_args(beam_args)
    from apache_beam.options.pipeline_options import PipelineOptions

    from prep.pipeline.local import is_local

    report = Preflight(offline=hf_offline(), remote=not is_local(PipelineOptions(list(beam_args))))
    report.inputs = [check_input(spec) for spec in config.inputs]
    if config.exclude:
        report.inputs.append(check_exclude(config.exclude))
    if config.attribute_model:
        report.inputs.append(check_attribute_model(config, remote=report.remote))
    report.models = needed_models(config)
    targets = sorted({(m.host, m.port) for m in report.models if not m.local and m.problem is None and m.host})
    if targets and not report.offline and not report.remote:  # probed at once: one timeout, not one per host
        with ThreadPoolExecutor(len(targets)) as pool:
            report.reachable = dict(zip(targets, pool.map(lambda t: network_reachable(*t), targets)))
    # The GPU memory plan; with --device auto it imports torch (~3 s) to see a GPU: a run
    # that stops anyway for missing models or inputs does not wait for that.
    if not raise_on_problems or not report.problems() or config.device != "auto":
        names = model_names(config)
        report.memory = gpu_plan.plan_for_run(config, SimpleNamespace(**names), list(beam_args))
    report.seconds = time.monotonic() - start
    if raise_on_problems and report.memory is not None:  # the models run on a GPU: refuse a plan that cannot fit
        print(gpu_plan.format_plan(report.memory), file=sys.stderr, flush=True)
        gpu_plan.check_plan(report.memory, dataflow=gpu_plan.is_dataflow(list(beam_args)))
    if raise_on_problems and report.problems():
        raise PreflightFailed(report.message())
    return report


def _model_line(report: Preflight, m: ModelLocation) -> str:
    if m.local and m.path and m.path in (m.model, os.path.abspath(os.path.expanduser(m.model))):
        return f"  {m.stage:9s} {m.model} (local)"
    if m.local:
        return f"  {m.stage:9s} {m.model} -> {m.path or m.note}"
    if report.will_download(m):
        return f"  {m.stage:9s} {m.model}: will download from {m.download} at run time"
    return f"  {m.stage:9s} {m.model}: MISSING"


def dry_run(config: RunConfig, beam_args: Sequence[str] = ()) -> tuple[str, bool]:
    """The plan of a run, as text, and whether it could start; writes nothing to OUT.

    Inputs per source with their counts, identities, splits, the models and where each
    resolved from, warnings, the GPU memory plan and the worker processes a local run uses."""
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    from prep.pipeline import gpu_plan
    from prep.pipeline.local import SAMPLES_PER_TAR_GUESS, is_local, resolve_workers

    report = preflight(config, beam_args, raise_on_problems=False)
    lines = [f"dry run: nothing is written to {config.out}", "models:"]
    lines += [_model_line(report, m) for m in report.models]
    ok = not report.problems()
    warnings = report.warnings()
    planned = None
    if not any(i.problem for i in report.inputs):
        from prep.pipeline.build import plan_run

        try:
            plan = plan_run(config)
        except (OSError, ValueError) as exc:
            lines.append(f"inputs: {exc}")
            ok = False
        else:
            lines.append("inputs:")
            for report_ in plan.reports:
                mine = [i for i in plan.items if (i.origin or {}).get("input") == config.inputs.index(report_.spec)]
                if report_.kind == "wds":
                    count = f"{report_.items} tar(s)"
                else:
                    identities = len({i.identity for i in mine})
                    count = f"{len(mine)} images, {identities} identities"
                lines.append(f"  {report_.spec}: {count}")
                warnings += [f"{report_.spec}: {w}" for w in report_.warnings]
            if plan.ingest_dead:
                lines.append(f"  {len(plan.ingest_dead)} input(s) dead-lettered while planning (e.g. duplicate keys)")
            splits = plan.split_counts()
            lines.append("splits: " + (", ".join(f"{k} {v}" for k, v in splits.items()) or "none (no identity images)"))
            identity = plan.identity_header()["models"]
            if identity:
                lines.append("identity: " + ", ".join(f"{kind} by {mode}" for kind, mode in identity.items()))
            warnings += plan.warnings
            planned = len(plan.items) + SAMPLES_PER_TAR_GUESS * len(plan.wds_urls)
    options = PipelineOptions(list(beam_args))
    if is_local(options):
        workers = resolve_workers(config.workers, config.preset, config.device, planned)
        lines.append(f"runner: local, {workers} worker process(es)")
    else:
        lines.append(f"runner: {options.view_as(StandardOptions).runner}")
    if report.memory is not None:
        lines.append(gpu_plan.format_plan(report.memory))
    if warnings:
        lines.append("warnings:")
        lines += [f"  {w}" for w in warnings]
    if report.problems():
        lines.append(report.message())
    lines.append(f"preflight took {report.seconds:.1f} s; {'ready to run' if ok else 'the run would stop here'}")
    return "\n".join(lines), ok
