"""The documentation: README.md is an entrance of at most 200 lines that links every page of docs/; every
relative link in README.md and docs/*.md reaches a file, and a heading where it names an #anchor; the
default run's headline table is where a rerun rewrites it."""

from __future__ import annotations

import re
from pathlib import Path

from dvc_projects import doc_pages

README_MAX_LINES = 200
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target); the text may hold one level of brackets; an optional "title" after the target.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s<>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...
HEADLINE_MARK = "<!-- headline: default run -->"
HEADLINE_ROWS = ["FVU", "L0", "dead latents %", "CE loss recovered", "KL"]


def without_code(text: str) -> str:
    """The page with fenced blocks and inline code spans removed: a link or heading in code is not one."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: links reduced to their text, lower case, punctuation dropped (letters,
    digits, '_', '-' and spaces stay), spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a Markdown page; repeated headings get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        base = slug(heading)
        found.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return found


def links(page: Path) -> list[str]:
    return LINK.findall(without_code(page.read_text(encoding="utf-8")))


def broken_links(pages: list[Path]) -> list[str]:
    """'page: target (why)' for every relative link that reaches no file, or no heading of the page it names."""
    problems = []
    for page in pages:
        for target in links(page):
            if EXTERNAL.match(target):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page.resolve()
            if not resolved.exists():
                problems.append(f"{page.name}: {target} (no such file)")
            elif anchor and (resolved.suffix != ".md" or anchor not in anchors(resolved)):
                problems.append(f"{page.name}: {target} (no heading #{anchor} in {resolved.name})")
    return problems


def test_every_relative_link_and_anchor_resolves(repo_dir: Path) -> None:
    pages = doc_pages(repo_dir)
    assert len(pages) > 2 and all(page.is_file() for page in pages)
    assert broken_links(pages) == []


def test_a_broken_link_or_anchor_is_found(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    target = "# A page\n\n## Its section: `code/path.h5`\n\n```\n## not a heading\n```\n"
    (tmp_path / "docs/target.md").write_text(target)
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/target.md) [ok](docs/target.md#its-section-codepathh5) [ok](https://example.org)\n"
                    "[missing](docs/missing.md) [bad anchor](docs/target.md#no-such-section) ![img](gone.png)\n"
                    "[in code](docs/target.md#not-a-heading) `[not a link](nowhere.md)`\n")
    assert broken_links([page]) == [
        "README.md: docs/missing.md (no such file)",
        "README.md: docs/target.md#no-such-section (no heading #no-such-section in target.md)",
        "README.md: gone.png (no such file)",
        "README.md: docs/target.md#not-a-heading (no heading #not-a-heading in target.md)",
    ]


def test_readme_is_an_entrance_that_maps_every_page(repo_dir: Path) -> None:
    readme = repo_dir / "README.md"
    assert len(readme.read_text(encoding="utf-8").splitlines()) <= README_MAX_LINES
    linked = {(repo_dir / target.partition("#")[0]).resolve() for target in links(readme)
              if not EXTERNAL.match(target)}
    unlinked = [page.name for page in doc_pages(repo_dir)[1:] if page.resolve() not in linked]
    assert unlinked == [], f"docs pages the README does not link: {unlinked}"


def test_readme_headline_table_has_the_five_figures(repo_dir: Path) -> None:
    readme = (repo_dir / "README.md").read_text(encoding="utf-8")
    assert readme.count(HEADLINE_MARK) == 1
    table = readme.split(HEADLINE_MARK, 1)[1].lstrip("\n").split("\n\n", 1)[0].splitlines()
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:]]
    assert [row[0] for row in rows] == HEADLINE_ROWS
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", row[1]) for row in rows), rows
