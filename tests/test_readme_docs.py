"""The README is a short user's guide and the rest lives in docs/: its length, its links (to
files and to headings) and the pages it must point to. Reads files only: no network, no run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = ["contract.md", "benchmarks.md", "design.md", "identity.md", "scale.md"]
MAX_README_LINES = 300

# [text](target) and ![alt](target); the target ends at the first space or ')'.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", flags=re.M | re.S)


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def prose(text: str) -> str:
    """The text without fenced code blocks (a link-like string in code is not a link)."""
    return FENCE.sub("", text)


def links(path: Path) -> list[str]:
    return LINK.findall(prose(path.read_text(encoding="utf-8")))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation other than '-' and '_' dropped
    (backticks, parentheses, colons, apostrophes, dots...), each space a '-'."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a page (duplicates get GitHub's -1, -2, ... suffixes)."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    for match in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose(path.read_text(encoding="utf-8")), flags=re.M):
        base = slug(match.group(1))
        n = counts.get(base, 0)
        counts[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def is_external(target: str) -> bool:
    return re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.I) is not None  # http:, https:, mailto:


def test_slug_follows_github():
    assert slug("Reading the output") == "reading-the-output"
    assert slug("Running at scale (Dataflow)") == "running-at-scale-dataflow"
    assert slug("`--workers` (local runs)") == "--workers-local-runs"
    assert slug("Identity: the face stage") == "identity-the-face-stage"
    assert slug("Beam's multi-threading loss") == "beams-multi-threading-loss"


def test_readme_is_at_most_300_lines():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail into docs/"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(path):
    broken = []
    for target in links(path):
        if is_external(target) or target.startswith("#"):
            continue
        file_part = target.split("#", 1)[0]
        if not (path.parent / file_part).exists():
            broken.append(target)
    assert broken == [], f"{path.relative_to(ROOT)}: links to missing files: {broken}"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_anchor_links_name_existing_headings(path):
    """In-page anchors (#x), and anchors into the repository's other markdown pages (page.md#x)."""
    broken = []
    for target in links(path):
        if is_external(target) or "#" not in target:
            continue
        file_part, anchor = target.split("#", 1)
        page = path if not file_part else (path.parent / file_part).resolve()
        if page.suffix != ".md" or not page.exists():
            continue
        if anchor not in anchors(page):
            broken.append(target)
    assert broken == [], f"{path.relative_to(ROOT)}: anchors without a heading: {broken}"


def test_readme_in_page_anchors_are_level_2_headings():
    text = README.read_text(encoding="utf-8")
    headings = {slug(h) for h in re.findall(r"^## (.+?)\s*$", prose(text), flags=re.M)}
    missing = [t for t in links(README) if t.startswith("#") and t[1:] not in headings]
    assert missing == [], f"README.md anchors with no '## ' heading: {missing}"


def test_own_photos_example_is_on_the_first_screen():
    head = README.read_text(encoding="utf-8").splitlines()[:60]
    assert any("prep run" in line and "--input folder:" in line for line in head), (
        "README.md must show a `prep run --input folder:...` example for one's own photos in its first 60 lines"
    )


@pytest.mark.parametrize("page", PAGES)
def test_docs_page_exists_and_is_linked_from_readme(page):
    assert (DOCS / page).is_file(), f"docs/{page} is missing"
    targets = {t.split("#", 1)[0] for t in links(README)}
    assert f"docs/{page}" in targets, f"README.md does not link docs/{page}"


def test_every_docs_page_is_linked_from_readme():
    targets = {t.split("#", 1)[0] for t in links(README)}
    unlinked = [p.name for p in sorted(DOCS.glob("*.md")) if f"docs/{p.name}" not in targets]
    assert unlinked == [], f"docs pages the README does not link: {unlinked}"
