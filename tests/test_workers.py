"""`prep run --workers N` (Beam's multi_processing mode) and the multi_threading guard."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from prep.pipeline import local
from prep.pipeline.local import UnsafeRunnerOptions, auto_workers, check_options, worker_args, worker_environment
from prep.pipeline.run import make_runner
from tests.conftest import demo_config


# ---------------------------------------------------------------------------- the guard


@pytest.mark.parametrize("args", [
    ["--direct_running_mode=multi_threading"],
    ["--direct_running_mode=multi_threading", "--direct_num_workers=1"],  # one worker splits elements too
    ["--direct_running_mode", "multi_threading", "--direct_num_workers=4"],
])
def test_multi_threading_is_refused_with_its_cause_and_the_alternative(args):
    with pytest.raises(UnsafeRunnerOptions) as err:
        make_runner(PipelineOptions(args))
    message = str(err.value)
    assert "data_buffer_time_limit_ms" in message and "--workers N" in message and "bench.mt_repro" in message


@pytest.mark.parametrize("experiment", ["data_buffer_time_limit_ms=1000", "data_buffer_time_limit_ms=1"])
def test_the_time_based_flush_experiment_is_refused_on_any_runner(experiment):
    with pytest.raises(UnsafeRunnerOptions, match="timer thread"):
        check_options(PipelineOptions(["--runner=DataflowRunner", f"--experiments={experiment}"]))


@pytest.mark.parametrize("args", [
    [], ["--direct_running_mode=in_memory"], ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
    ["--experiments=data_buffer_time_limit_ms=0"], ["--runner=DataflowRunner", "--direct_running_mode=multi_threading"],
])
def test_safe_options_pass(args):
    check_options(PipelineOptions(args))


def test_run_refuses_multi_threading_before_writing_anything(demo, tiny_cache, tmp_path):
    from prep.pipeline.run import run

    out = tmp_path / "out"
    with pytest.raises(UnsafeRunnerOptions):
        run(demo_config(demo, str(out), tiny_cache), ["--direct_running_mode=multi_threading"])
    assert not out.exists()


# ---------------------------------------------------------------------------- options


def test_workers_map_to_multi_processing():
    assert worker_args(1, ["--foo=1"]) == ["--foo=1"]
    assert worker_args(3, ["--foo=1"]) == ["--direct_running_mode=multi_processing", "--direct_num_workers=3", "--foo=1"]
    assert worker_args(3, ["--direct_num_workers=5"]) == ["--direct_num_workers=5"]  # the user's own win


def test_sdk_workers_get_the_logging_options():
    from google.protobuf import json_format

    assert local.worker_provision_info(PipelineOptions([])) is None
    info = local.worker_provision_info(PipelineOptions(worker_args(2, [])))
    sent = json_format.MessageToDict(info.provision_info.pipeline_options)["options"]
    assert sent["default_sdk_harness_log_level"] == "WARNING" and sent["sdk_harness_log_level_overrides"]["__main__"] == "ERROR"
    info = local.worker_provision_info(PipelineOptions(worker_args(2, ["--default_sdk_harness_log_level=DEBUG"])))
    assert json_format.MessageToDict(info.provision_info.pipeline_options)["options"]["default_sdk_harness_log_level"] == "DEBUG"


def test_auto_workers_is_cores_capped_by_memory_and_one_on_a_gpu(monkeypatch):
    monkeypatch.setattr(local, "has_gpu", lambda: False)
    gb = 2**30
    assert auto_workers("tiny", "cpu", cores=32, memory=1000 * gb) == 32
    assert auto_workers("small", "cpu", cores=32, memory=20 * gb) == 4  # 0.8 * 20 GB / 4 GB per worker
    assert auto_workers("paper", "cpu", cores=32, memory=8 * gb) == 1  # never 0
    assert auto_workers("tiny", "cuda", cores=32, memory=1000 * gb) == 1
    monkeypatch.setattr(local, "has_gpu", lambda: True)
    assert auto_workers("tiny", "auto", cores=32, memory=1000 * gb) == 1


def test_worker_environment_sets_thread_counts_only_for_multi_processing_and_restores(monkeypatch):
    monkeypatch.setattr(local, "machine_cores", lambda: 8)
    for name in local.THREAD_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "3")  # the user's own is kept
    with worker_environment(PipelineOptions(["--direct_running_mode=multi_processing", "--direct_num_workers=4"])) as added:
        assert os.environ["OMP_NUM_THREADS"] == "2" and os.environ["PREP_THREADS"] == "2"
        assert os.environ["NUMBA_NUM_THREADS"] == "2"
        assert os.environ["MKL_NUM_THREADS"] == "3" and "MKL_NUM_THREADS" not in added
    assert "OMP_NUM_THREADS" not in os.environ and "PREP_THREADS" not in os.environ
    assert os.environ["MKL_NUM_THREADS"] == "3"
    with worker_environment(PipelineOptions([])) as added:
        assert added == {} and "OMP_NUM_THREADS" not in os.environ


# ---------------------------------------------------------------------------- the run


def _files(out: str) -> dict[str, str]:
    root = Path(out)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in ("manifest.json", "_run.json")
    }


def test_two_workers_write_byte_identical_shards(pipeline_run, demo, tiny_cache, tmp_path, monkeypatch):
    """`--workers 2` (two SDK worker processes) against the one-process run of the same input."""
    from prep.pipeline import run as run_module

    used = []
    monkeypatch.setattr(run_module, "worker_args", lambda *a: used.append(worker_args(*a)) or used[-1])
    out = str(tmp_path / "out2")
    manifest = run_module.run(demo_config(demo, out, tiny_cache, workers=2), [])
    assert "--direct_running_mode=multi_processing" in used[0] and "--direct_num_workers=2" in used[0]
    one, two = _files(pipeline_run["out"]), _files(out)
    assert any(name.endswith(".tar") for name in one)
    assert one == two
    assert manifest["reconciled"] and manifest["counts"] == pipeline_run["manifest"]["counts"]
    assert manifest["shards"] == pipeline_run["manifest"]["shards"]


def test_cli_workers_default_to_auto_and_reach_the_config(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from prep.cli import app

    captured = []

    def fake_run(config, beam_args, **kwargs):
        captured.append(config)
        return {"counts": {"inputs": 1, "specific": 1, "general": 0, "dead_lettered": 0}, "reconciled": True}

    monkeypatch.setattr("prep.pipeline.run.run", fake_run)
    monkeypatch.setattr("prep.pipeline.preflight.preflight", lambda config, args: None)  # /x is not here
    for extra, expected in (([], local.AUTO), (["--workers", "3"], 3)):
        result = CliRunner().invoke(app, ["run", "-i", "celeba:/x", "--out", str(tmp_path / "o"), *extra])
        assert result.exit_code == 0, result.output
        assert captured[-1].workers == expected


def test_a_run_resumes_with_another_number_of_workers():
    from prep.pipeline.config import RunConfig
    from prep.pipeline.resume import run_digest

    def digest(**kw):
        return run_digest(RunConfig(inputs=["celeba:/x"], out="o", **kw), [], [], {})

    assert digest(workers=1) == digest(workers=2) == digest(workers=0)
    assert digest(seed=1) != digest(seed=0)  # the digest does see the config


def test_auto_runs_small_inputs_in_one_process():
    from prep.pipeline.local import AUTO_MIN_INPUTS, auto_workers, resolve_workers

    assert resolve_workers(0, "tiny", "cpu", AUTO_MIN_INPUTS - 1) == 1  # the demo: start-up would dominate
    assert resolve_workers(0, "tiny", "cpu", AUTO_MIN_INPUTS) == auto_workers("tiny", "cpu")
    assert resolve_workers(0, "tiny", "cpu") == auto_workers("tiny", "cpu")
    assert resolve_workers(3, "tiny", "cpu", 10) == 3  # an explicit N always wins


def test_loading_the_mask_model_keeps_torchs_thread_count(tiny):
    """rembg's import starts numba's OpenMP layer, which reset the OpenMP thread count torch
    shares to every core, overriding OMP_NUM_THREADS: each of N workers then ran all-core torch
    (transforms/mask.py: import_rembg). In a fresh process, as a worker is."""
    import subprocess
    import sys

    if local.machine_cores() < 2:
        pytest.skip("one core: the count cannot change")
    code = (
        "import torch\n"
        "from prep.transforms.mask import MaskHandler\n"
        f"MaskHandler({tiny.mask_onnx!r}, device='cpu').load_model()\n"
        "print(torch.get_num_threads())\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("NUMBA_NUM_THREADS", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == "1"
