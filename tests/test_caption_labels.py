"""VLM words against the sample's own attribute labels (transforms/caption_labels.py), and the
flag through the pipeline: on the sample, counted per attribute in the manifest."""

from __future__ import annotations

import io
import json

import pytest

from prep.transforms.caption_labels import contradictions


def _labels(**values):
    return {name: (1 if v else -1) for name, v in values.items()}


@pytest.mark.parametrize("caption, labels, found", [
    ("a woman wearing glasses", _labels(Eyeglasses=False, Male=False), [("Eyeglasses", False)]),
    ("a woman wearing glasses", _labels(Eyeglasses=True, Male=False), []),
    ("a man without glasses", _labels(Eyeglasses=True, Male=True), [("Eyeglasses", True)]),
    ("a man with no glasses", _labels(Eyeglasses=False, Male=True), []),
    ("a smiling man with a beard", _labels(Smiling=False, No_Beard=True, Male=True),
     [("No_Beard", True), ("Smiling", False)]),
    ("a man with no beard", _labels(No_Beard=False, Male=True), [("No_Beard", False)]),
    ("a woman in a hat", _labels(Male=True, Wearing_Hat=False), [("Male", True), ("Wearing_Hat", False)]),
    ("a man", _labels(Male=False), [("Male", False)]),
    ("a woman", _labels(Male=False), []),  # "woman" is not "man"
    ("that is the picture", _labels(Wearing_Hat=False, Male=True), []),  # no word inside another
    ("a blonde girl with a moustache", _labels(Blond_Hair=False, Male=False, Mustache=False),
     [("Blond_Hair", False), ("Mustache", False)]),
    ("a bald man with black hair", _labels(Bald=False, Black_Hair=True, Male=True), [("Bald", False)]),
    ("a person", {"Male": None}, []),  # no label, nothing to contradict
    ("", _labels(Male=True), []),
])
def test_the_lexicon_finds_what_contradicts_the_labels(caption, labels, found):
    got = contradictions(caption, labels)
    assert sorted((c["attribute"], c["label"]) for c in got) == sorted(found), got
    for c in got:
        assert c["words"] and c["words"].lower() in caption.lower()


def test_a_planted_mislabel_is_flagged_on_the_sample_and_counted(demo, tiny_cache, tmp_path, monkeypatch):
    """The demo's attribute labels with Eyeglasses turned on for every image, and a captioner
    that always says "a man without glasses": each sample is flagged, the manifest counts them."""
    from conftest import demo_config
    from prep.pipeline.run import run
    from prep.schemas import contract
    from prep.schemas.validate import validate_output
    from prep.transforms.caption import CaptionHandler

    monkeypatch.setattr(CaptionHandler, "finish", lambda self, output: "a man without glasses")
    import shutil

    celeba = tmp_path / "celeba"
    shutil.copytree(demo["celeba_dir"], celeba)
    attr = celeba / "list_attr_celeba.txt"
    lines = attr.read_text().splitlines()
    names = lines[1].split()
    at = names.index("Eyeglasses")
    rows = []
    for line in lines[2:]:
        parts = line.split()
        values = parts[1:]
        values[at] = "1"
        rows.append(" ".join([parts[0], *values]))
    attr.write_text("\n".join([lines[0], lines[1], *rows]) + "\n")
    out = tmp_path / "out"
    manifest = run(demo_config(demo, str(out), tiny_cache, inputs=[f"celeba:{celeba}"]), [])
    assert validate_output(str(out)).ok
    n = manifest["counts"]["specific"]
    assert manifest["caption_contradictions"]["Eyeglasses"] == n
    samples = []
    for tar in sorted(out.glob("**/specific/*.tar")):
        with open(tar, "rb") as f:
            samples += [json.loads(s["json"]) for s in contract.iter_samples(f)]
    for s in samples:
        eyeglasses = [c for c in s["caption_contradictions"] if c["attribute"] == "Eyeglasses"]
        assert eyeglasses == [{"attribute": "Eyeglasses", "label": True, "words": "without glasses"}]
        assert s["attributes"]["Eyeglasses"] is True  # labels are never changed


def test_a_duplicate_attribute_name_is_a_clear_error():
    from prep.transforms.sources.celeba_files import read_attribute_file

    text = "1\nSmiling Smiling\n000001.jpg 1 -1\n"
    with pytest.raises(ValueError, match="duplicate attribute names on line 2: Smiling"):
        read_attribute_file(io.BytesIO(text.encode()))


def test_inspect_lists_the_contradicted_samples_with_thumbnails(demo, tiny_cache, tmp_path, monkeypatch):
    from conftest import demo_config
    from prep.pipeline.run import run
    from prep.report import inspect_output
    from prep.transforms.caption import CaptionHandler

    monkeypatch.setattr(CaptionHandler, "finish", lambda self, output: "a smiling woman in a hat")
    out = tmp_path / "out"
    manifest = run(demo_config(demo, str(out), tiny_cache), [])
    counted = manifest.get("caption_contradictions") or {}
    assert counted, "the demo's labels include men, hats and straight faces: some must contradict"
    summary = inspect_output(str(out), str(tmp_path / "r.html"), samples=0)
    html = (tmp_path / "r.html").read_text()
    from prep.schemas import contract

    flagged = []
    for tar in sorted(out.glob("**/specific/*.tar")):
        with open(tar, "rb") as f:
            flagged += [s["__key__"] for s in contract.iter_samples(f) if b"caption_contradictions" in s["json"]]
    listed = summary["caption_contradictions"]
    assert 'id="contradictions"' in html and sorted(listed) == sorted(flagged) and flagged
    assert len(flagged) >= max(counted.values())  # a sample may contradict several attributes
    assert html.count('<tr><td><img src="data:image/') == min(len(listed), 48)
    assert "the caption says" in html and "a smiling woman in a hat" in html
