"""Identity-disjoint splits: a whole identity goes to one split, never part of one.

With CelebA's partition file the source's split is honoured (0/1/2 -> train/val/test); an
identity whose images the file spreads over several splits is put, whole, in the split of
most of its images (ties: the earliest split in train/val/test order), and the move is
reported. Without a source split, `val_fraction` sends each identity to `val` when a seeded
hash of it falls below the fraction: the same identity always lands in the same split, for
any run and any subset of the data.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from typing import Optional

from prep.schemas import contract
from prep.schemas.records import SourceItem
from prep.transforms.common import stable_hash

SPLITS = contract.SPLITS
TRAIN, VAL, TEST = SPLITS


def hashed_split(identity: str, val_fraction: float, seed: int) -> str:
    return VAL if stable_hash(identity, f"split:{seed}") / 2**64 < val_fraction else TRAIN


def assign_splits(
    items: list[SourceItem], *, val_fraction: float = 0.0, seed: int = 0, honour_source: bool = True
) -> tuple[list[SourceItem], list[str]]:
    """Items with `split` set to train/val/test, identity-disjoint; and warnings."""
    warnings: list[str] = []
    votes: dict[tuple[str, Optional[str]], Counter] = defaultdict(Counter)
    for item in items:  # identities are named per source: CelebA's "12" is not folder "12"
        if honour_source and item.split in SPLITS:
            votes[(item.source, item.identity)][item.split] += 1
    chosen: dict[tuple[str, Optional[str]], str] = {}
    moved = 0
    for identity, counter in votes.items():
        best = max(SPLITS, key=lambda s: (counter[s], -SPLITS.index(s)))
        chosen[identity] = best
        moved += sum(n for s, n in counter.items() if s != best)
    if moved:
        warnings.append(
            f"split: the partition file spreads some identities over several splits; "
            f"{moved} images moved so that every identity is in exactly one split"
        )
    out = []
    for item in items:
        split = chosen.get((item.source, item.identity))
        if split is None:
            name = f"{item.source}:{item.identity}" if item.identity is not None else item.key
            split = hashed_split(name, val_fraction, seed) if val_fraction > 0 else TRAIN
        out.append(item if item.split == split else dataclasses.replace(item, split=split))
    return out, warnings
