"""Every relative link in README.md and docs/**/*.md points at a file that exists, and every
``#anchor`` at a heading of the Markdown file it names (GitHub's heading ids).

External links (http, https, mailto) are not fetched. Links inside fenced code blocks, inline code
and HTML comments are not links and are skipped.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def _prose(text: str) -> str:
    """The Markdown with what cannot hold a link removed: fenced blocks, comments, inline code."""
    text = _FENCE.sub("", text)
    text = _COMMENT.sub("", text)
    return text


def slug(heading: str) -> str:
    """GitHub's id for a heading: inline markup dropped, lower case, punctuation other than
    ``-`` and ``_`` removed, each space a ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = text.replace("`", "").replace("*", "")
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for heading in _HEADING.findall(_FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def broken_links(path: Path) -> list[str]:
    """Each relative link of ``path`` that does not resolve, as ``"target: why"``."""
    problems = []
    for target in _LINK.findall(_CODE.sub("", _prose(path.read_text(encoding="utf-8")))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, …
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{target}: {file_part} does not exist")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{target}: no heading #{anchor} in {dest.name}")
    return problems


def test_docs_exist() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in DOCS}
    for required in ("README.md", "docs/GETTING_STARTED.md", "docs/CONFIGURATION.md", "docs/API.md",
                     "docs/FAQ.md", "docs/COMPARISON.md", "docs/guides/idempotency.md",
                     "docs/guides/budget-control.md", "docs/guides/docker.md"):
        assert required in names


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path: Path) -> None:
    assert broken_links(path) == []


def test_the_check_fails_on_broken_links(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other page\n\n## A section\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "[ok](other.md) [ok](other.md#a-section) [ok](#page) [ok](https://example.com/x)\n"
        "[missing file](nowhere.md) [missing anchor](other.md#no-such) [missing here](#nope)\n"
        "`[in code](nowhere.md)`\n\n```\n[in a block](nowhere.md)\n```\n<!-- [in a comment](nowhere.md) -->\n"
    )
    assert broken_links(page) == [
        "nowhere.md: nowhere.md does not exist",
        "other.md#no-such: no heading #no-such in other.md",
        "#nope: no heading #nope in page.md",
    ]


def test_slugs_follow_github() -> None:
    assert slug("1. Send a key") == "1-send-a-key"
    assert slug("Throughput, first-token latency, memory (`make bench`)") == \
        "throughput-first-token-latency-memory-make-bench"
    assert slug("Large bodies (`bench/large_bodies.py`)") == "large-bodies-benchlarge_bodiespy"
    assert slug("Docker & compose") == "docker--compose"
