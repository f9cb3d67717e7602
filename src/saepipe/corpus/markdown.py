"""Markdown chapters -> plain-prose documents, one per `##` section.

The language model should see text, not markup: headings become plain lines, links keep their
text, images, HTML tags and comments go, and tables keep their cell text. LaTeX (`$...$`,
`$$...$$`), inline code and backslash escapes are set aside as placeholders before any markup is
touched, so no rule below can rewrite a `*`, `_`, `[` or `|` inside them. Everything is regular
expressions over whole sections (no per-character Python loop), and the output depends only on
the input text, so the same chapter always gives byte-identical documents.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable

# Placeholder for a protected span: NUL, its index, NUL. NUL and SOH are removed from the input first.
_HOLD = "\x00"
_HOLD_RE = re.compile("\x00(\\d+)\x00")
# Marks a heading line while cleaning, so a section holding only headings counts as empty.
_HEADING_MARK = "\x01"

# Protected spans, leftmost first: a backslash escape, display math (may span lines, never a blank
# line), inline math (one line), an inline code span. An escaped `\$` is consumed as an escape, so it
# never opens math; `HCO$_{3}$$^{-}$` reads as two inline spans because `$_` cannot open `$$`.
_PROTECT_RE = re.compile(
    r"(?P<esc>\\[!-/:-@\[-`{-~])"
    r"|(?P<math>\$\$(?:[^$\\\n]|\\[\s\S]|\n(?![ \t]*\n))+\$\$|\$(?:[^$\\\n]|\\.)+\$)"
    r"|`(?P<code>[^`\n]+)`"
)

# Splits a chapter before every level-1 or level-2 ATX heading (`# ...`, `## ...`).
_SPLIT_RE = re.compile(r"^(?=[ ]{0,3}##?(?:[ \t]|$))", re.M)

_COMMENT_RE = re.compile(r"<!--[\s\S]*?(?:-->|$)")
_SCRIPT_RE = re.compile(r"<(script|style)\b[^>]*>[\s\S]*?</\1\s*>", re.I)
_BRACKETED = r"(?:[^\[\]\n]|\[[^\[\]\n]*\])*"  # link text: allows one level of nested [..]
_DESTINATION = r"\((?:[^()\s]|\([^()\s]*\))*(?:\s+(?:\"[^\"\n]*\"|'[^'\n]*'))?\s*\)"
_IMAGE_RE = re.compile(rf"!\[{_BRACKETED}\](?:{_DESTINATION}|\[[^\]\n]*\])")
_LINK_RE = re.compile(rf"\[({_BRACKETED})\]{_DESTINATION}")
_LINK_DEFINITION_RE = re.compile(r"^[ ]{0,3}\[[^\]\n]+\]:[ \t]+\S+.*$", re.M)
_AUTOLINK_RE = re.compile(r"<((?:https?|ftp|mailto):[^\s<>]+)>", re.I)
# A tag as CommonMark defines raw HTML: a name, then only well-formed attributes, so `a < b` and
# `x <= y` stay prose.
_TAG_RE = re.compile(
    r"</?([A-Za-z][A-Za-z0-9-]*)"
    r"(?:\s+[A-Za-z_:][\w.:-]*(?:\s*=\s*(?:\"[^\"]*\"|'[^']*'|[^\s\"'=<>`]+))?)*"
    r"\s*/?>"
)
_BLOCK_TAGS = frozenset({
    "address", "article", "aside", "blockquote", "caption", "dd", "div", "dl", "dt", "figcaption", "figure",
    "footer", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li", "main", "nav", "ol", "p", "pre",
    "section", "table", "tbody", "tfoot", "thead", "tr", "ul",
})  # fmt: skip
_SPACE_TAGS = frozenset({"br", "td", "th", "wbr"})
_ENTITY_RE = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")

_TITLE_RE = re.compile(r"[ ]{0,3}#[ \t]+([^\n]*?)(?:[ \t]+#+)?[ \t]*")  # a lone level-1 heading
_HEADING_RE = re.compile(r"^[ ]{0,3}#{1,6}(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$", re.M)
_RULE_RE = re.compile(r"^[ \t]*([-*_])(?:[ \t]*\1){2,}[ \t]*$", re.M)
_TABLE_SEPARATOR_RE = re.compile(r"^(?=[^\n]*\|)(?=[^\n]*-)[ \t|:-]+(?:\n|$)", re.M)
_TABLE_ROW_RE = re.compile(r"^[ \t]*\|(.*)$", re.M)
_FENCE_RE = re.compile(r"^[ \t]*(?:```|~~~).*$", re.M)
_BULLET_RE = re.compile(r"^[ \t]*(?:>[ \t]?)*[ \t]*(?:(?:[-*+]|\d{1,9}[.)])(?:[ \t]+|$))?", re.M)

# Spaced star runs (`* * *` glued to a line) and star-only lines are leftover rules or emphasis.
_STRAY_STARS_RE = re.compile(r"\*+(?:[ \t]+\*+)+|^[ \t]*\*+[ \t]*$", re.M)
_STAR_RE = re.compile(r"(?<=\S)\*++|\*++(?=\S)")  # a `*` run touching text is emphasis markup
_UNDERSCORE_RE = re.compile(r"(?<![\w\\])(__?)(?=\S)([^\n]+?)(?<=\S)\1(?!\w)")
_STRIKE_RE = re.compile(r"~~(?=\S)([^\n]+?)(?<=\S)~~")

_SPACES_RE = re.compile(r"[ \t\f\v\xa0]+")
_BLANK_LINES_RE = re.compile(r"\n{3,}")


def split_sections(markdown: str) -> list[str]:
    """Split a chapter before each `#`/`##` heading; a section keeps its `###`/`####` subsections.

    Text before the first such heading (if any) is a section of its own; blank ones are dropped.
    """
    text = markdown.replace("\r\n", "\n").replace("\r", "\n")
    return [part for part in _SPLIT_RE.split(text) if part.strip()]


def clean_section(section: str) -> str:
    """One section's Markdown -> plain text; "" when nothing but headings is left.

    The section's own heading becomes the first line (without `#` marks), so the document reads
    as prose that names its topic.
    """
    text = section.replace("\r\n", "\n").replace("\r", "\n").replace(_HOLD, "").replace(_HEADING_MARK, "")
    held: list[str] = []
    text = _PROTECT_RE.sub(_holder(held), text)
    text = _strip_html(text)
    text = _IMAGE_RE.sub("", text)
    text = _LINK_RE.sub(r"\1", text)
    text = _LINK_DEFINITION_RE.sub("", text)
    text = _strip_blocks(text)
    text = _strip_emphasis(text)
    text = _tidy_whitespace(text)
    if not _has_body(text):
        return ""
    text = text.replace(_HEADING_MARK, "")
    return _HOLD_RE.sub(lambda m: held[int(m.group(1))], text)


def clean_sections(markdown: str, long_enough: Callable[[str], bool] = bool) -> list[str]:
    """Each section of a chapter cleaned, in order ("" for one without a body).

    A section that is only the chapter's `# Title` is not a document of its own: the title becomes the
    first line of the first later section that `long_enough` keeps with it, so the chapter's first
    document names the chapter even when its opening section is too short to keep.
    """
    out: list[str] = []
    title = ""
    for section in split_sections(markdown):
        text = clean_section(section)
        heading = _TITLE_RE.fullmatch(section.strip())
        if not text and heading:
            title = _strip_emphasis(_LINK_RE.sub(r"\1", heading.group(1))).strip()
            continue
        if text and title and long_enough(titled := f"{title}\n\n{text}"):
            text, title = titled, ""
        out.append(text)
    return out


def chapter_documents(markdown: str) -> list[str]:
    """A chapter's non-empty sections, cleaned, in order."""
    return [doc for doc in clean_sections(markdown) if doc]


def _holder(held: list[str]) -> Callable[[re.Match[str]], str]:
    """A re.sub callback that stores what each protected span should become and leaves a placeholder."""

    def hold(match: re.Match[str]) -> str:
        if match.lastgroup == "esc":
            kept = match.group()[1]  # `\$` -> `$`: the escape only told Markdown "literal"
        elif match.lastgroup == "code":
            kept = match.group("code")
        else:
            kept = match.group()  # LaTeX, verbatim
        held.append(kept)
        return f"{_HOLD}{len(held) - 1}{_HOLD}"

    return hold


def _strip_html(text: str) -> str:
    """Drop comments, script/style blocks and tags (keeping their inner text), decode entities."""
    text = _COMMENT_RE.sub("", text)
    text = _SCRIPT_RE.sub("", text)
    text = _AUTOLINK_RE.sub(r"\1", text)
    text = _TAG_RE.sub(_tag_replacement, text)
    return _ENTITY_RE.sub(_entity_replacement, text)


def _tag_replacement(match: re.Match[str]) -> str:
    name = match.group(1).lower()
    if name in _BLOCK_TAGS:
        return "\n"
    return " " if name in _SPACE_TAGS else ""


def _entity_replacement(match: re.Match[str]) -> str:
    decoded = html.unescape(match.group())
    return " " if decoded == "\xa0" else decoded


def _strip_blocks(text: str) -> str:
    """Line markup: headings -> marked plain lines, rules and table separators dropped, table rows
    -> `cell | cell`, list markers (bullets and ordered-list numbers alike) and blockquote markers removed."""
    text = _FENCE_RE.sub("", text)
    text = _TABLE_SEPARATOR_RE.sub("", text)
    text = _RULE_RE.sub("", text)
    text = _HEADING_RE.sub(lambda m: _HEADING_MARK + (m.group(1) or ""), text)
    text = _BULLET_RE.sub("", text)  # before table rows, so a cell like `> 5` or `-` is not a marker
    return _TABLE_ROW_RE.sub(_table_row, text)


def _table_row(match: re.Match[str]) -> str:
    cells = (cell.strip() for cell in match.group(1).split("|"))
    return " | ".join(cell for cell in cells if cell)


def _strip_emphasis(text: str) -> str:
    """Remove `*`/`_`/`~~` emphasis markers; a `*` with spaces on both sides is prose and stays."""
    text = _STRAY_STARS_RE.sub(" ", text)
    text = _STAR_RE.sub("", text)
    text = _UNDERSCORE_RE.sub(r"\2", text)
    return _STRIKE_RE.sub(r"\1", text)


def _tidy_whitespace(text: str) -> str:
    """Single spaces, no leading/trailing spaces per line, at most one blank line in a row."""
    text = _SPACES_RE.sub(" ", text)
    lines = [line.strip(" ") for line in text.split("\n")]
    for i, line in enumerate(lines):
        if line == _HEADING_MARK:  # a heading with no text
            lines[i] = ""
        elif line.startswith(_HEADING_MARK + " "):
            lines[i] = _HEADING_MARK + line[2:]
    return _BLANK_LINES_RE.sub("\n\n", "\n".join(lines)).strip("\n")


def _has_body(text: str) -> bool:
    """True when some line other than a heading has text (a bare heading is not a document)."""
    return any(line and not line.startswith(_HEADING_MARK) for line in text.split("\n"))
