"""Level 3: shard round trip. What the writer puts in a tar, webdataset and our own reader
read back unchanged; the reader refuses unsafe members and never unpickles."""

from __future__ import annotations

import io
import pickle
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from prep.schemas import contract
from prep.schemas.records import Sample
from prep.transforms.mask import mask_png
from prep.transforms.write import members_tar_bytes, sample_json, tar_bytes


def _jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 16), color).save(buf, format="JPEG")
    return buf.getvalue()


def _samples():
    rng = np.random.default_rng(0)
    embs = [v / np.linalg.norm(v) for v in rng.normal(size=(3, 8)).astype(np.float32)]
    mask = np.zeros((16, 20), np.uint8)
    mask[4:12, 5:15] = 255
    out = []
    for i, key in enumerate(["b_2", "a_1", "c_3"]):
        out.append(Sample(
            key=key, source="celeba", domain="specific", path=f"/{key}.jpg", identity="7",
            attributes={"Smiling": i % 2 == 0}, image_jpeg=_jpeg((i * 40, 10, 10)), width=20, height=16,
            caption_vlm="a face", caption_attributes="a smiling woman", caption="a face. a smiling woman",
            mask_png=mask_png(mask), embedding=embs[i].astype(np.float32),
            ref_keys=("x",), refs=embs[(i + 1) % 3][None, :].astype(np.float32),
        ))
    return out


def test_round_trip_with_webdataset(tmp_path):
    samples = _samples()
    path = tmp_path / "000000.tar"
    path.write_bytes(tar_bytes(samples))
    by_key = {s.key: s for s in samples}
    ds = wds.WebDataset(str(path), shardshuffle=False, empty_check=False).decode("l8", handler=wds.reraise_exception)
    seen = []
    for rec in ds:
        s = by_key[rec["__key__"]]
        seen.append(rec["__key__"])
        assert rec["json"] == sample_json(s)
        assert rec["txt"] == s.caption
        assert np.array_equal(rec["emb.npy"], s.embedding) and rec["emb.npy"].dtype == np.float32
        assert np.array_equal(rec["refs.npy"], s.refs)
        assert np.array_equal(rec["mask.png"], np.asarray(Image.open(io.BytesIO(s.mask_png))))
        assert rec["jpg"].shape[:2] == (16, 20)
    assert seen == ["a_1", "b_2", "c_3"]  # sorted by key


def test_tar_is_deterministic_and_has_fixed_headers():
    a = tar_bytes(_samples())
    b = tar_bytes(list(reversed(_samples())))
    assert a == b
    with tarfile.open(fileobj=io.BytesIO(a)) as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos[:6]] == [f"a_1.{e}" for e in contract.MEMBER_ORDER if e != contract.EXT_FACE]  # no face: no face.npy
    assert {(i.mtime, i.uid, i.gid, i.uname, i.gname, i.mode) for i in infos} == {(0, 0, 0, "", "", 0o644)}


def _tar_with(members: list[tuple[str, bytes]]) -> bytes:
    return members_tar_bytes(members)


def test_reader_refuses_path_traversal_and_never_unpickles(tmp_path):
    evil = _tar_with([("ok.txt", b"fine"), ("../evil.txt", b"owned")])
    with pytest.raises(contract.UnsafeMember, match="unsafe member name"):
        list(contract.iter_tar_members(io.BytesIO(evil)))
    assert not (tmp_path.parent / "evil.txt").exists()

    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    pickled = _tar_with([("k.pyd", pickle.dumps(Boom())), ("k.emb.npy", pickle.dumps(np.zeros(3)))])
    raw = list(contract.iter_samples(io.BytesIO(pickled)))
    assert raw[0]["pyd"].startswith(b"\x80")  # kept as bytes, never loaded
    with pytest.raises(ValueError, match="allow_pickle"):
        contract.decode_sample(raw[0])  # a pickled .npy is refused by np.load(allow_pickle=False)
    assert not (tmp_path / "pwned").exists()


def test_reader_bounds_member_size():
    big = _tar_with([("k.jpg", b"x" * 1000)])
    with pytest.raises(contract.UnsafeMember, match="limit"):
        list(contract.iter_tar_members(io.BytesIO(big), max_member_bytes=100))


@pytest.mark.parametrize("cut", ["member_boundary", "inside_header", "after_last_member"])
def test_reader_detects_a_tar_cut_anywhere(cut):
    data = _tar_with([("a.jpg", b"x" * 700), ("a.txt", b"y" * 700), ("b.jpg", b"z" * 700)])
    block = 512 + 1024  # header + data padded to 512
    end = {"member_boundary": 2 * block, "inside_header": 2 * block + 100, "after_last_member": 3 * block}[cut]
    names = []
    with pytest.raises(tarfile.ReadError, match="end-of-archive"):
        for name, _ in contract.iter_tar_members(io.BytesIO(data[:end])):
            names.append(name)
    assert names == ["a.jpg", "a.txt", "b.jpg"][: 3 if cut == "after_last_member" else 2]


def test_reader_detects_a_garbage_header():
    data = bytearray(_tar_with([("a.jpg", b"x" * 700), ("b.jpg", b"z" * 700)]))
    data[1536:2048] = b"\x01" * 512
    with pytest.raises(tarfile.ReadError, match="corrupt header"):
        list(contract.iter_tar_members(io.BytesIO(bytes(data))))
