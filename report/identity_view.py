"""The report's identity view: each identity's images with their distance to the identity's
centre, outliers and near-duplicate pairs marked, and the run's identity totals.

Pure rendering, like page.py: `identity_groups` turns the samples' JSON metadata into groups,
`render_identities` turns groups into HTML (the page embeds it as one section).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from html import escape
from typing import Any, Iterable, Optional

from prep.transforms.verify import OUTLIER, SINGLE, UNVERIFIED, VERIFIED

CSS = """
.idgroups { display: flex; flex-direction: column; gap: 10px; }
.idgroup { border: 1px solid var(--line); border-radius: 6px; padding: 6px 10px; }
.idgroup[hidden] { display: none; }
.idgroup h3 { margin: 0 0 6px; font-size: 13px; }
.idgroup h3 .st { font-weight: 400; color: var(--muted); font-size: 12px; margin-left: 8px; }
.idmembers { display: flex; flex-wrap: wrap; gap: 8px; }
.idm { width: 104px; font-size: 10px; color: var(--muted); word-break: break-all; }
.idm img { display: block; max-width: 100px; max-height: 100px; border: 2px solid #9ccc9c; }
.idm.outlier img { border-color: var(--bad); }
.idm.unverified img, .idm.single img { border-color: #c4cad0; }
.idm.centre img { border-style: double; border-width: 4px; }
.idm .tag { display: inline-block; padding: 0 4px; border-radius: 6px; background: #e7ebef; color: var(--fg); }
.idm.outlier .tag { background: #fdf0ef; color: var(--bad); }
.iddups { font-size: 11px; color: var(--muted); margin-top: 4px; }
"""


@dataclass
class IdentityMember:
    key: str
    image: Optional[str]  # data: URI of a thumbnail, None when not fetched
    status: Optional[str]
    distance: Optional[float]
    near_duplicates: tuple[str, ...] = ()
    centre: bool = False
    faces: Optional[int] = None


@dataclass
class IdentityGroup:
    identity: str
    members: list[IdentityMember] = field(default_factory=list)

    @property
    def outliers(self) -> int:
        return sum(1 for m in self.members if m.status == OUTLIER)

    @property
    def duplicate_pairs(self) -> list[tuple[str, str]]:
        pairs = {tuple(sorted((m.key, d))) for m in self.members for d in m.near_duplicates}
        return sorted(pairs)

    @property
    def verified(self) -> bool:
        return sum(1 for m in self.members if m.status == VERIFIED) >= 2


def identity_groups(metas: Iterable[dict[str, Any]], thumbs: Optional[dict[str, str]] = None) -> list[IdentityGroup]:
    """Sample JSON metadata (specific samples) -> groups by identity, members by key; groups with
    outliers or duplicates first, then by identity."""
    thumbs = thumbs or {}
    groups: dict[str, IdentityGroup] = {}
    for meta in metas:
        ident_name = f"{meta.get('source')}:{meta.get('identity')}"
        group = groups.setdefault(ident_name, IdentityGroup(ident_name))
        group.members.append(IdentityMember(
            key=meta["key"],
            image=thumbs.get(meta["key"]),
            status=meta.get("identity_status"),
            distance=meta.get("identity_distance"),
            near_duplicates=tuple(meta.get("near_duplicates") or ()),
            centre=meta.get("identity_centre") == meta["key"],
            faces=meta.get("faces"),
        ))
    for group in groups.values():
        group.members.sort(key=lambda m: m.key)
    return sorted(groups.values(), key=lambda g: (not (g.outliers or g.duplicate_pairs), g.identity))


def totals(groups: list[IdentityGroup]) -> dict[str, int]:
    members = [m for g in groups for m in g.members]
    return {
        "identities": len(groups),
        "identities_verified": sum(1 for g in groups if g.verified),
        "outliers": sum(1 for m in members if m.status == OUTLIER),
        "unverified": sum(1 for m in members if m.status == UNVERIFIED),
        "single": sum(1 for m in members if m.status == SINGLE),
        "duplicate_pairs": sum(len(g.duplicate_pairs) for g in groups),
    }


def _member(m: IdentityMember) -> str:
    cls = " ".join(c for c in ("idm", m.status or "", "centre" if m.centre else "") if c)
    img = f'<img src="{escape(m.image)}" alt="{escape(m.key)}">' if m.image else '<div class="none">not shown</div>'
    distance = "" if m.distance is None else f" d={m.distance:.3f}"
    tag = f'<span class="tag">{escape(m.status or "unchecked")}{" · centre" if m.centre else ""}</span>'
    dups = f"<br>dup of {escape(', '.join(m.near_duplicates))}" if m.near_duplicates else ""
    return f'<div class="{cls}" data-key="{escape(m.key)}">{img}{escape(m.key)}<br>{tag}{distance}{dups}</div>'


def render_identities(groups: list[IdentityGroup], limit: int = 60) -> str:
    """The identity section's HTML (empty when no sample carries an identity verdict)."""
    if not any(m.status for g in groups for m in g.members):
        return ""
    t = totals(groups)
    head = (f"<p>{t['identities']} identities, {t['identities_verified']} verified (2+ verified images), "
            f"{t['outliers']} outliers, {t['unverified']} unverified, {t['duplicate_pairs']} near-duplicate pairs. "
            "Green: verified; red: outlier (nobody's ref, gets none); grey: unverified or single; "
            "double border: the identity's centre (medoid). d = distance to the centre.</p>")
    parts = []
    for g in groups[:limit]:
        status = f"{len(g.members)} images, {g.outliers} outliers, {len(g.duplicate_pairs)} duplicate pairs"
        dups = ""
        if g.duplicate_pairs:
            dups = '<div class="iddups">near-duplicates (never each other\'s refs): ' + escape(
                "; ".join(f"{a} ~ {b}" for a, b in g.duplicate_pairs)) + "</div>"
        parts.append(
            f'<div class="idgroup" data-identity="{escape(g.identity)}"><h3>{escape(g.identity)}'
            f'<span class="st">{escape(status)}</span></h3><div class="idmembers">'
            + "".join(_member(m) for m in g.members) + f"</div>{dups}</div>"
        )
    more = f"<p class=\"examples\">{len(groups) - limit} more identities not shown.</p>" if len(groups) > limit else ""
    return f'<h2 id="identities">Identities</h2>{head}<div class="idgroups">{"".join(parts)}</div>{more}'
