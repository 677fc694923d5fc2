"""The README and the docs hold together: every relative link resolves (the file exists, and a
`#anchor` names a heading of that file), every docs page is reachable from the README, and the
README stays short (issue #24: at most 350 lines; the rest lives in docs/).

Links are read as GitHub renders them: `[text](target)` and `![alt](target)` outside code (fenced
blocks and inline code spans are skipped), anchors are GitHub's heading slugs.
"""

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "benchmarks").glob("*.md"))]
MAX_README_LINES = 350

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of everything outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation but `-` and `_`
    removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a page, duplicates numbered as GitHub does (`x`, `x-1`, `x-2`)."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(page.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link on the page outside code."""
    found = []
    for number, line in prose_lines(page.read_text(encoding="utf-8")):
        for match in LINK.finditer(INLINE_CODE.sub("", line)):
            found.append((number, match.group(1)))
    return found


def broken(page: Path) -> list[str]:
    problems = []
    for number, target in links(page):
        if SCHEME.match(target) or target.startswith("//"):
            continue  # a web address: not checked offline
        path, _, anchor = target.partition("#")
        resolved = (page.parent / unquote(path)).resolve() if path else page
        where = f"{page.relative_to(ROOT)}:{number}: {target}"
        if not resolved.exists():
            problems.append(f"{where}: {path} does not exist")
        elif anchor and resolved.suffix == ".md" and unquote(anchor).lower() not in anchors(resolved):
            problems.append(f"{where}: no heading #{anchor} in {resolved.relative_to(ROOT)}")
        elif anchor and resolved.is_dir():
            problems.append(f"{where}: an anchor on a folder")
    return problems


def test_the_link_checker_reads_links_and_slugs_as_github_does(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Which method should I use?\n## `lambda: auto` and co.\n## Notes\n## Notes\n"
                    "[a](other.md#x) `[not](a-link.md)` ![img](pic.png \"title\")\n"
                    "```\n[inside](code.md)\n```\n[web](https://example.com) [here](#notes-1)\n")
    assert anchors(page) == {"which-method-should-i-use", "lambda-auto-and-co", "notes", "notes-1"}
    assert [t for _, t in links(page)] == ["other.md#x", "pic.png", "https://example.com", "#notes-1"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert broken(page) == []


def test_every_docs_page_is_linked_from_the_readme():
    targets = {(ROOT / t.partition("#")[0]).resolve() for _, t in links(README) if not SCHEME.match(t)}
    unlinked = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in targets]
    assert unlinked == []


def test_the_readme_is_at_most_350_lines():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move details to docs/"
