"""Fingerprints: the manifest can tell which weights made the shards."""

from __future__ import annotations

import shutil

from prep.pipeline.fingerprint import fingerprint_caption, fingerprint_clip, fingerprint_mask, hash_path


def test_fingerprint_changes_when_weights_change(tiny, tmp_path):
    weights = tmp_path / "w.safetensors"
    shutil.copy(tiny.clip_weights, weights)
    before = fingerprint_clip(tiny.clip_config, str(weights))
    assert before["sha256"] == hash_path(tiny.clip_weights)  # content only: the name does not matter
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    after = fingerprint_clip(tiny.clip_config, str(weights))
    assert len(after["sha256"]) == 64 and after["sha256"] != before["sha256"]


def test_directory_fingerprint_covers_every_file(tiny, tmp_path):
    copy = tmp_path / "captioner"
    shutil.copytree(tiny.captioner, copy)
    same = fingerprint_caption(str(copy))["sha256"]
    assert same == fingerprint_caption(tiny.captioner)["sha256"]
    (copy / "tokenizer_config.json").write_text((copy / "tokenizer_config.json").read_text() + " ")
    assert fingerprint_caption(str(copy))["sha256"] != same


def test_hub_id_is_hashed_from_the_local_cache(tmp_path):
    repo = tmp_path / "models--acme--captioner"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abc")
    snap = repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    found = fingerprint_caption("acme/captioner", cache_dir=str(tmp_path))
    assert found["revision"] == "0123abc" and found["sha256"] == hash_path(str(snap))
    missing = fingerprint_caption("acme/other", cache_dir=str(tmp_path))
    assert missing["sha256"] is None and "not in the launcher's local cache" in missing["note"]


def test_rembg_model_name_is_hashed_from_its_home(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("U2NET_HOME", str(tmp_path))
    assert fingerprint_mask("u2netp")["sha256"] is None
    shutil.copy(tiny.mask_onnx, tmp_path / "u2netp.onnx")
    found = fingerprint_mask("u2netp")
    assert found["sha256"] == hash_path(tiny.mask_onnx)


def test_weights_hash_is_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    import os

    import prep.pipeline.fingerprint as fp

    monkeypatch.setenv(fp.CACHE_ENV, str(tmp_path / "cache.json"))
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"a" * 1000)
    first = hash_path(str(weights))
    calls = []
    real = fp._hash_files
    monkeypatch.setattr(fp, "_hash_files", lambda *a: calls.append(a) or real(*a))
    assert hash_path(str(weights)) == first and calls == []  # from the cache: the file is not read
    weights.write_bytes(b"b" * 1000)  # same size, new bytes
    os.utime(weights, ns=(1, 1))  # and a different mtime: hashed again
    assert hash_path(str(weights)) != first and len(calls) == 1
