"""The CLI is a thin shell: options reach RunConfig, unknown options reach Beam unchanged."""

from __future__ import annotations

import json

from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions, StandardOptions
from typer.testing import CliRunner

from prep.cli import app

runner = CliRunner()


def test_run_passes_beam_options_through_unchanged(monkeypatch, tmp_path):
    captured = {}

    def fake_run(config, beam_args, **kwargs):
        captured["config"], captured["args"] = config, list(beam_args)
        return {"counts": {"inputs": 1, "specific": 1, "general": 0, "dead_lettered": 0}, "reconciled": True}

    monkeypatch.setattr("prep.pipeline.run.run", fake_run)
    monkeypatch.setattr("prep.pipeline.preflight.preflight", lambda config, args: None)  # /data/celeba is not here
    result = runner.invoke(app, [
        "run", "--input", "celeba:/data/celeba", "-i", "wds:/data/{0..1}.tar", "--out", str(tmp_path / "o"),
        "--preset", "paper", "--refs-per-sample", "3", "--mask-fill", "0,0,0",
        "--runner=DataflowRunner", "--project=my-proj", "--region=us-central1",
        "--temp_location=gs://bucket/tmp", "--experiments=use_runner_v2",
    ])
    assert result.exit_code == 0, result.output
    cfg = captured["config"]
    assert cfg.inputs == ["celeba:/data/celeba", "wds:/data/{0..1}.tar"]
    assert cfg.preset == "paper" and cfg.refs_per_sample == 3 and cfg.mask_fill == (0, 0, 0)
    assert captured["args"] == [
        "--runner=DataflowRunner", "--project=my-proj", "--region=us-central1",
        "--temp_location=gs://bucket/tmp", "--experiments=use_runner_v2",
    ]
    options = PipelineOptions(captured["args"])
    assert options.view_as(StandardOptions).runner == "DataflowRunner"
    assert options.view_as(GoogleCloudOptions).project == "my-proj"
    assert options.view_as(GoogleCloudOptions).temp_location == "gs://bucket/tmp"


def test_run_rejects_bad_arguments_before_running(tmp_path):
    result = runner.invoke(app, ["run", "-i", "celeba:/x", "--out", str(tmp_path), "--preset", "huge"])
    assert result.exit_code != 0
    assert "unknown preset" in result.output


def test_demo_data_then_validate_reports_problems(tmp_path):
    result = runner.invoke(app, ["demo-data", str(tmp_path / "demo"), "--identities", "2", "--images-per-identity", "2",
                                 "--general-shards", "1", "--general-per-shard", "2"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["images"] == 4 and info["identities"] == 2
    bad = runner.invoke(app, ["validate", str(tmp_path / "demo")])
    assert bad.exit_code == 1 and "manifest.json" in bad.output


def test_validate_passes_on_pipeline_output(pipeline_run):
    result = runner.invoke(app, ["validate", pipeline_run["out"]])
    assert result.exit_code == 0, result.output
    assert "OK" in result.output


def test_a_runner_prep_cannot_run_is_refused_before_anything(monkeypatch, tmp_path):
    """One line, exit 2, naming the runners prep runs; no preflight, no OUT, no pipeline."""
    def boom(*args, **kwargs):
        raise AssertionError("reached past the option check")

    monkeypatch.setattr("prep.pipeline.preflight.preflight", boom)
    monkeypatch.setattr("prep.pipeline.run.run", boom)
    out = tmp_path / "o"
    for name, why in [("NoSuchRunner", "not a runner Beam knows"),
                      ("apache_beam.runners.dask.dask_runner.DaskRunner", "bench.dask_repro"),
                      ("FlinkRunner", "prep does not support")]:
        result = runner.invoke(app, ["run", "--input", "folder:/nowhere", "--out", str(out), f"--runner={name}"])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: --runner={name}: "), result.output
        assert why in lines[0] and "--runner=DataflowRunner" in lines[0] and "--runner=DirectRunner" in lines[0]
        assert not out.exists()
    # `--runner X` (two tokens) is read too.
    result = runner.invoke(app, ["run", "--input", "folder:/nowhere", "--out", str(out), "--runner", "Nope"])
    assert result.exit_code == 2 and "--runner=Nope: not a runner Beam knows" in result.output


def test_supported_runner_names_pass_and_the_library_refuses_too():
    from prep.pipeline.beam_options import runner_problem
    from prep.pipeline.local import UnsafeRunnerOptions, check_options

    for ok in (None, "DirectRunner", "direct", "DataflowRunner", "dataflow",
               "apache_beam.runners.dataflow.dataflow_runner.DataflowRunner"):
        assert runner_problem(ok) is None, ok
    import pytest

    with pytest.raises(UnsafeRunnerOptions, match="not a runner Beam knows"):
        check_options(PipelineOptions(["--runner=NoSuchRunner"]))
