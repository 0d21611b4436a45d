"""Checks of the identity step's shard fields (contract.JSON_IDENTITY_FIELDS), for
`prep validate`: plain Python, no pipeline code.

- the chosen face's box and 5 landmarks lie inside the image;
- only verified samples have refs; no ref is a near-duplicate of its sample; every ref's
  distance is within the run's same-identity threshold; an outlier is beyond it;
- a ref is itself a verified sample (checked across shards: `ref_problems`).
"""

from __future__ import annotations

from typing import Optional

from prep.schemas.contract import IDENTITY_STATUSES, OUTLIER, VERIFIED


def identity_problems(meta: dict, same_threshold: Optional[float] = None) -> list[str]:
    """What is wrong with one sample's identity fields, as sentences (empty: nothing).
    `same_threshold`: the run's same-identity threshold for the sample's model (manifest)."""
    problems: list[str] = []
    width, height = meta.get("width") or 0, meta.get("height") or 0
    box = meta.get("face_box")
    if box is not None:
        if len(box) != 4 or not (0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height):
            problems.append(f"face_box {box} is not inside the {width}x{height} image")
    points = meta.get("face_landmarks")
    if points is not None:
        if len(points) != 5 or not all(0 <= x <= width and 0 <= y <= height for x, y in points):
            problems.append(f"face_landmarks {points} are not 5 points inside the {width}x{height} image")
    if (box is None) != (points is None):
        problems.append("face_box and face_landmarks must both be present or both null")
    status = meta.get("identity_status")
    if status is not None and status not in IDENTITY_STATUSES:
        problems.append(f"identity_status {status!r} is not one of {IDENTITY_STATUSES}")
    refs = meta.get("ref_keys") or []
    kinds = meta.get("ref_kinds")
    if isinstance(kinds, list) and len(kinds) == len(refs):  # augmented views are not identity evidence
        refs = [r for r, kind in zip(refs, kinds) if kind != "augmented"]
    distances = meta.get("ref_distances") or []
    if status is not None:
        if len(distances) != len(refs):
            problems.append(f"{len(distances)} ref_distances for {len(refs)} ref_keys")
        if refs and status != VERIFIED:
            problems.append(f"a sample whose identity is {status!r} has refs {refs[:3]} (only verified samples get refs)")
        if same_threshold is not None and any(d > same_threshold + 1e-6 for d in distances):
            problems.append(f"ref_distances {distances} exceed the same-identity threshold {same_threshold}")
        if status == OUTLIER and same_threshold is not None and (meta.get("identity_distance") or 0) <= same_threshold:
            problems.append(f"an outlier at distance {meta.get('identity_distance')} within the threshold {same_threshold}")
    dups = set(meta.get("near_duplicates") or [])
    if dups & set(refs):
        problems.append(f"refs {sorted(dups & set(refs))} are near-duplicates of the sample")
    return problems


def ref_problems(meta: dict, ref_meta: dict) -> list[str]:
    """A ref must itself be verified (never an outlier or unverified) when identities were checked."""
    status = ref_meta.get("identity_status")
    if meta.get("identity_status") is None or status == VERIFIED:
        return []
    return [f"ref {ref_meta.get('key')} of {meta.get('key')} is {status!r}, not a verified sample of the identity"]
