"""Tests for prep.schemas.validate: a hand-built valid output, then one break per problem class.

The output is built here with tarfile and PIL, independently of the pipeline's writer, so
these tests pin the contract itself. Each test starts from `valid_output()`, breaks one thing
in the in-memory description, writes it, and checks that the problem is reported by name.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from prep.schemas.contract import (
    MEMBER_ORDER,
    TAR_MODE,
    TAR_MTIME,
    npy_bytes,
    shard_name,
)
from prep.schemas.validate import ValidationReport, format_report, validate_output

DIM = 8
IMAGE_SIZE = (16, 12)


def jpeg_bytes(size: tuple[int, int] = IMAGE_SIZE, color=(200, 120, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def mask_bytes(size: tuple[int, int] = IMAGE_SIZE, values: tuple[int, int] = (0, 255)) -> bytes:
    arr = np.full((size[1], size[0]), values[0], dtype=np.uint8)
    arr[:, size[0] // 2 :] = values[1]
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(DIM).astype(np.float32)
    return (v / np.linalg.norm(v)).astype(np.float32)


@dataclass
class FakeSample:
    """One sample as fields; `members()` encodes it as the contract's tar members."""

    key: str
    domain: str
    identity: Optional[str]
    emb: np.ndarray
    ref_keys: list[str] = field(default_factory=list)
    refs: Optional[np.ndarray] = None  # None: derived from ref_keys when written
    caption: str = "a photo"
    image: bytes = field(default_factory=jpeg_bytes)
    mask: Optional[bytes] = None
    meta_overrides: dict = field(default_factory=dict)
    omit: set[str] = field(default_factory=set)

    def meta(self) -> dict:
        meta = {
            "key": self.key,
            "domain": self.domain,
            "source": "folder",
            "identity": self.identity,
            "attributes": {"Smiling": True} if self.domain == "specific" else None,
            "caption_vlm": self.caption,
            "caption_attributes": None,
            "caption": self.caption,
            "width": IMAGE_SIZE[0],
            "height": IMAGE_SIZE[1],
            "ref_keys": self.ref_keys,
            "schema_version": 1,
        }
        meta.update(self.meta_overrides)
        return meta

    def members(self, embs: dict[str, np.ndarray]) -> list[tuple[str, bytes]]:
        refs = self.refs
        if refs is None:
            rows = [embs[k] for k in self.ref_keys]
            refs = np.stack(rows) if rows else np.zeros((0, DIM), np.float32)
        data = {
            "jpg": self.image,
            "json": json.dumps(self.meta()).encode("utf-8"),
            "txt": self.caption.encode("utf-8"),
            "emb.npy": npy_bytes(self.emb),
            "refs.npy": npy_bytes(refs),
            "mask.png": self.mask,
        }
        return [
            (f"{self.key}.{ext}", data[ext])
            for ext in MEMBER_ORDER
            if data.get(ext) is not None and ext not in self.omit
        ]


@dataclass
class FakeOutput:
    """A whole output directory as data: shards per domain, dead letters, count overrides."""

    shards: dict[str, list[list[FakeSample]]]
    dead_letters: list[dict]
    counts_override: dict = field(default_factory=dict)

    def sample(self, key: str) -> FakeSample:
        return next(s for s in self.all_samples() if s.key == key)

    def all_samples(self) -> list[FakeSample]:
        return [s for shards in self.shards.values() for shard in shards for s in shard]

    def write(self, root: Path) -> Path:
        embs = {s.key: s.emb for s in self.all_samples()}
        manifest_shards, found = [], {"specific": 0, "general": 0}
        for domain, shards in self.shards.items():
            folder = root / domain
            folder.mkdir(parents=True)
            sizes = {}
            for index, shard in enumerate(shards):
                name = shard_name(index)
                payload = tar_bytes([m for s in shard for m in s.members(embs)])
                (folder / name).write_bytes(payload)
                sizes[name] = len(shard)
                found[domain] += len(shard)
                manifest_shards.append(
                    {
                        "domain": domain,
                        "name": name,
                        "count": len(shard),
                        "sha256": hashlib.sha256(payload).hexdigest(),
                        "bytes": len(payload),
                    }
                )
            (folder / "sizes.json").write_text(json.dumps(sizes))
        (root / "dead_letter").mkdir()
        (root / "dead_letter" / "part-000.jsonl").write_text(
            "".join(json.dumps(d) + "\n" for d in self.dead_letters)
        )
        counts = {
            "inputs": found["specific"] + found["general"] + len(self.dead_letters),
            "specific": found["specific"],
            "general": found["general"],
            "dead_lettered": len(self.dead_letters),
        }
        counts.update(self.counts_override)
        manifest = {
            "schema_version": 1,
            "config": {"samples_per_shard": 4},
            "models": {"clip": "test"},
            "counts": counts,
            "shards": manifest_shards,
        }
        (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
        return root


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), TAR_MTIME, TAR_MODE
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def valid_output() -> FakeOutput:
    """2 identities x 3 specific samples (shards of 4 + 2), 2 general samples, 1 dead letter."""
    rng = np.random.default_rng(0)
    specific = []
    for ident in ("ida", "idb"):
        keys = [f"s_{ident}_{i}" for i in range(3)]
        for key in keys:
            specific.append(
                FakeSample(
                    key=key,
                    domain="specific",
                    identity=ident,
                    emb=unit(rng),
                    ref_keys=[k for k in keys if k != key],
                    caption=f"a photo of {key}",
                    mask=mask_bytes(),
                )
            )
    general = [
        FakeSample(
            key=f"g_{i}",
            domain="general",
            identity=None,
            emb=np.zeros(DIM, np.float32),
            caption=f"scene {i}",
        )
        for i in range(2)
    ]
    dead = [
        {"key": "s_idc_0", "source": "folder", "stage": "decode", "reason": "bad image", "path": "x.jpg"}
    ]
    shards = {"specific": [specific[:4], specific[4:]], "general": [general]}
    return FakeOutput(shards=shards, dead_letters=dead)


def run(out: FakeOutput, tmp_path: Path) -> ValidationReport:
    return validate_output(str(out.write(tmp_path / "out")))


def assert_problem(report: ValidationReport, *parts: str) -> None:
    """Some problem mentions every one of `parts`."""
    assert not report.ok
    assert any(all(p in problem for p in parts) for problem in report.problems), (
        f"no problem mentions {parts}:\n" + format_report(report)
    )


# ----------------------------------------------------------------------------- valid


def test_valid_output_passes(tmp_path):
    report = run(valid_output(), tmp_path)
    assert report.ok, format_report(report)
    assert report.counts == {"specific": 6, "general": 2, "dead_lettered": 1, "shards": 3}
    summary = format_report(report).splitlines()[0]
    assert summary.endswith("OK: contract v1, 6 specific, 2 general, 1 dead-lettered in 3 shards")


def test_tolerance_is_respected(tmp_path):
    out = valid_output()
    s = out.sample("s_ida_0")
    s.emb = (s.emb * np.float32(1.00005)).astype(np.float32)
    report = run(out, tmp_path)
    assert report.ok, format_report(report)
    assert not validate_output(str(tmp_path / "out"), tolerance=1e-6).ok


def test_missing_output_dir_reports_the_manifest(tmp_path):
    report = validate_output(str(tmp_path / "nothing"))
    assert_problem(report, "manifest.json", "missing")


# ----------------------------------------------------------------------------- files


def test_wrong_sha256(tmp_path):
    root = valid_output().write(tmp_path / "out")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["shards"][1]["sha256"] = "0" * 64  # specific/000001.tar
    (root / "manifest.json").write_text(json.dumps(manifest))
    report = validate_output(str(root))
    assert_problem(report, "specific/000001.tar", "sha256")
    assert len(report.problems) == 1, format_report(report)


def test_leftover_temp_file(tmp_path):
    root = valid_output().write(tmp_path / "out")
    (root / "specific" / ".000002.tar.tmp").write_bytes(b"partial")
    (root / "manifest.json.tmp").write_bytes(b"{")
    report = validate_output(str(root))
    assert_problem(report, "specific/.000002.tar.tmp", "temporary")
    assert_problem(report, "manifest.json.tmp", "temporary")


def test_extra_shard_not_in_manifest(tmp_path):
    root = valid_output().write(tmp_path / "out")
    (root / "general" / "000001.tar").write_bytes((root / "general" / "000000.tar").read_bytes())
    report = validate_output(str(root))
    assert_problem(report, "general/000001.tar", "not listed in manifest.json")


def test_sizes_json_disagrees_with_manifest(tmp_path):
    root = valid_output().write(tmp_path / "out")
    (root / "general" / "sizes.json").write_text(json.dumps({"000000.tar": 3}))
    report = validate_output(str(root))
    assert_problem(report, "general/sizes.json", "000000.tar", "count 3")
    assert_problem(report, "general/000000.tar", "2 samples", "sizes.json says 3")


def test_truncated_tar_and_problems_elsewhere_in_one_run(tmp_path):
    out = valid_output()
    out.sample("g_0").meta_overrides["caption"] = "something else"
    root = out.write(tmp_path / "out")
    shard = root / "specific" / "000000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 7])
    report = validate_output(str(root))
    assert_problem(report, "specific/000000.tar", "truncated")
    assert_problem(report, "specific/000000.tar", "sha256")
    assert_problem(report, "general/000000.tar", "g_0.json", "caption")
    # the other specific shard was read completely
    assert report.counts["shards"] == 3
    assert report.counts["general"] == 2
    assert 2 <= report.counts["specific"] < 6


# ----------------------------------------------------------------------------- members and keys


def test_missing_member(tmp_path):
    out = valid_output()
    out.sample("s_ida_1").omit.add("txt")
    report = run(out, tmp_path)
    assert_problem(report, "specific/000000.tar", "s_ida_1", "missing", "s_ida_1.txt")


def test_unexpected_member_mask_in_general(tmp_path):
    out = valid_output()
    out.sample("g_1").mask = mask_bytes()
    report = run(out, tmp_path)
    assert_problem(report, "general/000000.tar", "g_1", "unexpected", "g_1.mask.png")


def test_dotted_key(tmp_path):
    out = valid_output()
    out.sample("g_0").key = "g.0"
    report = run(out, tmp_path)
    assert_problem(report, "general/000000.tar", "'g.0'", "invalid key")


def test_duplicate_key_across_shards(tmp_path):
    out = valid_output()
    out.shards["general"][0][1] = FakeSample(
        key="s_ida_0", domain="general", identity=None, emb=np.zeros(DIM, np.float32)
    )
    report = run(out, tmp_path)
    assert_problem(report, "general/000000.tar", "s_ida_0", "duplicate key", "specific/000000.tar")


def test_members_not_consecutive(tmp_path):
    root = valid_output().write(tmp_path / "out")
    shard = root / "general" / "000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    members.append(members.pop(0))  # g_0.jpg moves to the end, after g_1
    shard.write_bytes(tar_bytes(members))
    report = validate_output(str(root))
    assert_problem(report, "general/000000.tar", "g_0", "not consecutive")


# ----------------------------------------------------------------------------- json


def test_json_caption_differs_from_txt(tmp_path):
    out = valid_output()
    out.sample("g_1").meta_overrides["caption"] = "not the txt"
    report = run(out, tmp_path)
    assert_problem(report, "general/000000.tar", "g_1.json", "caption", "differs from g_1.txt")


def test_json_missing_and_extra_fields_and_wrong_size(tmp_path):
    out = valid_output()
    s = out.sample("s_idb_2")
    s.meta_overrides.update({"extra": 1, "width": 99})
    report = run(out, tmp_path)
    assert_problem(report, "s_idb_2.json", "unexpected field(s) extra")
    assert_problem(report, "s_idb_2.json", "width is 99")


def test_json_key_and_identity(tmp_path):
    out = valid_output()
    out.sample("s_ida_0").meta_overrides["key"] = "other"
    out.sample("g_0").meta_overrides["identity"] = "ida"
    report = run(out, tmp_path)
    assert_problem(report, "s_ida_0.json", "key is 'other'")
    assert_problem(report, "g_0.json", "identity", "null for a general sample")


# ----------------------------------------------------------------------------- arrays


def test_non_unit_embedding(tmp_path):
    out = valid_output()
    s = out.sample("s_idb_1")
    s.emb = (s.emb * 2).astype(np.float32)  # refs to it are derived from it, so stay correct
    report = run(out, tmp_path)
    assert_problem(report, "specific/000001.tar", "s_idb_1.emb.npy", "norm is 2")
    assert len(report.problems) == 1, format_report(report)


def test_general_embedding_not_zero(tmp_path):
    out = valid_output()
    out.sample("g_0").emb = np.full(DIM, 0.1, np.float32)
    report = run(out, tmp_path)
    assert_problem(report, "g_0.emb.npy", "all zeros")


def test_embedding_dtype_and_dimension(tmp_path):
    out = valid_output()
    out.sample("g_1").emb = np.zeros(DIM + 1, np.float64)
    report = run(out, tmp_path)
    assert_problem(report, "g_1.emb.npy", "float64")
    assert_problem(report, "g_1.emb.npy", f"dimension {DIM + 1}")
    assert_problem(report, "g_1.refs.npy", "dimension")


def test_ref_row_differs_from_its_embedding(tmp_path):
    out = valid_output()
    s = out.sample("s_ida_0")
    rows = np.stack([out.sample(k).emb for k in s.ref_keys])
    rows[1, 0] += np.float32(1e-3)
    s.refs = rows
    report = run(out, tmp_path)
    assert_problem(report, "s_ida_0.refs.npy", "row 1", f"'{s.ref_keys[1]}'")
    assert len(report.problems) == 1, format_report(report)


def test_ref_to_a_different_identity(tmp_path):
    out = valid_output()
    out.sample("s_ida_0").ref_keys[0] = "s_idb_0"
    report = run(out, tmp_path)
    assert_problem(report, "s_ida_0.refs.npy", "ref_keys[0] 's_idb_0'", "identity 'idb'")


def test_self_ref(tmp_path):
    out = valid_output()
    out.sample("s_ida_0").ref_keys[0] = "s_ida_0"
    report = run(out, tmp_path)
    assert_problem(report, "s_ida_0.refs.npy", "ref_keys[0] 's_ida_0'", "itself")


def test_ref_to_unknown_and_general_keys(tmp_path):
    out = valid_output()
    out.sample("s_ida_0").ref_keys[:] = ["nope", "g_0"]
    out.sample("s_ida_0").refs = np.zeros((2, DIM), np.float32)
    report = run(out, tmp_path)
    assert_problem(report, "s_ida_0.refs.npy", "'nope'", "not a sample")
    assert_problem(report, "s_ida_0.refs.npy", "'g_0'", "not a specific sample")


def test_refs_row_count_mismatch(tmp_path):
    out = valid_output()
    s = out.sample("s_idb_0")
    s.refs = np.stack([out.sample(s.ref_keys[0]).emb])
    report = run(out, tmp_path)
    assert_problem(report, "s_idb_0.refs.npy", "1 rows", "2 entries")


# ----------------------------------------------------------------------------- mask


def test_non_binary_mask(tmp_path):
    out = valid_output()
    out.sample("s_ida_2").mask = mask_bytes(values=(0, 128))
    report = run(out, tmp_path)
    assert_problem(report, "s_ida_2.mask.png", "other than 0 and 255", "128")


def test_mask_size_mismatch(tmp_path):
    out = valid_output()
    out.sample("s_ida_2").mask = mask_bytes(size=(8, 8))
    report = run(out, tmp_path)
    assert_problem(report, "s_ida_2.mask.png", "size 8x8", "16x12")


def test_image_not_rgb(tmp_path):
    out = valid_output()
    buf = io.BytesIO()
    Image.new("L", IMAGE_SIZE, 100).save(buf, format="JPEG")
    out.sample("g_0").image = buf.getvalue()
    report = run(out, tmp_path)
    assert_problem(report, "g_0.jpg", "mode L")


# ----------------------------------------------------------------------------- dead letters and counts


def test_counts_do_not_reconcile(tmp_path):
    out = valid_output()
    out.counts_override = {"inputs": 12, "general": 3}
    report = run(out, tmp_path)
    assert_problem(report, "manifest.json", "counts.general is 3, found 2")
    assert_problem(report, "manifest.json", "counts.inputs is 12", "unaccounted")


def test_dead_letter_key_in_shard_and_bad_line(tmp_path):
    out = valid_output()
    out.dead_letters.append({"key": "g_1", "source": "wds", "stage": "caption", "reason": "timeout"})
    out.dead_letters.append({"key": "x_1", "source": "wds", "stage": "", "reason": "timeout"})
    out.counts_override = {"inputs": 11}
    report = run(out, tmp_path)
    assert report.counts["dead_lettered"] == 3
    assert_problem(report, "dead_letter/part-000.jsonl:2", "'g_1'", "general/000000.tar")
    assert_problem(report, "dead_letter/part-000.jsonl:3", "stage")
    assert len(report.problems) == 2, format_report(report)


def test_format_report_lists_every_problem(tmp_path):
    out = valid_output()
    out.sample("g_0").emb = np.full(DIM, 0.1, np.float32)
    out.sample("s_ida_0").ref_keys[0] = "s_ida_0"
    report = run(out, tmp_path)
    text = format_report(report)
    assert text.splitlines()[0].split(": ", 1)[1].startswith("INVALID: 2 problems")
    assert len(text.splitlines()) == 1 + len(report.problems) == 3


def test_dead_letter_kind_decides_the_allowed_overlap_not_the_reason_text(tmp_path):
    """A key in a shard may also be dead-lettered only as a duplicate key, and that is read from
    `kind`: a reason that merely starts with "duplicate key" does not make it one."""
    out = valid_output()
    out.dead_letters.append({"key": "g_1", "source": "wds", "stage": "read", "kind": "duplicate key in tar",
                             "reason": "two tar samples named g_1", "path": "t.tar#g_1"})
    out.dead_letters.append({"key": "g_0", "source": "wds", "stage": "decode", "kind": "not a decodable image",
                             "reason": "duplicate key: but the kind says otherwise", "path": "t.tar#g_0"})
    out.dead_letters.append({"key": "x_2", "source": "wds", "stage": "decode", "kind": "no such kind", "reason": "r"})
    out.counts_override = {"inputs": 12}
    report = run(out, tmp_path)
    assert_problem(report, "dead_letter/part-000.jsonl:3", "'g_0'", "general/000000.tar")
    assert_problem(report, "dead_letter/part-000.jsonl:4", "kind is 'no such kind'")
    assert len(report.problems) == 2, format_report(report)


def test_letters_without_kind_are_classed_by_their_reason_once():
    from prep.schemas.records import DeadLetterKind

    of = DeadLetterKind.of_letter
    assert of({"reason": "duplicate key: a is also b"}) is DeadLetterKind.DUPLICATE_KEY
    assert of({"reason": "duplicate key in tar: a appears twice"}) is DeadLetterKind.DUPLICATE_KEY_IN_TAR
    assert of({"reason": "mask foreground 0.10% below the floor 1.00%"}) is DeadLetterKind.MASK_BELOW_FLOOR
    assert of({"reason": "captioner produced an empty caption"}) is DeadLetterKind.EMPTY_CAPTION
    assert of({"reason": "timeout"}) is DeadLetterKind.UNKNOWN
    assert of({"kind": "too small", "reason": "duplicate key: x"}) is DeadLetterKind.TOO_SMALL  # kind wins


# ----------------------------------------------------------------------------- identity fields


def _verified(out: FakeOutput, key: str, **fields) -> None:
    s = out.sample(key)
    s.meta_overrides.update({"identity_model": "clip", "identity_status": "verified", "identity_distance": 0.1,
                             "near_duplicates": [], "ref_distances": [0.2] * len(s.ref_keys), **fields})


def test_identity_fields_valid_and_refs_must_be_verified(tmp_path):
    out = valid_output()
    for key in ("s_ida_0", "s_ida_1", "s_ida_2"):
        _verified(out, key)
    assert run(out, tmp_path / "a").ok  # added fields are known; consistent values pass
    out.sample("s_ida_2").meta_overrides["identity_status"] = "outlier"
    out.sample("s_ida_2").meta_overrides["identity_distance"] = 0.9
    report = run(out, tmp_path / "b")
    assert_problem(report, "s_ida_2.json", "only verified samples get refs")
    assert_problem(report, "s_ida_0", "ref_keys", "s_ida_2", "'outlier', not a verified sample")


def test_identity_field_problems_reported(tmp_path):
    out = valid_output()
    _verified(out, "s_ida_0", face_box=[0, 0, 999, 10], face_landmarks=[[1, 1]] * 5,
              near_duplicates=["s_ida_1"])
    report = run(out, tmp_path)
    assert_problem(report, "s_ida_0.json", "face_box [0, 0, 999, 10] is not inside")
    assert_problem(report, "s_ida_0.json", "near-duplicates of the sample")
