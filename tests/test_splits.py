"""Identity-disjoint splits."""

from __future__ import annotations

from collections import defaultdict

from prep.pipeline.splits import assign_splits
from prep.schemas.records import SourceItem


def _items(n_ids: int, per: int, split=None):
    return [SourceItem(key=f"k{i}_{j}", source="folder", domain="specific", path=f"/{i}/{j}", identity=f"id{i}",
                       split=split) for i in range(n_ids) for j in range(per)]


def _by_identity(items):
    out = defaultdict(set)
    for item in items:
        out[item.identity].add(item.split)
    return out


def test_val_fraction_moves_whole_identities_deterministically():
    items, warnings = assign_splits(_items(400, 3), val_fraction=0.2, seed=7)
    groups = _by_identity(items)
    assert all(len(s) == 1 for s in groups.values())
    val = sum(1 for s in groups.values() if s == {"val"})
    assert 60 <= val <= 100  # 20% of 400 identities, by hash
    again, _ = assign_splits(list(reversed(_items(400, 3))), val_fraction=0.2, seed=7)
    assert {i.key: i.split for i in again} == {i.key: i.split for i in items}
    other_seed, _ = assign_splits(_items(400, 3), val_fraction=0.2, seed=8)
    assert {i.key: i.split for i in other_seed} != {i.key: i.split for i in items}
    # An identity's split does not depend on which other identities are present.
    subset, _ = assign_splits(_items(400, 3)[:30], val_fraction=0.2, seed=7)
    assert all(i.split == {j.key: j.split for j in items}[i.key] for i in subset)
    assert warnings == []


def test_partition_file_is_honoured_and_never_splits_an_identity():
    items = _items(3, 3)
    parts = ["train", "train", "val", "val", "val", "test", "test", "test", "test"]
    items = [SourceItem(**{**i.__dict__, "split": s}) for i, s in zip(items, parts)]
    out, warnings = assign_splits(items, val_fraction=0.5, seed=0)
    assert {k: sorted(v) for k, v in _by_identity(out).items()} == {"id0": ["train"], "id1": ["val"], "id2": ["test"]}
    assert len(warnings) == 1 and "2 images moved" in warnings[0]


def test_no_fraction_no_partition_means_all_train():
    out, _ = assign_splits(_items(5, 2))
    assert {i.split for i in out} == {"train"}
