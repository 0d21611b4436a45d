"""Refs for objects without a second photo (transforms/views.py, `--singleton-refs`): augmented
views, deterministic per key and seed, identity refs preferred, kinds validated, consumed by the
trainer's ω swap."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prep.transforms.pair import Refs
from prep.transforms.views import AUGMENTED, augment, view_jpeg, view_key, with_views


def _photo(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.zeros((90, 120, 3), np.uint8) + 40
    pixels[20:70, 30:90] = rng.integers(0, 255, 3, dtype=np.uint8)
    return Image.fromarray(pixels)


def test_a_view_is_a_pure_function_of_pixels_seed_key_and_index():
    image = _photo()
    first = np.asarray(augment(image, 0, "lsun_a", 0))
    assert first.shape == np.asarray(image).shape  # resized back to the image's size
    assert np.array_equal(first, np.asarray(augment(image, 0, "lsun_a", 0)))
    others = [augment(image, 0, "lsun_a", 1), augment(image, 1, "lsun_a", 0), augment(image, 0, "lsun_b", 0)]
    assert all(not np.array_equal(first, np.asarray(o)) for o in others)
    jpeg = io.BytesIO()
    image.save(jpeg, format="JPEG")
    assert view_jpeg(jpeg.getvalue(), 3, "k", 2) == view_jpeg(jpeg.getvalue(), 3, "k", 2)


def _refs(keys=(), outlier=None) -> Refs:
    return Refs(ref_keys=tuple(keys), refs=np.ones((len(keys), 4), np.float32), split="train", outlier_reason=outlier)


def test_identity_refs_are_preferred_views_fill_in_and_outliers_get_none():
    views = [(1, np.full(4, 2.0)), (0, np.full(4, 1.0))]
    kept = list(with_views(("s", {"refs": [_refs(["t"])], "views": views}), refs_cls=Refs))
    assert kept[0][1].ref_keys == ("t",) and kept[0][1].ref_kinds == ()
    [(key, made)] = with_views(("s", {"refs": [_refs()], "views": views}), refs_cls=Refs)
    assert made.ref_keys == (view_key("s", 0), view_key("s", 1)) and made.ref_kinds == (AUGMENTED, AUGMENTED)
    assert made.refs.tolist() == [[1.0] * 4, [2.0] * 4] and made.refs.dtype == np.float32  # in view order
    outlier = list(with_views(("s", {"refs": [_refs(outlier="far")], "views": views}), refs_cls=Refs))
    assert outlier[0][1].ref_keys == ()
    assert list(with_views(("s", {"refs": [], "views": views}), refs_cls=Refs)) == []  # the sample was dropped


@pytest.fixture(scope="module")
def people(demo, tmp_path_factory) -> Path:
    """folder: alice has three photos, bob one (a singleton)."""
    root = tmp_path_factory.mktemp("people") / "photos"
    images = sorted(Path(demo["celeba_dir"], "img_align_celeba").glob("*.jpg"))[:4]
    for person, picked in (("alice", images[:3]), ("bob", images[3:4])):
        (root / person).mkdir(parents=True)
        for i, path in enumerate(picked):
            shutil.copy(path, root / person / f"{i}.jpg")
    return root


def _run(people: Path, out: Path, tiny_cache: str, **overrides) -> dict:
    from prep.pipeline.config import RunConfig
    from prep.pipeline.run import run

    config = RunConfig(inputs=[f"folder:{people}"], out=str(out), preset="tiny", model_cache=tiny_cache,
                       samples_per_shard=10, refs_per_sample=2, **overrides)
    return run(config, [])


def _samples(out: Path) -> dict[str, dict]:
    import webdataset as wds

    found = {}
    for tar in sorted(out.rglob("*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False):
            found[s["__key__"]] = {"json": json.loads(s["json"]), "refs": np.load(io.BytesIO(s["refs.npy"])),
                                   "emb": np.load(io.BytesIO(s["emb.npy"]))}
    return found


@pytest.mark.slow
def test_a_singleton_gets_augmented_views_others_keep_identity_refs(people, tiny, tiny_cache, tmp_path):
    from prep.schemas.validate import validate_output

    plain = tmp_path / "plain"
    _run(people, plain, tiny_cache)  # folder: default none
    assert _samples(plain)["folder_bob_0"]["json"]["ref_keys"] == []

    out = tmp_path / "augment"
    manifest = _run(people, out, tiny_cache, singleton_refs="augment", singleton_refs_k=3)
    assert manifest["reconciled"] and manifest["counts"]["specific"] == 4 and manifest["counts"]["dead_lettered"] == 0
    samples = _samples(out)
    bob = samples["folder_bob_0"]
    assert bob["json"]["ref_keys"] == [f"folder_bob_0#aug{j}" for j in range(3)]
    assert bob["json"]["ref_kinds"] == ["augmented"] * 3 and bob["refs"].shape == (3, bob["emb"].shape[0])
    assert np.allclose(np.linalg.norm(bob["refs"], axis=1), 1.0, atol=1e-5)  # embedded like any image
    assert not any(np.allclose(row, bob["emb"]) for row in bob["refs"])  # views differ from the photo
    for key in ("folder_alice_0", "folder_alice_1", "folder_alice_2"):
        meta = samples[key]["json"]
        assert meta["ref_kinds"] == ["identity"] * len(meta["ref_keys"]) and len(meta["ref_keys"]) == 2
        assert all(r.startswith("folder_alice_") and "#" not in r for r in meta["ref_keys"])
    # Identity refs and everything else are what the run without views wrote.
    plain_samples = _samples(plain)
    for key in ("folder_alice_0", "folder_alice_1", "folder_alice_2"):
        assert plain_samples[key]["json"]["ref_keys"] == samples[key]["json"]["ref_keys"]
        assert np.array_equal(plain_samples[key]["refs"], samples[key]["refs"])
    assert validate_output(str(out)).ok

    again = tmp_path / "again"  # deterministic across reruns and worker counts
    _run(people, again, tiny_cache, singleton_refs="augment", singleton_refs_k=3, workers=2)
    from conftest import assert_same_output

    assert_same_output(str(out), str(again))

    # The trainer's ω swap takes the views, unless told to swap identity refs only.
    from prep.trainer.data import TripletStream

    def swaps(**kwargs) -> dict[str, str]:
        stream = TripletStream(str(out / "specific"), None, ratio=1.0, omega=1.0, text_drop=0.0, batch_size=1,
                               epochs=1, image_size=16, **kwargs)
        seen = {}
        for batch in stream:
            seen[batch["key"][0]] = ("augmented" if bool(batch["swap_augmented"][0]) else
                                     "identity" if bool(batch["swapped"][0]) else "none")
        return seen

    assert swaps() == {"folder_bob_0": "augmented", **{f"folder_alice_{i}": "identity" for i in range(3)}}
    assert swaps(swap_refs="identity")["folder_bob_0"] == "none"

    # The report draws each view again, as the run drew it, and says it is one.
    from prep.report import inspect_output

    inspect_output(str(out), str(tmp_path / "report.html"), samples=4)
    page = (tmp_path / "report.html").read_text()
    row = page[page.index('<div class="triplet" data-key="folder_bob_0"') + 1:]
    row = row[:row.index('<div class="triplet"') if '<div class="triplet"' in row else len(row)]
    assert [row.count(f"augmented view {j}") for j in range(4)] == [1, 1, 1, 0]
    assert row.count("data:image/") >= 3 + 3 and "not found" not in row


def test_the_validator_knows_the_two_kinds(pipeline_run, tmp_path):
    """A ref named as a view but said to be an identity ref, and kinds that do not fit the refs,
    are both caught (the JSON is edited in a copy of a real output)."""
    import tarfile

    from prep.schemas.validate import validate_output

    src = Path(pipeline_run["out"])
    out = tmp_path / "out"
    shutil.copytree(src, out)
    tar_path = sorted((out / "specific").glob("*.tar"))[0]
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    edited = []
    first_json = next(i for i, (m, _) in enumerate(members) if m.name.endswith(".json"))
    for i, (member, data) in enumerate(members):
        if i == first_json:
            meta = json.loads(data)
            assert meta["ref_kinds"] == ["identity"] * len(meta["ref_keys"]) and meta["ref_keys"]
            meta["ref_kinds"] = ["augmented"] * len(meta["ref_keys"])  # but the keys are other samples
            data = json.dumps(meta).encode()
            member.size = len(data)
        edited.append((member, data))
    with tarfile.open(tar_path, "w") as tar:
        for member, data in edited:
            tar.addfile(member, io.BytesIO(data))
    report = validate_output(str(out))
    assert not report.ok
    assert any("augmented refs named" in p for p in report.problems), report.problems[:5]


def test_many_singletons_travel_in_a_file_not_in_the_job_graph(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from prep.pipeline import build
    from prep.pipeline.config import RunConfig
    from prep.schemas.records import SourceItem

    items = [SourceItem(key=f"folder_p{i}_0", source="folder", domain="specific", path=f"/p{i}/0.jpg",
                        identity=f"p{i}") for i in range(5)]
    items.append(SourceItem(key="folder_q_0", source="folder", domain="specific", path="/q/0.jpg", identity="q"))
    items.append(SourceItem(key="folder_q_1", source="folder", domain="specific", path="/q/1.jpg", identity="q"))
    config = RunConfig(inputs=["folder:/x"], out=str(tmp_path / "out"), singleton_refs="augment")
    monkeypatch.setattr(build, "INLINE_ITEMS", 2)
    views = build.view_maker(SimpleNamespace(config=config, items=items))
    assert views._singletons == frozenset() and views._path.endswith("_plan/singletons.txt")
    views.setup()
    assert views._singletons == {f"folder_p{i}_0" for i in range(5)}  # q has two photos
    monkeypatch.setattr(build, "INLINE_ITEMS", 100)
    assert build.view_maker(SimpleNamespace(config=config, items=items))._singletons == views._singletons


def test_the_stage_table_counts_views_apart_from_inputs():
    from prep.pipeline.console import stage_rows

    manifest = {"counts": {"inputs": 10, "specific": 9, "general": 0, "dead_lettered": 1},
                "dead_letter_reasons": {"mask: mask foreground below the floor": 1},
                "stage_counters": {"decode.ok": 10, "caption.ok": 10, "mask.ok": 29, "mask.dead_lettered": 1,
                                   "embed.ok": 29, "views.made": 20, "views.failed_mask": 0}}
    rows = {r[0]: r[1:] for r in stage_rows(manifest)}
    assert rows["mask"] == (10, 9, 1) and rows["embed"] == (9, 9, 0)
    assert rows["views (refs)"] == (20, 20, 0)
