"""No input silently lost (issue #11, item 3): keys are namespaced per input, `wds:DIR` reads
the folder img2dataset wrote, an input that yields nothing is an error, a foreign OUT is
refused, --overwrite removes only prep's own files, and an empty output never validates."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from typer.testing import CliRunner

from conftest import assert_same_output
from prep.cli import app
from prep.demo import write_demo_data
from prep.pipeline.build import plan_run
from prep.pipeline.out_folder import clear_output
from prep.transforms.write import members_tar_bytes
from prep.pipeline.config import RunConfig
from prep.pipeline.run import OutputExists, run
from prep.schemas import contract
from prep.schemas.output import read_bytes
from prep.schemas.records import DeadLetterKind, is_valid_key
from prep.schemas.validate import validate_output
from prep.transforms.common import DEAD
from prep.transforms.sources import (
    ReadWdsShard,
    input_namespaces,
    parse_input,
    plan_celeba,
    plan_folder,
    plan_wds,
)

cli = CliRunner()


# ----------------------------------------------------------------------------- specs and names


def test_a_name_is_read_only_before_the_kind():
    assert parse_input("laion=wds:gs://b/laion/{0..9}.tar").name == "laion"
    assert parse_input("laion=wds:gs://b/laion/{0..9}.tar").location == "gs://b/laion/{0..9}.tar"
    # '=' and '#' inside a path or URL are the location's, never a name
    spec = parse_input("wds:gs://b/a=b/x#1.tar")
    assert (spec.kind, spec.location, spec.name) == ("wds", "gs://b/a=b/x#1.tar", None)
    named = parse_input("web=wds:gs://b/a=b/x#1.tar")
    assert (named.kind, named.location, named.name) == ("wds", "gs://b/a=b/x#1.tar", "web")
    assert parse_input("folder:/data/k=v").location == "/data/k=v"
    assert parse_input("cc3m=folder:/data/k=v").location == "/data/k=v"


@pytest.mark.parametrize("spec, message", [
    ("wds=wds:/d", "reserved"),
    ("Celeba2=celeba:/d", "reserved"),
    ("my_name=wds:/d", "no '_'"),
    ("=wds:/d", "must be"),
    ("laion=/d", "has no ':'"),
    ("laion=tar:/d", "unknown kind"),
])
def test_bad_names_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_input(spec)


def test_namespaces_are_positional_per_kind_or_the_given_name():
    specs = ["celeba:/c", "wds:/laion", "wds:/cc3m", "coyo=wds:/coyo", "folder:/f", "folder:/g"]
    assert input_namespaces(specs) == ["celeba", "wds", "wds1", "coyo", "folder", "folder1"]
    # a name does not depend on the order; unnamed inputs number among themselves
    assert input_namespaces(["coyo=wds:/coyo", "wds:/laion"]) == ["coyo", "wds"]
    with pytest.raises(ValueError, match="given to two inputs"):
        input_namespaces(["a=wds:/x", "a=wds:/y"])
    assert input_namespaces(["a=wds:/x", "a=wds:/x"]) == ["a", "a"]  # a repeat (read once)


# ----------------------------------------------------------------------------- planning


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(members_tar_bytes(members))


@pytest.fixture(scope="module")
def two_downloads(tmp_path_factory) -> dict:
    """Two img2dataset-style downloads whose keys are identical (000000000, ...) and whose
    images differ (another seed), beside their .parquet / _stats.json like img2dataset's."""
    root = tmp_path_factory.mktemp("downloads")
    laion = write_demo_data(str(root / "laion"), identities=1, images_per_identity=1, general_shards=2, general_per_shard=3, seed=1)
    cc3m = write_demo_data(str(root / "cc3m"), identities=1, images_per_identity=1, general_shards=2, general_per_shard=3, seed=2)
    for d in (laion, cc3m):
        Path(d["general_dir"], "000000.parquet").write_bytes(b"PAR1")
        Path(d["general_dir"], "000000_stats.json").write_text("{}")
    return {"laion": laion, "cc3m": cc3m}


def test_wds_dir_plans_the_same_tars_as_the_pattern_and_says_what_it_found(two_downloads):
    d = two_downloads["laion"]
    from_dir, report = plan_wds(d["general_dir"])
    from_pattern, _ = plan_wds(d["general_pattern"])
    assert from_dir == from_pattern == [f"{d['general_dir']}/000000.tar", f"{d['general_dir']}/000001.tar"]
    assert report.items == 2
    assert report.stats["folder"] == d["general_dir"]
    assert report.stats["tars"] == 2 and report.stats["other_files"] == 2
    assert report.stats["other_files_by_ext"] == {"json": 1, "parquet": 1}
    assert (report.stats["first_tar"], report.stats["last_tar"]) == ("000000.tar", "000001.tar")


def test_inputs_that_yield_nothing_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_tars").mkdir()
    (tmp_path / "no_tars" / "000000.parquet").write_bytes(b"PAR1")
    with pytest.raises(FileNotFoundError, match="holds no .tar file"):
        plan_wds(str(tmp_path / "no_tars"))
    with pytest.raises(FileNotFoundError, match="holds no .tar file"):
        plan_wds(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no tar file matches"):
        plan_wds(str(tmp_path / "{000..003}.tar"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plan_wds(str(tmp_path / "gone.tar"))
    with pytest.raises(FileNotFoundError, match="no images found"):
        plan_folder(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=f"folder source {tmp_path / 'missing'} does not exist"):
        plan_folder(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plan_celeba(str(tmp_path / "missing"))
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        plan_folder(str(tmp_path / "a_file"))


def test_folder_and_celeba_keys_take_the_namespace(tmp_path, demo):
    (tmp_path / "f" / "alice").mkdir(parents=True)
    shutil.copy(next(Path(demo["celeba_dir"], "img_align_celeba").glob("*.jpg")), tmp_path / "f" / "alice" / "1.jpg")
    items, _, _ = plan_folder(str(tmp_path / "f"), "mine")
    assert [i.key for i in items] == ["mine_alice_1"]
    assert [i.key for i in plan_folder(str(tmp_path / "f"))[0]] == ["folder_alice_1"]  # alone: as before
    keys = [i.key for i in plan_celeba(demo["celeba_dir"], "celeba1")[0]]
    assert keys and all(k.startswith("celeba1_") and is_valid_key(k) for k in keys)


def test_plan_gives_each_input_its_namespace(tmp_path, demo, tiny_cache):
    folder, other = tmp_path / "f", tmp_path / "g"
    for sub in ("alice", "bob"):
        (folder / sub).mkdir(parents=True)
        shutil.copy(next(Path(demo["celeba_dir"], "img_align_celeba").glob("*.jpg")), folder / sub / "1.jpg")
    shutil.copytree(folder, other)
    config = RunConfig(inputs=[f"folder:{folder}", f"two=folder:{other}/", f"folder:{folder}/alice/.."],
                       out=str(tmp_path / "o"), preset="tiny", model_cache=tiny_cache)
    plan = plan_run(config)
    # the third input is the first one again: read once, with a warning
    assert sorted(i.key for i in plan.items) == ["folder_alice_1", "folder_bob_1", "two_alice_1", "two_bob_1"]
    assert plan.ingest_dead == []
    assert any("repeats an earlier input" in w for w in plan.warnings)
    assert {i.origin["input"] for i in plan.items if i.key.startswith("two_")} == {1}


def test_an_empty_tar_is_a_dead_letter_with_its_reason(tmp_path):
    _tar(tmp_path / "000007.tar", [])
    url = str(tmp_path / "000007.tar")
    with BeamTestPipeline() as p:
        out = p | beam.Create([url]) | beam.ParDo(ReadWdsShard({}, {url: "laion"})).with_outputs(DEAD, main="ok")
        assert_that(out.ok, equal_to([]), label="no samples")
        letters = out[DEAD] | beam.Map(lambda d: (d.key, d.kind, d.reason, d.path))
        assert_that(letters, equal_to([(
            "laion_000007_empty_tar", DeadLetterKind.EMPTY_TAR,
            f"empty tar: {url} is a valid tar that holds no sample (no file member)", url,
        )]), label="one letter")


# ----------------------------------------------------------------------------- whole runs


def _general_config(inputs: list[str], out: str, tiny_cache: str, **overrides) -> RunConfig:
    return RunConfig(inputs=inputs, out=out, preset="tiny", model_cache=tiny_cache, samples_per_shard=4, **overrides)


def _shard_keys(out: str) -> list[str]:
    keys = []
    for path in sorted(Path(out, contract.GENERAL).glob("*.tar")):
        keys += [s["__key__"] for s in contract.iter_samples(io.BytesIO(read_bytes(str(path))))]
    return keys


@pytest.fixture(scope="module")
def two_runs(two_downloads, tiny, tiny_cache, tmp_path_factory) -> dict:
    laion, cc3m = two_downloads["laion"], two_downloads["cc3m"]
    root = tmp_path_factory.mktemp("two_runs")
    by_pattern = str(root / "by_pattern")
    by_dir = str(root / "by_dir")
    first = run(_general_config([f"wds:{laion['general_pattern']}", f"wds:{cc3m['general_pattern']}"],
                                by_pattern, tiny_cache), [])
    second = run(_general_config([f"wds:{laion['general_dir']}", f"wds:{cc3m['general_dir']}"], by_dir, tiny_cache), [])
    return {"by_pattern": by_pattern, "by_dir": by_dir, "first": first, "second": second}


def test_two_downloads_with_the_same_keys_keep_every_sample(two_runs):
    manifest = two_runs["first"]
    assert manifest["counts"] == {"inputs": 12, "specific": 0, "general": 12, "dead_lettered": 0}
    assert manifest["reconciled"] is True
    keys = _shard_keys(two_runs["by_pattern"])
    members = [f"{t:05d}{i:04d}" for t in range(2) for i in range(3)]  # img2dataset: shard, index
    assert sorted(keys) == sorted([f"wds_{m}" for m in members] + [f"wds1_{m}" for m in members])
    assert validate_output(two_runs["by_pattern"]).ok


def test_keys_are_stable_across_runs_and_wds_dir_reads_the_same_samples(two_runs):
    """Same downloads, once by brace pattern and once by folder: every shard byte-identical."""
    assert two_runs["second"]["counts"] == two_runs["first"]["counts"]
    assert _shard_keys(two_runs["by_dir"]) == _shard_keys(two_runs["by_pattern"])
    compared = assert_same_output(two_runs["by_pattern"], two_runs["by_dir"])
    assert "general/000000.tar" in compared
    sources = two_runs["second"]["sources"]
    assert [s["stats"]["tars"] for s in sources] == [2, 2]


def test_named_inputs_keep_their_keys_in_any_order(two_downloads, tiny, tiny_cache, tmp_path):
    laion, cc3m = two_downloads["laion"], two_downloads["cc3m"]
    out = str(tmp_path / "named")
    manifest = run(_general_config([f"cc3m=wds:{cc3m['general_dir']}", f"laion=wds:{laion['general_dir']}"],
                                   out, tiny_cache), [])
    assert manifest["counts"]["general"] == 12
    keys = _shard_keys(out)
    assert sum(k.startswith("laion_") for k in keys) == 6 and sum(k.startswith("cc3m_") for k in keys) == 6
    # the same image under the same key whichever order the inputs come in
    by_key = {}
    for path in sorted(Path(out, contract.GENERAL).glob("*.tar")):
        for s in contract.iter_samples(io.BytesIO(read_bytes(str(path)))):
            by_key[s["__key__"]] = s[contract.EXT_IMAGE]
    out2 = str(tmp_path / "named2")
    run(_general_config([f"laion=wds:{laion['general_dir']}", f"cc3m=wds:{cc3m['general_dir']}"], out2, tiny_cache), [])
    for path in sorted(Path(out2, contract.GENERAL).glob("*.tar")):
        for s in contract.iter_samples(io.BytesIO(read_bytes(str(path)))):
            assert by_key.pop(s["__key__"]) == s[contract.EXT_IMAGE]
    assert by_key == {}


@pytest.mark.parametrize("case", ["empty_folder", "dir_without_tars", "pattern_matching_nothing", "missing_folder"])
def test_an_input_that_yields_nothing_exits_2_and_leaves_out_untouched(case, tmp_path, tiny_cache):
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_tars").mkdir()
    (tmp_path / "no_tars" / "000000_stats.json").write_text("{}")
    spec, message = {
        "empty_folder": (f"folder:{tmp_path / 'empty'}", "no images found"),
        "dir_without_tars": (f"wds:{tmp_path / 'no_tars'}", "holds no .tar file"),
        "pattern_matching_nothing": (f"wds:{tmp_path}/{{000000..000009}}.tar", "no tar file matches"),
        "missing_folder": (f"folder:{tmp_path / 'nope'}", "does not exist"),
    }[case]
    out = tmp_path / "out"
    result = cli.invoke(app, ["run", "--input", spec, "--out", str(out), "--preset", "tiny",
                              "--model-cache", tiny_cache, "--no-progress"])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists()


def test_a_foreign_out_is_refused_and_overwrite_keeps_the_users_files(two_downloads, tiny, tiny_cache, tmp_path):
    laion = two_downloads["laion"]
    out = tmp_path / "mine"
    (out / "general").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")
    config = _general_config([f"wds:{laion['general_dir']}"], str(out), tiny_cache)
    with pytest.raises(OutputExists, match="not empty and holds no prep output .*notes.txt"):
        run(config, [])
    assert sorted(p.name for p in out.iterdir()) == ["general", "notes.txt"]  # nothing written

    (out / "general").rmdir()
    manifest = run(_general_config([f"wds:{laion['general_dir']}"], str(out), tiny_cache, overwrite=True), [])
    assert manifest["counts"]["general"] == 6
    assert (out / "notes.txt").read_text() == "my notes"
    # a user's file inside one of prep's folders survives a second --overwrite too, even one
    # named like prep's own (README.md is the card's name at OUT's top; a shard name with a
    # suffix), while prep's own stale files there (a shard of an earlier, bigger run, its
    # sidecar and a temporary sibling) are removed: both halves of clear_output's rule.
    (out / "general" / "README.md").write_text("mine")
    (out / "general" / "000000.tar.orig").write_text("backup")
    stale = ["000009.tar", "000009.parquet", "000009_stats.json", ".000009.tar.tmp-0123456789ab"]
    for name in stale:
        (out / "general" / name).write_text("stale")
    (out / "test").mkdir()
    (out / "test" / "data.csv").write_text("a,b")
    run(_general_config([f"wds:{laion['general_dir']}"], str(out), tiny_cache, overwrite=True), [])
    assert (out / "general" / "README.md").read_text() == "mine"
    assert (out / "general" / "000000.tar.orig").read_text() == "backup"
    assert [name for name in stale if (out / "general" / name).exists()] == []
    assert (out / "test" / "data.csv").read_text() == "a,b"
    assert (out / "notes.txt").read_text() == "my notes"
    assert validate_output(str(out)).counts["general"] == 6

    clear_output(str(out))
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert left == ["general/000000.tar.orig", "general/README.md", "notes.txt", "test/data.csv"]


def test_an_output_without_samples_is_not_ok_and_the_run_exits_1(tmp_path, tiny, tiny_cache):
    _tar(tmp_path / "tars" / "000000.tar", [])
    out = tmp_path / "out"
    result = cli.invoke(app, ["run", "--input", f"wds:{tmp_path / 'tars'}", "--out", str(out), "--preset", "tiny",
                              "--model-cache", tiny_cache, "--no-progress"])
    assert result.exit_code == 1, result.output
    assert "read: empty tar" in result.output and "no sample was written" in result.output
    report = validate_output(str(out))
    assert not report.ok
    assert any("no sample in any shard (all 1 input(s) were dead-lettered)" in p for p in report.problems)

    # zero inputs, zero samples, zero dead letters: still not OK
    Path(out, contract.DEAD_LETTER_FILE).write_text("")
    manifest = Path(out, contract.MANIFEST)
    import json

    data = json.loads(manifest.read_text())
    data["counts"] = {"inputs": 0, "specific": 0, "general": 0, "dead_lettered": 0}
    data["dead_letter_reasons"] = {}
    manifest.write_text(json.dumps(data))
    report = validate_output(str(out))
    assert [p for p in report.problems if "no sample" in p] == [
        "no sample in any shard (and no input at all was read): there is nothing to train on"
    ]
    result = cli.invoke(app, ["validate", str(out)])
    assert result.exit_code == 1 and "OK" not in result.output.split(":")[1]
    assert os.path.isdir(out)
