"""Strict options and the one preflight (issue #11, items 1 and 2): a typo is an error with a
suggestion, Beam options pass and are recorded, missing models and inputs are all reported at
once before OUT exists, and `--dry-run` prints the plan without writing. No test here leaves
this machine: the reachability probe is replaced or, in the tests of the real probe, pointed at
servers on 127.0.0.1 (HF_ENDPOINT, locate.REMBG_RELEASES) that stop by themselves; the caches
point into tmp_path."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import socket
import threading
import time
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from conftest import U2NETP
from prep.cli import app
from prep.models import locate
from prep.pipeline import preflight as pf
from prep.pipeline.beam_options import check_beam_args, recorded, unknown_options, UnknownOptions
from prep.pipeline.config import RunConfig

runner = CliRunner()
SMALL_MODELS = ("Salesforce/blip-image-captioning-base", "u2netp", "ViT-B-32 / openai")


def _no_model_on_disk(tmp_path, monkeypatch):
    for name in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_ENDPOINT", "REMBG_HOME", "XDG_DATA_HOME", "HTTPS_PROXY",
                 "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("U2NET_HOME", str(tmp_path / "u2net"))


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """No model anywhere on disk, no network (the probe fails), HF_HUB_OFFLINE unset."""
    _no_model_on_disk(tmp_path, monkeypatch)
    probed = []
    monkeypatch.setattr(pf, "network_reachable", lambda host, *a, **k: probed.append(host) or False)
    return probed


@pytest.fixture
def one_folder(tmp_path):
    from PIL import Image

    (tmp_path / "in" / "alice").mkdir(parents=True)
    for n in range(2):
        Image.new("RGB", (64, 64), (40 * n, 90, 200)).save(tmp_path / "in" / "alice" / f"{n}.jpg")
    return f"folder:{tmp_path / 'in'}"


# Strict options -----------------------------------------------------------------------------

@pytest.mark.parametrize("typo, suggested", [
    (["--samples-per-shards", "4"], "did you mean --samples-per-shard?"),
    (["--presest", "tiny"], "did you mean --preset?"),
    (["--refs-per-samples=2"], "did you mean --refs-per-sample?"),
    (["--direct-num-workers=2"], "did you mean the Beam option --direct_num_workers"),
])
def test_a_misspelled_option_exits_2_naming_the_closest(tmp_path, typo, suggested):
    result = runner.invoke(app, ["run", "-i", "folder:/nowhere", "--out", str(tmp_path / "out"), "--preset", "tiny", *typo])
    assert result.exit_code == 2, result.output
    assert suggested in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_beam_options_in_both_forms_and_boolean_flags_are_known():
    assert unknown_options(["--runner", "DirectRunner", "--direct_num_workers=1", "--save_main_session",
                            "--experiments=a=b", "--experiments", "c", "--project", "p"]) == []
    assert unknown_options(["--runner", "DirectRunner", "stray"]) == ["unexpected argument 'stray' (prep run takes options only)"]
    with pytest.raises(UnknownOptions, match="--direct_num_workers: invalid int value"):
        check_beam_args(["--direct_num_workers=two"])
    with pytest.raises(UnknownOptions, match="--samples_per_shard.*did you mean --samples-per-shard"):
        check_beam_args(["--samples_per_shard=3"])  # run() checks too, with RunConfig's option names


def test_recorded_beam_options_hide_credentials():
    given = ["--runner", "DirectRunner", "--s3_secret_access_key", "s3cr3t", "--save_main_session",
             "--s3_session_token=tok", "--project=p"]
    assert recorded(given) == ["--runner", "DirectRunner", "--s3_secret_access_key", "<redacted>",
                               "--save_main_session", "--s3_session_token=<redacted>", "--project=p"]


def test_a_real_beam_option_passes_and_is_recorded_in_the_manifest(tmp_path, demo, tiny_cache):
    from prep.demo import write_demo_data

    data = write_demo_data(str(tmp_path / "data"), identities=2, images_per_identity=2, general_shards=1,
                           general_per_shard=2, seed=3)
    out = tmp_path / "out"
    beam = ["--direct_num_workers=1", "--direct_running_mode", "in_memory", "--s3_secret_access_key=nope"]
    result = runner.invoke(app, [
        "run", "-i", f"celeba:{data['celeba_dir']}", "-i", f"wds:{data['general_pattern']}", "--out", str(out),
        "--preset", "tiny", "--model-cache", tiny_cache, "--workers", "1", "--no-progress", *beam])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["beam_options"] == ["--direct_num_workers=1", "--direct_running_mode", "in_memory",
                                        "--s3_secret_access_key=<redacted>"]
    assert manifest["schema_version"] == 1


# Failing fast: the tools of the tests below -------------------------------------------------

MARGIN_S = 1.5  # over the probe's timeout, with the imports paid (_warm_cli): a bound, not a benchmark


def _prep_run(args):
    """`prep run ARGS` through the CLI, and how long it took."""
    start = time.monotonic()
    result = runner.invoke(app, ["run", *args])
    return result, time.monotonic() - start


def _assert_refused(result, problems: int):
    """Exit 2, no traceback, one `error:` whose first line says it all."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, AssertionError), result.output
    lines = result.output.strip().splitlines()
    assert lines[0] == (f"error: preflight: {problems} problem(s); nothing was run and nothing was written "
                        "to the output"), result.output
    assert result.output.count("error:") == 1 and len(lines) <= 5 + 4 * problems, result.output


@pytest.fixture(scope="module")
def _warm_cli(tmp_path_factory):
    """One refused run, untimed: the imports on the CLI's path (Beam, huggingface_hub) are paid
    here, so that the timed runs measure the preflight and its probe."""
    root = tmp_path_factory.mktemp("warm")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HOME", str(root / "hf"))
        mp.setenv("U2NET_HOME", str(root / "u2net"))
        runner.invoke(app, ["run", "-i", f"folder:{root}", "--out", str(root / "out"), "--preset", "small"])


@pytest.fixture
def nothing_may_start(monkeypatch, _warm_cli):
    """Every model load and pipeline start, recorded and refused: the list stays empty when the
    preflight stops the run before them."""
    import apache_beam

    from prep.pipeline import run as run_module
    from prep.transforms.caption import CaptionHandler
    from prep.transforms.embed import EmbedHandler
    from prep.transforms.mask import MaskHandler

    started = []

    def refuse(what):
        def record(*args, **kwargs):
            started.append(what)
            raise AssertionError(f"{what} was called before the preflight stopped the run")
        return record

    for handler in (CaptionHandler, EmbedHandler, MaskHandler):
        monkeypatch.setattr(handler, "load_model", refuse(f"{handler.__name__}.load_model"))
    monkeypatch.setattr(run_module, "run", refuse("prep.pipeline.run.run"))
    monkeypatch.setattr(apache_beam.Pipeline, "run", refuse("apache_beam.Pipeline.run"))
    return started


class _HubHandler(http.server.BaseHTTPRequestHandler):
    """A model hub on 127.0.0.1 that answers every request with the server's `status`."""

    def do_HEAD(self):
        self.server.requests.append((self.command, self.path))
        self.send_response(self.server.status)
        if 300 <= self.server.status < 400:
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/resolved{self.path}")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def local_hub(status: int):
    """An HTTP server on 127.0.0.1 (port 0) in a thread; shut down when the block ends."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HubHandler)
    server.status, server.requests, server.daemon_threads = status, [], True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextlib.contextmanager
def silent_port():
    """A port that accepts TCP connections (the kernel completes them into the backlog) and
    never answers a byte: a hub that hangs after the connection."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


def closed_port() -> int:
    """A port of 127.0.0.1 where nothing listens: a connection is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def hanging_port(stop_after: float):
    """A port of 127.0.0.1 where a TCP connection never opens: a listener whose one backlog slot
    is taken and that never accepts, so the kernel drops every further SYN (Linux; skipped where
    a connection opens anyway). It closes itself after `stop_after` s: a probe without a timeout
    then gets a refusal at its next SYN retry (~7 s) instead of hanging the test for minutes."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port), timeout=1)
    stop = threading.Timer(stop_after, lambda: (filler.close(), listener.close()))
    stop.daemon = True
    stop.start()
    try:
        with socket.socket() as check:
            check.settimeout(0.3)
            try:
                check.connect(("127.0.0.1", port))
            except socket.timeout:
                pass
            else:
                pytest.skip("a connection opens beyond a full listen backlog here: no port that hangs")
        yield port
    finally:
        stop.cancel()
        filler.close()
        listener.close()


@pytest.fixture
def real_probe(tmp_path, monkeypatch):
    """No model on disk and the real probe, allowed to reach 127.0.0.1 only. `hubs(hf, rembg)`
    points the Hugging Face models (HF_ENDPOINT: caption, CLIP) and rembg's mask model (its
    release URL) at ports there; `probed` lists the (host, port) the probe was asked about."""
    _no_model_on_disk(tmp_path, monkeypatch)
    real, probed = pf.network_reachable, []

    def only_here(host, port=443, *args, **kwargs):
        assert host == "127.0.0.1", f"a test probed {host}:{port}"
        probed.append((host, port))
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(pf, "network_reachable", only_here)

    def hubs(hf: int, rembg: int):
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hf}")
        monkeypatch.setattr(locate, "REMBG_RELEASES", f"http://127.0.0.1:{rembg}/danielgatis/rembg/releases")

    return SimpleNamespace(hubs=hubs, probed=probed)


# The preflight ------------------------------------------------------------------------------

def test_offline_small_preset_fails_fast_with_one_message_naming_every_model(tmp_path, empty_caches, one_folder,
                                                                            nothing_may_start):
    """Stopped by the preflight: one message naming every model, exit 2, and nothing after it
    began (no model loaded, no pipeline, no OUT) within the probe's timeout."""
    out = tmp_path / "out"
    result, elapsed = _prep_run(["-i", one_folder, "--out", str(out), "--preset", "small"])
    assert nothing_may_start == [] and not out.exists()
    _assert_refused(result, problems=3)
    assert elapsed < pf.PROBE_TIMEOUT_S + MARGIN_S, f"the preflight took {elapsed:.1f} s"
    for model in SMALL_MODELS:
        assert model in result.output
    assert str(tmp_path / "hf" / "hub") in result.output and str(tmp_path / "u2net") in result.output
    assert "--preset tiny" in result.output and "HF_HOME" in result.output and "U2NET_HOME" in result.output
    assert sorted(set(empty_caches)) == ["github.com", "huggingface.co"]  # each host probed once, nothing else


def test_hf_hub_offline_means_no_probe_at_all(empty_caches, one_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(pf.PreflightFailed, match="HF_HUB_OFFLINE is set") as err:
        pf.preflight(RunConfig(inputs=[one_folder], out=str(tmp_path / "out"), preset="small"))
    assert empty_caches == [] and str(err.value).count("not found locally") == 3


def test_a_reachable_hub_turns_missing_models_into_downloads(empty_caches, one_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(pf, "network_reachable", lambda host, *a, **k: True)
    report = pf.preflight(RunConfig(inputs=[one_folder], out=str(tmp_path / "out"), preset="small"))
    assert report.problems() == []
    assert [w.split(":")[0] for w in report.warnings()] == [
        "caption model Salesforce/blip-image-captioning-base", "mask model u2netp", "embed model ViT-B-32 / openai"]
    assert "will download from https://huggingface.co/Salesforce/blip-image-captioning-base" in report.warnings()[0]


def test_missing_inputs_are_reported_by_the_preflight_with_the_models(tmp_path, tiny_cache, one_folder):
    config = RunConfig(inputs=[one_folder, f"folder:{tmp_path / 'gone'}", f"wds:{tmp_path / 'none'}/{{0..3}}.tar",
                               "celeba"], out=str(tmp_path / "out"), preset="tiny", model_cache=tiny_cache,
                       mask_model=str(tmp_path / "mask.onnx"))
    with pytest.raises(pf.PreflightFailed) as err:
        pf.preflight(config)
    text = str(err.value)
    assert f"input folder:{tmp_path / 'gone'}: {tmp_path / 'gone'} does not exist" in text
    assert "no tar file matches" in text and "input celeba: input spec 'celeba' has no ':'" in text
    assert f"mask model file {tmp_path / 'mask.onnx'} does not exist" in text
    assert f"input {one_folder}:" not in text  # the good input is not a problem
    assert not (tmp_path / "out").exists()


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, demo, tiny_cache):
    out = tmp_path / "out"
    result = runner.invoke(app, [
        "run", "--dry-run", "-i", f"celeba:{demo['celeba_dir']}", "-i", f"wds:{demo['general_pattern']}",
        "--out", str(out), "--preset", "tiny", "--model-cache", tiny_cache, "--val-fraction", "0.3"])
    assert result.exit_code == 0, result.output
    text = result.output
    assert f"celeba:{demo['celeba_dir']}: 25 images, 6 identities" in text  # 6 x 4 and the corrupt one
    assert f"wds:{demo['general_pattern']}: 2 tar(s)" in text
    assert re.search(r"splits: .*train \d+, val \d+", text)  # CelebA's partition file decides
    assert "identity: celeba by clip" in text
    for stage in ("caption", "mask", "embed"):
        assert f"  {stage}" in text and tiny_cache in text
    assert "runner: local, " in text and "ready to run" in text
    assert not out.exists()


def test_dry_run_is_a_plain_function_that_reports_problems(tmp_path, empty_caches, one_folder):
    text, ok = pf.dry_run(RunConfig(inputs=[one_folder, f"folder:{tmp_path / 'gone'}"], out=str(tmp_path / "out")))
    assert not ok and "MISSING" in text and "does not exist" in text and "the run would stop here" in text
    assert not (tmp_path / "out").exists()


# Failing fast, with the real probe against hubs on 127.0.0.1 ------------------------------

@pytest.mark.parametrize("case", ["model file missing", "input missing", "hub refuses", "hub hangs"])
def test_prep_run_stops_in_the_preflight_before_any_model_pipeline_or_output(case, real_probe, nothing_may_start,
                                                                            one_folder, tmp_path):
    """`prep run` refused by the preflight: exit 2 and a short message, and before it no model was
    loaded, no pipeline ran, OUT was not created; within the probe's timeout (both hubs hang: they
    are probed at once, so one timeout, not two)."""
    out, args = tmp_path / "out", ["-i", one_folder]
    with contextlib.ExitStack() as stack:
        if case in ("model file missing", "input missing"):  # the hubs answer: the other models would download
            hub = stack.enter_context(local_hub(200)).server_port
            real_probe.hubs(hub, hub)
            if case == "model file missing":
                args += ["--mask-model", str(tmp_path / "gone.onnx")]
                problems, expected = 1, [f"mask model file {tmp_path / 'gone.onnx'} does not exist"]
            else:
                args += ["-i", f"folder:{tmp_path / 'gone'}"]
                problems, expected = 1, [f"input folder:{tmp_path / 'gone'}: {tmp_path / 'gone'} does not exist"]
        elif case == "hub refuses":
            hf, rembg = closed_port(), closed_port()
            real_probe.hubs(hf, rembg)
            problems, expected = 3, [f"127.0.0.1:{hf} is not reachable", f"127.0.0.1:{rembg} is not reachable"]
        else:
            stop_after = pf.PROBE_TIMEOUT_S + MARGIN_S + 0.5
            hf, rembg = (stack.enter_context(hanging_port(stop_after)) for _ in range(2))
            real_probe.hubs(hf, rembg)
            problems, expected = 3, [f"127.0.0.1:{hf} is not reachable", f"127.0.0.1:{rembg} is not reachable"]
        result, elapsed = _prep_run([*args, "--out", str(out), "--preset", "small"])
    assert nothing_may_start == [] and not out.exists()
    _assert_refused(result, problems)
    for text in expected:
        assert text in result.output
    assert elapsed < pf.PROBE_TIMEOUT_S + MARGIN_S, f"{case}: the preflight took {elapsed:.2f} s"
    if case == "hub hangs":  # it did wait on the probe: the hang was real, and the timeout ended it
        assert elapsed >= 0.9 * pf.PROBE_TIMEOUT_S, f"the probe returned after {elapsed:.2f} s"
    assert real_probe.probed and {host for host, _ in real_probe.probed} == {"127.0.0.1"}


@pytest.mark.parametrize("status", [200, 302])
def test_the_real_probe_reaches_a_hub_at_hf_endpoint_and_allows_the_downloads(real_probe, one_folder, tmp_path, status):
    """HF_ENDPOINT with a port moves the probe there (not to port 443): a hub that answers makes
    every missing model a download at run time, with the URL the loader will use."""
    with local_hub(status) as hub:
        real_probe.hubs(hub.server_port, hub.server_port)
        report = pf.preflight(RunConfig(inputs=[one_folder], out=str(tmp_path / "out"), preset="small"))
    endpoint = f"http://127.0.0.1:{hub.server_port}"
    assert report.problems() == [] and not (tmp_path / "out").exists()
    assert real_probe.probed == [("127.0.0.1", hub.server_port)]  # both hubs there: probed once
    assert report.warnings() == [
        f"caption model Salesforce/blip-image-captioning-base: not in the local cache; will download from "
        f"{endpoint}/Salesforce/blip-image-captioning-base at run time",
        f"mask model u2netp: not in the local cache; will download from "
        f"{endpoint}/danielgatis/rembg/releases/u2netp.onnx at run time",
        f"embed model ViT-B-32 / openai: not in the local cache; will download from "
        f"{endpoint}/timm/vit_base_patch32_clip_224.openai at run time"]


@pytest.mark.parametrize("hub", ["answers 404", "accepts and never answers"])
def test_the_probe_only_opens_a_connection_so_a_404_or_a_mute_hub_counts_as_reachable(real_probe, one_folder,
                                                                                      tmp_path, hub):
    """A known limit, pinned: the probe is a TCP connection, it sends no HTTP request, so a hub
    that answers 404 for the model (a wrong name, a mirror without it) or never answers at all
    passes the preflight as "will download"; the failure comes when the model loads. When the
    probe learns HTTP (a HEAD of the model URL), this test must change: 404 is then a problem."""
    with contextlib.ExitStack() as stack:
        if hub == "answers 404":
            server = stack.enter_context(local_hub(404))
            port = server.server_port
        else:
            server, port = None, stack.enter_context(silent_port())
        real_probe.hubs(port, port)
        report = pf.preflight(RunConfig(inputs=[one_folder], out=str(tmp_path / "out"), preset="small"))
    assert real_probe.probed == [("127.0.0.1", port)]
    assert report.problems() == [] and len(report.warnings()) == 3
    assert all("will download from http://127.0.0.1:" in w for w in report.warnings())
    assert server is None or server.requests == []  # connected, asked nothing


# Model resolution, beside each loader -------------------------------------------------------

def test_u2netp_resolves_from_u2net_home_or_a_path_as_rembg_finds_it(tmp_path, monkeypatch):
    if not U2NETP.is_file():
        pytest.skip(f"real rembg model not present at {U2NETP}")
    from rembg.sessions.u2netp import U2netpSession

    home = tmp_path / "u2net"
    home.mkdir()
    (home / "u2netp.onnx").symlink_to(U2NETP)
    monkeypatch.setenv("U2NET_HOME", str(home))
    found = locate.locate_mask_model("u2netp")
    assert found.local and found.path == str(home / "u2netp.onnx") == U2netpSession.resolve_existing("u2netp.onnx")
    assert locate.locate_mask_model(str(U2NETP)).path == str(U2NETP)
    for env in ({"U2NET_HOME": None, "REMBG_HOME": str(tmp_path / "r")}, {"U2NET_HOME": None, "XDG_DATA_HOME": str(tmp_path)}):
        for name, value in env.items():
            monkeypatch.delenv(name, raising=False) if value is None else monkeypatch.setenv(name, value)
        assert locate.rembg_model_files("u2netp") == [os.path.join(U2netpSession.model_dir(), "u2netp.onnx"),
                                                      os.path.join(U2netpSession.legacy_home(), "u2netp.onnx")]


def test_a_hub_model_resolves_from_a_hugging_face_cache_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    repo = tmp_path / "hf" / "hub" / "models--org--captioner"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    assert not locate.locate_caption_model("org/captioner").local  # config without weights: a broken download
    (snapshot / "model.safetensors").write_bytes(b"w")
    assert locate.locate_caption_model("org/captioner").path == str(snapshot)
    clip = tmp_path / "hf" / "hub" / "models--timm--vit_base_patch32_clip_224.openai"
    (clip / "refs").mkdir(parents=True)
    (clip / "refs" / "main").write_text("r1")
    (clip / "snapshots" / "r1").mkdir(parents=True)
    (clip / "snapshots" / "r1" / "open_clip_model.safetensors").write_bytes(b"w")
    assert locate.locate_clip("ViT-B-32", "openai").path == str(clip / "snapshots" / "r1" / "open_clip_model.safetensors")


def test_the_tiny_preset_resolves_locally(tiny, tiny_cache, tmp_path, one_folder):
    report = pf.preflight(RunConfig(inputs=[one_folder], out=str(tmp_path / "o"), preset="tiny", model_cache=tiny_cache))
    assert [m.path for m in report.models] == [tiny.captioner, tiny.mask_onnx, tiny.clip_weights]


def test_open_clip_pretrained_table_read_without_import_matches_open_clip():
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    table = locate._pretrained_table(os.path.join(locate._open_clip_dir(), "pretrained.py"))
    assert sum(len(tags) for tags in table.values()) > 100
    for model, tags in table.items():
        for tag, source in tags.items():
            cfg = get_pretrained_cfg(model, tag)
            assert (source.get("url", ""), source.get("hf_hub", "")) == (cfg.get("url", ""), cfg.get("hf_hub", "")), (model, tag)
    assert open_clip.get_model_config("ViT-B-32") is not None and locate._known_clip_model("ViT-B-32")


def test_on_dataflow_models_missing_here_are_warnings_the_workers_resolve(empty_caches, one_folder, tmp_path):
    report = pf.preflight(RunConfig(inputs=[one_folder], out=str(tmp_path / "out"), preset="small"),
                          ["--runner=DataflowRunner", "--project=p", "--region=r"])
    assert report.problems() == [] and empty_caches == []  # nothing probed: the workers load them
    assert len(report.warnings()) == 3 and all("the workers must have it" in w for w in report.warnings())
