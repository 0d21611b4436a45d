"""The report's identity view, rendered from sample metadata."""

from __future__ import annotations

from prep.report.identity_view import identity_groups, render_identities, totals


def meta(key, identity, status, distance=None, dups=(), centre=None):
    return {"key": key, "source": "folder", "identity": identity, "identity_status": status,
            "identity_distance": distance, "near_duplicates": list(dups), "identity_centre": centre, "faces": 1}


def test_groups_totals_and_marks():
    metas = [meta("o1", "obama", "verified", 0.0, centre="o1"), meta("o2", "obama", "verified", 0.36, ("o3",), "o1"),
             meta("o3", "obama", "verified", 0.10, ("o2",), "o1"), meta("ob", "obama", "outlier", 0.81, centre="o1"),
             meta("b1", "biden", "unverified", 0.9), meta("b2", "biden", "unverified", 0.9), meta("z", "z", "single")]
    groups = identity_groups(metas, {"o1": "data:image/png;base64,AAAA"})
    assert [g.identity for g in groups] == ["folder:obama", "folder:biden", "folder:z"]  # problems first
    assert groups[0].duplicate_pairs == [("o2", "o3")] and groups[0].outliers == 1 and groups[0].verified
    assert not groups[1].verified
    assert totals(groups) == {"identities": 3, "identities_verified": 1, "outliers": 1, "unverified": 2,
                              "single": 1, "duplicate_pairs": 1}
    html = render_identities(groups)
    assert '<div class="idm outlier" data-key="ob">' in html
    assert '<div class="idm verified centre" data-key="o1"><img src="data:image/png;base64,AAAA"' in html
    assert "o2 ~ o3" in html and "d=0.810" in html
    assert "1 outliers" in html and "3 identities, 1 verified" in html


def test_nothing_without_verdicts():
    assert render_identities(identity_groups([meta("a", "a", None)])) == ""
