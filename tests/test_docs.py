"""The manual holds together: every relative link and image of README.md and docs/*.md
resolves (to a file, and to a heading where it names one), every code block says its
language, and every Python block either runs in the documentation tests (``make test``
runs ``pytest --markdown-docs README.md docs``) or says in its first line why it does
not."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: the first line of a Python block the documentation tests do not run
NOT_RUN = "# Not run by the documentation tests: "


def _tokens(page: Path):
    def walk(tokens):
        for token in tokens:
            yield token
            yield from walk(token.children or [])

    return list(walk(MarkdownIt("commonmark").enable("table").parse(page.read_text(encoding="utf8"))))


def _slug(heading: str) -> str:
    # GitHub's heading anchors: lower case, punctuation dropped (hyphens and underscores
    # kept), spaces to hyphens
    text = unicodedata.normalize("NFKC", heading).lower()
    text = "".join(ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in "LN")
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    tokens = _tokens(page)
    anchors, seen = set(), {}
    for i, token in enumerate(tokens):
        if token.type == "heading_open":
            slug = _slug(tokens[i + 1].content)
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _targets(page: Path) -> list[str]:
    targets = []
    for token in _tokens(page):
        if token.type == "link_open":
            targets.append(token.attrs["href"])
        elif token.type == "image":
            targets.append(token.attrs["src"])
    targets += re.findall(r"""<img[^>]*\ssrc=["']([^"']+)["']""", page.read_text(encoding="utf8"))
    return targets


def _fences(page: Path):
    return [t for t in _tokens(page) if t.type == "fence"]


def test_the_manual_has_its_pages():
    names = {p.name for p in PAGES}
    assert {"README.md", "heads.md", "backends.md", "bad-values.md", "optim.md", "dropins.md", "benchmarks.md",
            "distributed.md", "design.md"} <= names


def _broken_links(page: Path) -> list[str]:
    broken = []
    for target in _targets(page):
        parts = urlsplit(target)
        if parts.scheme or target.startswith("//"):
            continue  # an address on the web: not checked here (no network in CI)
        path = page if not parts.path else (page.parent / unquote(parts.path)).resolve()
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif parts.fragment and path.suffix == ".md" and parts.fragment not in _anchors(path):
            broken.append(f"{target}: no heading #{parts.fragment} in {path.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    broken = _broken_links(page)
    assert not broken, f"{page.name}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_code_blocks_say_their_language_and_why_they_are_not_run(page):
    problems = []
    for fence in _fences(page):
        line = fence.map[0] + 1
        info = fence.info.split()
        if not info:
            problems.append(f"line {line}: a code block without a language")
            continue
        if info[0] in ("py", "python", "python3") and "notest" in info[1:]:
            first = fence.content.splitlines()[0] if fence.content else ""
            if not first.startswith(NOT_RUN) or len(first) <= len(NOT_RUN):
                problems.append(f"line {line}: a Python block not run must start with '{NOT_RUN}<why>'")
    assert not problems, f"{page.name}: " + "; ".join(problems)


def test_the_test_command_runs_the_examples():
    makefile = (ROOT / "Makefile").read_text()
    target = makefile[makefile.index("\ntest:"):].split("\n\n")[0]
    assert "--markdown-docs" in target and "README.md" in target and "docs" in target, target


def test_link_check_catches_broken_links(tmp_path):
    (tmp_path / "other.md").write_text("## Its own: `MarginSpec`\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n[a](missing.md) [b](#title) [c](#no-such-heading) [d](other.md#its-own-marginspec) "
        "[e](other.md#gone) [f](https://example.com/x.md) ![g](missing.png)\n"
    )
    assert _broken_links(page) == [
        "missing.md: no such file", "#no-such-heading: no heading #no-such-heading in page.md",
        "other.md#gone: no heading #gone in other.md", "missing.png: no such file",
    ]
