"""The console of `prep run`: help readable at 80 columns, progress lines, the final per-stage
table, each warning once, and worker processes' logs kept off the console."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from prep.cli import ABOUT, _config_parameters, app
from prep.pipeline.config import PANELS, RunConfig

runner = CliRunner()


def _help(*args: str) -> str:
    result = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    assert result.exit_code == 0, result.output
    return result.output


def _flags() -> list[str]:
    params, _ = _config_parameters()
    flags = []
    for p in params:
        given = [f for f in p.default.param_decls if f.startswith("--")]
        flags += given or [f"--{p.name.replace('_', '-')}"]
    assert len(flags) == len(dataclasses.fields(RunConfig)) == len(set(flags))  # one long flag per field
    return flags + ["--retry-dead-letter", "--no-progress", "--verbose"]


# ---------------------------------------------------------------------------- help


def test_run_help_at_80_columns_shows_every_option_name_in_full():
    text = _help("run")
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    names = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))
    missing = [f for f in _flags() if f not in names]
    assert missing == []


def test_run_help_groups_options_in_the_config_panels():
    text = _help("run")
    at = [text.index(f"─ {panel} ") for panel in PANELS]
    assert at == sorted(at)  # the panels, in their order
    io_panel = text[at[0]:at[1]]
    runner_panel = text[at[-1]:]
    assert "--input" in io_panel and "--out" in io_panel and "--workers" not in io_panel
    assert "--workers" in runner_panel and "--no-progress" in runner_panel


def test_every_config_field_names_a_panel():
    assert {f.metadata["panel"] for f in dataclasses.fields(RunConfig)} == set(PANELS)


def test_prep_help_opens_with_what_prep_does_in_one_sentence():
    text = _help()
    body = text.split("[OPTIONS] COMMAND [ARGS]...", 1)[1]
    description = " ".join(body.split("╭", 1)[0].split())
    assert description == " ".join(ABOUT.split())
    assert description.startswith("prep turns images into training triplets") and description.count(". ") == 0
    assert "Typer" not in description


def test_run_help_says_which_presets_need_a_network_and_that_beam_options_pass_through():
    text = " ".join(_help("run").split())
    assert "paper and small download their model weights on first use" in text
    assert "tiny builds small random models locally and runs offline" in text
    assert "Options not listed here must be Apache Beam pipeline options" in text


# ---------------------------------------------------------------------------- logging


def _logger_with_filters(stream) -> logging.Logger:
    from prep.pipeline.console import WarnOnce, WorkerLogEntries

    logger = logging.getLogger(f"prep.test_console.{id(stream)}")
    logger.propagate = False
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    once = WarnOnce()
    handler.addFilter(WorkerLogEntries())
    handler.addFilter(once)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return logger


def test_a_warning_emitted_twice_appears_once():
    stream = io.StringIO()
    log = _logger_with_filters(stream)
    log.warning("celeba:%s: list_attr_celeba.txt not found", "d")
    log.warning("celeba:%s: list_attr_celeba.txt not found", "d")
    log.warning("another warning")
    log.info("progress note")
    log.info("progress note")
    assert stream.getvalue().splitlines() == [
        "WARNING celeba:d: list_attr_celeba.txt not found",
        "WARNING another warning",
        "INFO progress note",
        "INFO progress note",
    ]


def test_two_workers_same_warning_is_one_line_without_the_proto_text():
    """The FnApiRunner logs a worker's record as its LogEntry in proto text form."""
    from apache_beam.portability.api import beam_fn_api_pb2

    stream = io.StringIO()
    log = _logger_with_filters(stream)
    for thread in ("1", "2"):  # two workers: differing in everything but the message
        entry = beam_fn_api_pb2.LogEntry(severity=beam_fn_api_pb2.LogEntry.Severity.WARN, thread=thread,
                                         message="embed: batch of 4 failed; retrying one by one",
                                         log_location="prep.transforms.inference")
        record = log.makeRecord(log.name, logging.WARNING, "/x/worker_handlers.py", 1, str(entry), (), None,
                                func="Logging")
        log.handle(record)
    assert stream.getvalue().splitlines() == [
        "WARNING worker: embed: batch of 4 failed; retrying one by one (prep.transforms.inference)"]


# ---------------------------------------------------------------------------- progress


def test_progress_lines_off_a_terminal_are_plain_text(tmp_path, monkeypatch):
    from prep.pipeline.console import RunConsole
    from prep.transforms import common

    stream = io.StringIO()
    monkeypatch.setattr(common, "_progress", None)
    with RunConsole(interval=0.0, stream=stream) as console:
        assert not console.tty
        common.progress_plan({"read": 4, "decode": 4})
        common.progress_load("mask", "u2netp")
        for _ in range(3):
            common.counter("read", "ok").inc()
        common.counter("decode", "dead_lettered").inc()
        common.progress_load("mask", "u2netp", 1.25)
        common._console().flush()
    monkeypatch.setattr(common, "_progress", None)
    text = stream.getvalue()
    assert "\x1b" not in text and "\r" not in text
    lines = [re.sub(r"^\[prep +[0-9.]+s\] ", "", line) for line in text.splitlines()]
    assert all(line.startswith("[prep ") for line in text.splitlines())
    assert lines[0] == "planning inputs and models"
    assert "mask: loading u2netp" in lines and "mask: u2netp loaded in 1.2 s" in lines
    counts = [line for line in lines if line.startswith("read files")]
    assert counts and counts[-1].startswith("read files 3/4") and counts[-1].endswith("decode 1/4 (1 dead)")
    assert not os.path.exists(console.dir) and common.PROGRESS_ENV not in os.environ


def test_planned_totals_come_from_the_listed_inputs(pipeline_run):
    from prep.pipeline.build import plan_run
    from prep.pipeline.console import planned_totals

    plan = plan_run(pipeline_run["config"])
    totals = planned_totals(plan)
    specific = sum(1 for i in plan.items if i.domain == "specific")
    assert totals["read"] == len(plan.items) == 25  # the demo's 6 x 4 images and its corrupt one
    assert totals["decode"] is None  # the demo has tars: their sample count is known once read
    assert totals["caption"] == totals["mask"] == totals["embed"] == specific


# ---------------------------------------------------------------------------- the final table


def _table(text: str) -> dict[str, tuple]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split() == ["stage", "in", "ok", "dead-lettered"])
    rows = {}
    for line in lines[start + 1:]:
        if set(line) == {"-"}:
            continue
        *name, n_in, ok, d = line.split()
        rows[" ".join(name)] = tuple(None if v == "-" else int(v) for v in (n_in, ok, d))
        if name == ["total"]:
            return rows
    raise AssertionError("no total row")


def _check_table(rows: dict, manifest: dict) -> None:
    counts = manifest["counts"]
    assert rows["total"] == (counts["inputs"], counts["specific"] + counts["general"], counts["dead_lettered"])
    assert sum(d for name, (_, _, d) in rows.items() if name != "total") == counts["dead_lettered"]
    by_stage: dict[str, int] = {}
    for key, n in manifest["dead_letter_reasons"].items():
        stage = key.split(":")[0]
        by_stage["read" if stage == "ingest" else stage] = by_stage.get(stage, 0) + n
    assert {name: d for name, (_, _, d) in rows.items() if d and name != "total"} == by_stage
    for name, (n_in, ok, d) in rows.items():
        assert n_in == ok + d, name
    order = list(rows)
    assert order[:3] == ["read", "decode", "caption"] and order[-2:] == ["write", "total"]
    assert rows["read"][1] == rows["decode"][0]  # what was read is what decode saw
    assert rows["write"][1] == counts["specific"] + counts["general"]


def test_the_summary_table_numbers_are_the_manifests(pipeline_run):
    from prep.pipeline.run import format_summary

    manifest = pipeline_run["manifest"]
    rows = _table(format_summary(manifest, pipeline_run["out"]))
    _check_table(rows, manifest)
    assert rows["decode"] == (33, 32, 1)  # 25 images + 8 tar samples; the demo's corrupt image
    assert rows["caption"][0] == manifest["counts"]["specific"]


def test_two_worker_cli_run_prints_the_table_and_no_worker_logs(demo, tiny, tiny_cache, tmp_path):
    """`prep run --workers 2` as a user runs it (the workers write to the real stderr, which
    only a subprocess can capture): plain progress lines, model loads, the table equal to the
    manifest's counts, and none of the SDK worker processes' own lines."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "prep.cli", "run", "-i", f"celeba:{demo['celeba_dir']}",
           "-i", f"wds:{demo['general_pattern']}", "--out", str(out), "--preset", "tiny",
           "--model-cache", tiny_cache, "--samples-per-shard", "7", "--workers", "2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    manifest = json.loads(Path(out, "manifest.json").read_text())
    _check_table(_table(done.stdout), manifest)
    err = done.stderr
    assert "\x1b" not in err and "\r" not in err
    assert "INFO" not in err and "Logging handler created" not in err and "apitools" not in err
    assert "Pipeline_options" not in err and "severity" not in err
    lines = err.splitlines()
    assert lines and all(line.startswith("[prep ") for line in lines), err
    assert any(re.search(r"embed: \S+ loaded in [0-9.]+ s \(2 processes, slowest\)", line) for line in lines), err
    last = [line for line in lines if " read files " in line][-1]
    assert "read files 25/25" in last and "decode 33 " in last and "(1 dead)" in last  # 25 images, 8 in tars
