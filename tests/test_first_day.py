"""The first day with your own photos: what a run, its reports and `prep evaluate` say about
random-weight models; `prep train` on an output without general shards; the smaller things
(the card's identity line, no empty folders, `prep inspect`'s argument, chart labels)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prep.cli import app
from prep.schemas.output import random_weights_note

cli = CliRunner()


def test_the_manifest_records_random_weights_and_every_report_says_so(pipeline_run, tmp_path):
    from prep.pipeline.run import format_summary

    manifest = pipeline_run["manifest"]
    assert {s: manifest["models"][s]["random_weights"] for s in ("caption", "mask", "embed")} == \
        {"caption": True, "mask": True, "embed": True}
    note = random_weights_note(manifest)
    assert note.startswith("random weights: the caption, embed, mask models were built at random")
    summary = format_summary(manifest, pipeline_run["out"]).splitlines()
    assert summary.count(note) == 1
    card = (Path(pipeline_run["out"]) / "README.md").read_text()
    assert card.count("(random weights)") == 3 and "**Random weights:" in card
    result = cli.invoke(app, ["inspect", pipeline_run["out"], "--html", str(tmp_path / "r.html"), "--samples", "2"])
    assert result.exit_code == 0, result.output
    html = (tmp_path / "r.html").read_text()
    assert 'id="notice"' in html and "built at random" in html


def test_real_weights_are_not_called_random(tmp_path):
    """A checkpoint outside a tiny-model folder, and open_clip with pretrained weights, are not."""
    from prep.models.tiny import built_at_random
    from prep.pipeline.build import random_weights

    class Handler:
        def __init__(self, model_id, pretrained=None):
            self.model_id, self.pretrained = model_id, pretrained

    assert not built_at_random(str(tmp_path / "my-blip")) and not built_at_random(None)
    assert not random_weights("caption", Handler("Salesforce/blip2-opt-2.7b"))
    assert not random_weights("embed", Handler("ViT-L-14", "openai"))
    assert random_weights("embed", Handler("ViT-L-14", None))  # open_clip at random init
    assert random_weights_note({"models": {"caption": {"random_weights": False}}}) is None
    fake = tmp_path / "cache" / "tiny-v1"
    (fake / "captioner").mkdir(parents=True)
    assert not built_at_random(str(fake / "captioner"))  # no COMPLETE marker: not prep's build
    (fake / "COMPLETE").write_text("")
    assert built_at_random(str(fake / "captioner"))


@pytest.fixture(scope="module")
def specific_only(pipeline_run, tmp_path_factory) -> Path:
    """The demo output without its general-domain shards: what a folder of own photos gives."""
    out = tmp_path_factory.mktemp("specific-only") / "out"
    shutil.copytree(pipeline_run["out"], out, ignore=shutil.ignore_patterns("general"))
    return out


def _tiny_train(shards, out, **overrides):
    from prep.trainer.train import TrainConfig

    values = dict(shards=str(shards), out=str(out), image_size=16, batch_size=4, channels=8, channel_mults=(1, 2),
                  attention_levels=(1,), heads=2, context_dim=16, device="cpu", log_every=2, max_steps=3, warmup=20,
                  ratio=0.3, threads=1)
    values.update(overrides)
    return TrainConfig(**values)


def test_train_without_general_shards_trains_on_specific_with_a_notice(specific_only, tmp_path, capsys):
    from prep.trainer.train import train

    result = train(_tiny_train(specific_only, tmp_path / "run"))
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("prep train: no general-domain shards in ") and "--ratio 0.3 -> 1.0" in err[0]
    assert err[1] == "prep train: --warmup 20 is longer than --max-steps 3: clipped to 3 " \
                     "(the learning rate would never reach --lr)"
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["ratio"] == 1.0 and saved["warmup"] == 3 and result["ratio"] == 1.0
    # final_loss is the last step's; the window mean has its own name.
    with open(result["loss_csv"], newline="") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    assert result["final_loss"] == pytest.approx(losses[-1], abs=1e-6)
    assert result["final_loss_mean"] == pytest.approx(sum(losses[-2:]) / 2, abs=1e-6)


def test_train_stops_before_building_anything_without_specific_shards(tmp_path, monkeypatch):
    from prep.trainer import train as train_module

    def built(*args, **kwargs):
        raise AssertionError("built something before checking the inputs")

    monkeypatch.setattr(train_module, "load_text_encoder", built)
    monkeypatch.setattr(train_module, "UNet", built)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no domain-specific training shards"):
        train_module.train(_tiny_train(tmp_path / "empty", tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_inspect_takes_html_and_still_the_old_out(pipeline_run, tmp_path):
    for flag in ("--html", "--out", "-o"):
        page = tmp_path / f"{flag.strip('-')}.html"
        result = cli.invoke(app, ["inspect", pipeline_run["out"], flag, str(page), "--samples", "0"])
        assert result.exit_code == 0 and page.is_file(), (flag, result.output)
    help_text = cli.invoke(app, ["inspect", "--help"]).output
    assert "OUT" in help_text and "--html" in help_text


def test_a_narrow_float_range_is_labelled_as_short_offsets():
    import re

    from prep.report.charts import histogram_svg, make_bins

    norms = [0.99999994, 0.99999997, 1.0, 1.00000002, 1.00000005]
    bins = make_bins(norms, integer=False)
    assert bins.base() == 1.0
    ticks = [bins.fmt(bins.edges[j]) for j in (0, len(bins.edges) // 2, len(bins.edges) - 1)]
    assert all(len(t) <= 8 for t in ticks), ticks
    svg = histogram_svg("norm", {"specific": norms}, x_label="L2 norm", integer=False)
    labels = re.findall(r'class="tick"[^>]*>([^<]*)<', svg)
    assert labels and max(len(t) for t in labels) <= 8, labels
    assert "L2 norm − 1" in svg
    wide = make_bins([0.1, 0.5, 0.9], integer=False)  # an ordinary range stays plain
    assert wide.base() is None and wide.fmt(0.5) == "0.5"


def test_the_card_names_the_face_identity_model():
    """A face run's card said ``- identity: `` (weights sha256 ...)`` with an empty name: the
    identity header carries face_model, not model."""
    from prep.schemas.card import _models
    from prep.transforms.identity import IdentityHandler

    header = {**IdentityHandler("face", face_model="dlib").describe(), "fingerprint": {"sha256": "ab" * 32}}
    lines = _models({"models": {"identity": header, "caption": {"model": "/x/models/blip", "random_weights": True}}})
    assert "- identity: `dlib` (weights sha256 abababababab...)" in lines
    assert "- caption: `blip` (random weights)" in lines
