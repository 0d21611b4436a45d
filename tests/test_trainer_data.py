"""The trainer's loader on synthetic contract-v1 shards: mixing ratio, cross-reference swaps,
φ for general samples, text drop, disjoint and complete splits over ranks x workers, exact
restart at a batch, and no unpickling."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prep.schemas import contract
from prep.trainer.data import TripletStream

DIM = 8


def _jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (10, 8), (value % 256, 40, 90)).save(buf, format="JPEG")
    return buf.getvalue()


def _write_shards(folder: Path, domain: str, counts: list[int], prefix: str, seed: int = 0) -> dict[str, dict]:
    """Contract-v1 shards with `counts[i]` samples in shard i; returns {key: arrays and text}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    truth, sizes, n = {}, {}, 0
    for index, count in enumerate(counts):
        members = []
        for _ in range(count):
            key = f"{prefix}_{n:05d}"
            if domain == "specific":
                emb = rng.normal(size=DIM).astype(np.float32)
                emb /= np.linalg.norm(emb)
                refs = rng.normal(size=(n % 4, DIM)).astype(np.float32)  # K = 0, 1, 2, 3
            else:
                emb, refs = np.zeros(DIM, np.float32), np.zeros((0, DIM), np.float32)
            text = f"caption of {key}"
            meta = {"key": key, "domain": domain, "ref_keys": [f"r{i}" for i in range(len(refs))]}
            data = {
                "jpg": _jpeg(n), "json": json.dumps(meta).encode(), "txt": text.encode(),
                "emb.npy": contract.npy_bytes(emb), "refs.npy": contract.npy_bytes(refs),
            }
            if domain == "specific":
                data["mask.png"] = _png_mask()
            members += [(f"{key}.{ext}", data[ext]) for ext in contract.MEMBER_ORDER if ext in data]
            truth[key] = {"emb": emb, "refs": refs, "text": text}
            n += 1
        name = contract.shard_name(index)
        (folder / name).write_bytes(_tar(members))
        sizes[name] = count
    (folder / contract.SIZES).write_text(json.dumps(sizes))
    return truth


def _png_mask() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (10, 8), 255).save(buf, format="PNG")
    return buf.getvalue()


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), contract.TAR_MTIME, contract.TAR_MODE
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("synthetic")
    specific = _write_shards(root / "specific", "specific", [13, 9, 11, 7, 10], "s")  # 5 shards >= 4 slots
    general = _write_shards(root / "general", "general", [9, 8], "g", seed=1)  # 2 shards < 4 slots
    return {"root": root, "specific": specific, "general": general}


def _stream(shards: dict, **kw) -> TripletStream:
    root = shards["root"]
    return TripletStream(str(root / "specific"), str(root / "general"), image_size=8, embed_dim=DIM, **kw)


def _take(stream, n_samples: int) -> dict[str, list]:
    """Concatenate batches until n_samples samples."""
    out: dict[str, list] = {}
    n = 0
    for batch in stream:
        for k, v in batch.items():
            out.setdefault(k, []).extend(v if isinstance(v, list) else list(v))
        n += len(batch["key"])
        if n >= n_samples:
            break
    return {k: v[:n_samples] for k, v in out.items()}


@pytest.mark.parametrize("ratio", [0.3, 0.7])
def test_realised_mixing_ratio(shards, ratio):
    got = _take(_stream(shards, ratio=ratio, batch_size=50, seed=3), 2000)
    realised = float(np.mean([bool(s) for s in got["specific"]]))
    assert abs(realised - ratio) <= 0.03, realised
    # the domain flag matches where the sample came from
    assert all((k in shards["specific"]) == bool(s) for k, s in zip(got["key"], got["specific"]))


def test_cross_reference_swaps_phi_and_text_drop(shards):
    omega, text_drop = 0.5, 0.2
    got = _take(_stream(shards, ratio=0.6, omega=omega, text_drop=text_drop, batch_size=64, seed=7), 4000)
    swaps = []
    for i, key in enumerate(got["key"]):
        obj, swapped, row = got["object"][i].numpy(), bool(got["swapped"][i]), int(got["ref_index"][i])
        if key in shards["general"]:
            assert not swapped and row == -1 and not np.any(obj), "general samples always get φ"
            continue
        truth = shards["specific"][key]
        if len(truth["refs"]) == 0:
            assert not swapped and np.array_equal(obj, truth["emb"])
            continue
        swaps.append(swapped)
        if swapped:  # always one of *this sample's* refs rows, the one recorded
            assert np.array_equal(obj, truth["refs"][row])
            assert any(np.array_equal(obj, r) for r in truth["refs"])
        else:
            assert row == -1 and np.array_equal(obj, truth["emb"])
    assert len(swaps) > 1500
    assert abs(np.mean(swaps) - omega) <= 0.03, np.mean(swaps)
    dropped = np.array([bool(d) for d in got["text_dropped"]])
    assert abs(dropped.mean() - text_drop) <= 0.03
    for key, text, d in zip(got["key"], got["text"], dropped):
        truth = shards["specific"].get(key) or shards["general"][key]
        assert text == ("" if d else truth["text"])
    assert got["image"][0].shape == (3, 8, 8) and -1.0 <= float(got["image"][0].min())


def _epoch_keys(shards_root: Path, *, world_size: int, workers: int, batch_size: int = 3, **kw) -> list[str]:
    keys = []
    for rank in range(world_size):
        stream = TripletStream(
            str(shards_root / "specific"), str(shards_root / "general"), image_size=8, embed_dim=DIM,
            rank=rank, world_size=world_size, epochs=1, batch_size=batch_size, **kw,
        )
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
        keys += [k for batch in loader for k in batch["key"]]
    return keys


def test_two_ranks_two_workers_see_every_sample_once(shards):
    keys = _epoch_keys(shards["root"], world_size=2, workers=2, ratio=0.3, seed=5)
    counts = Counter(keys)
    assert set(counts) == set(shards["specific"]) | set(shards["general"])
    assert max(counts.values()) == 1


def test_fewer_shards_than_slots_still_gives_each_sample_once(tmp_path):
    specific = _write_shards(tmp_path / "specific", "specific", [3], "s")  # 3 samples, 4 slots
    general = _write_shards(tmp_path / "general", "general", [2, 1], "g")
    keys = _epoch_keys(tmp_path, world_size=2, workers=2, ratio=0.5)
    assert sorted(keys) == sorted(set(specific) | set(general))


def test_restart_at_a_batch_continues_the_same_stream(shards):
    """The data position: batches B.. of a restarted loader == batches B.. of one that ran on."""

    def batches(start: int, n: int) -> list[dict]:
        stream = _stream(shards, batch_size=5, seed=11, start_batch=start)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
        out = []
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                return out
        return out

    full, restarted = batches(0, 9), batches(4, 5)
    for a, b in zip(full[4:], restarted):
        assert a["key"] == b["key"] and a["text"] == b["text"]
        assert torch.equal(a["object"], b["object"]) and torch.equal(a["image"], b["image"])


def test_never_unpickles(tmp_path):
    marker = tmp_path / "unpickled"

    class Boom:  # unpickling this creates `marker`
        def __reduce__(self):
            return (open, (str(marker), "w"))

    _write_shards(tmp_path / "specific", "specific", [2], "s")
    evil = io.BytesIO()
    np.save(evil, np.array([Boom()], dtype=object), allow_pickle=True)  # deliberate: a pickled array the loader must refuse
    members = [(f"x.{ext}", data) for ext, data in (
        ("jpg", _jpeg(1)), ("json", b"{}"), ("txt", b"t"), ("emb.npy", evil.getvalue()),
        ("refs.npy", contract.npy_bytes(np.zeros((0, DIM), np.float32))), ("mask.png", _png_mask()),
    )]
    (tmp_path / "specific" / "000001.tar").write_bytes(_tar(members))
    stream = TripletStream(str(tmp_path / "specific"), None, ratio=1.0, image_size=8, epochs=1, batch_size=1)
    with pytest.raises(ValueError, match="pickle"):
        list(stream)
    assert not marker.exists()


def test_missing_general_shards_is_an_error_unless_ratio_is_one(tmp_path):
    _write_shards(tmp_path / "specific", "specific", [2], "s")
    with pytest.raises(ValueError, match="general"):
        TripletStream(str(tmp_path / "specific"), str(tmp_path / "nowhere"), ratio=0.3)
    assert len(list(TripletStream(str(tmp_path / "specific"), None, ratio=1.0, epochs=1, image_size=8))) == 1
