"""The Markdown cleaner/splitter: what is kept, what is dropped, and that math is never touched."""

from __future__ import annotations

import pytest

from saepipe.corpus.markdown import chapter_documents, clean_section, split_sections

CHAPTER = """\
# Chapter 3: Waves

A short chapter intro before any section.

## 3.1 Sound

Sound is a *longitudinal* wave.

### Speed of Sound

The speed is **about** 343 m/s in air.

#### A Detail

Detail text here.

## 3.2 Light

Light is a transverse wave.
"""


def test_splits_at_level_two_headings_with_intro_and_subsections():
    docs = chapter_documents(CHAPTER)
    assert [d.split("\n")[0] for d in docs] == ["Chapter 3: Waves", "3.1 Sound", "3.2 Light"]
    assert docs[0] == "Chapter 3: Waves\n\nA short chapter intro before any section."
    assert "Speed of Sound\n\nThe speed is about 343 m/s in air." in docs[1]
    assert "A Detail\n\nDetail text here." in docs[1]
    assert "Light" not in docs[1]
    assert not any("#" in d for d in docs)


def test_only_real_level_one_and_two_headings_split():
    text = "## 1.1 A\n\nBody one.\n#hashtag is not a heading\n### Sub\n\nBody two.\n##### Deep\n\nMore."
    sections = split_sections(text)
    assert len(sections) == 1
    assert clean_section(sections[0]).split("\n") == [
        "1.1 A", "", "Body one.", "#hashtag is not a heading", "Sub", "", "Body two.", "Deep", "", "More.",
    ]


def test_text_before_any_heading_is_its_own_document():
    docs = chapter_documents("Loose prose first.\n\n## 2.1 Next\n\nSection prose.")
    assert docs == ["Loose prose first.", "2.1 Next\n\nSection prose."]


def test_heading_without_body_gives_no_document():
    text = "# Chapter 9: T\n\n## 9.1 Empty\n\n\n## 9.2 Only Subheadings\n### Sub A\n#### Sub B\n\n## 9.3 Full\n\nText."
    assert chapter_documents(text) == ["Chapter 9: T\n\n9.3 Full\n\nText."]
    assert clean_section("## 9.1 Empty\n\n   \n") == ""
    # markup that cleans away to nothing is no body either
    assert clean_section("## 9.4 Pictures\n\n![a figure](fig.png)\n<!-- note -->\n") == ""


def test_images_removed_with_alt_text_links_keep_their_text():
    section = (
        "## 1.1 Links\n\n"
        "See ![a cell diagram](img/cell.png \"Cell\") here.\n"
        "Read [Newton's laws](https://example.org/wiki/Laws_(physics)) now.\n"
        "[![badge alt](badge.svg)](https://example.org) Gone.\n"
        "Bare [link] stays. Visit <https://example.org/page>.\n"
    )
    doc = clean_section(section)
    assert "![" not in doc and "cell diagram" not in doc and "badge" not in doc
    assert "See here." in doc
    assert "Read Newton's laws now." in doc
    assert "Bare [link] stays. Visit https://example.org/page." in doc
    assert "](" not in doc and "example.org/wiki" not in doc


def test_html_tags_and_comments_removed_inner_text_kept():
    section = (
        "## 1.2 Units\n\n"
        "Area is in m<sup>2</sup> and water is H<sub>2</sub>O.\n"
        '<div class="note" data-x=\'1\'>Keep this note</div>\n'
        "First<br/>second<br>third.\n"
        "<!-- an editor's\nmulti-line comment -->\n"
        "Salt &amp; pepper, 5&nbsp;kg, a < b and c > d.\n"
        "<span style=\"color:red\">Red</span> text.\n"
    )
    doc = clean_section(section)
    assert "m2" in doc and "H2O" in doc
    assert "Keep this note" in doc
    assert "First second third." in doc
    assert "editor" not in doc and "<!--" not in doc
    assert "Salt & pepper, 5 kg, a < b and c > d." in doc
    assert "Red text." in doc
    for tag in ("<sup", "</sup", "<div", "</div", "<br", "<span", "class="):
        assert tag not in doc


@pytest.mark.parametrize(
    "math",
    [
        "$x_1 * y_2$",
        "$a*b*c$",
        "$$\\frac{m_{1} * m_{2}}{r^{2}}$$",
        "$[{\\text{N}}_{2}](\\frac{3}{1})$",  # looks like a Markdown link
        "$<b>x</b>$",  # looks like an HTML tag
        "$\\_x\\$ \\{y\\}$",  # backslash escapes inside math are LaTeX, not Markdown
        "$__init__$",
    ],
)
def test_latex_kept_verbatim(math):
    doc = clean_section(f"## 1.3 Math\n\nThe value {math} is **important** and *exact*.")
    assert doc == f"1.3 Math\n\nThe value {math} is important and exact."


def test_adjacent_inline_math_and_display_math_kept():
    section = (
        "## 1.4 Ions\n\nBicarbonate (HCO$_{3}$$^{-}$) and H$^{+}$ ions *react*.\n\n"
        "$${\\text{CO}}_{2} + {\\text{H}}_{2}\\text{O}$$\n\nAfter *display*."
    )
    doc = clean_section(section)
    assert "Bicarbonate (HCO$_{3}$$^{-}$) and H$^{+}$ ions react." in doc
    assert "\n\n$${\\text{CO}}_{2} + {\\text{H}}_{2}\\text{O}$$\n\nAfter display." in doc


def test_multiline_display_math_kept_exactly():
    math = "$$\n\\begin{aligned}\n  a &= b_1 * c \\\\\n  d &= e\n\\end{aligned}\n$$"
    doc = clean_section(f"## 1.5 Align\n\nSee:\n\n{math}\n\nDone.")
    assert math in doc


def test_escaped_dollars_are_prose_not_math():
    doc = clean_section("## 1.6 Cost\n\nIt costs \\$5 and *only* \\$10, not $x_{1}$ dollars.")
    assert doc == "1.6 Cost\n\nIt costs $5 and only $10, not $x_{1}$ dollars."


def test_emphasis_markers_removed_but_prose_symbols_kept():
    section = (
        "## 1.7 Style\n\n"
        "*Figure.* A caption with **bold**, ***both*** and _under_ and __strong__.\n"
        "Escaped \\*stars\\* stay, 5 * 3 stays, snake_case_name stays, ~~struck~~ goes.\n"
        "Glued rule here. * * *\n"
        "**\n"
    )
    doc = clean_section(section)
    assert doc.split("\n")[2:] == [
        "Figure. A caption with bold, both and under and strong.",
        "Escaped *stars* stay, 5 * 3 stays, snake_case_name stays, struck goes.",
        "Glued rule here.",
    ]


def test_tables_keep_cell_text_and_drop_separator_rows():
    section = (
        "## 1.8 Data\n\n"
        "*Table.* Densities\n\n"
        "| Material | Density (kg/m$^{3}$) |\n"
        "|---|:---:|\n"
        "| Water | 1000 |\n"
        "|  | **Iron** 7870 |\n"
        "| Mercury \\| liquid | $\\rho_{Hg} = 13{,}600$ |\n"
        "| --- | --- |\n"
        "| > 20 | - |\n"
    )
    doc = clean_section(section)
    assert doc.split("\n")[2:] == [
        "Table. Densities",
        "",
        "Material | Density (kg/m$^{3}$)",
        "Water | 1000",
        "Iron 7870",
        "Mercury | liquid | $\\rho_{Hg} = 13{,}600$",
        "> 20 | -",
    ]
    assert "---" not in doc


def test_lists_blockquotes_and_rules():
    section = (
        "## 1.9 Steps\n\n"
        "- First bullet\n* Second *bullet*\n  + Nested bullet\n"
        "1. Ordered item\n2) Second item\n"
        "> Quoted line\n\n---\n\n* * *\n\nAfter the rules."
    )
    doc = clean_section(section)
    assert doc.split("\n")[2:] == [
        "First bullet",
        "Second bullet",
        "Nested bullet",
        "Ordered item",
        "Second item",
        "Quoted line",
        "",
        "After the rules.",
    ]


def test_whitespace_normalised():
    doc = clean_section("## 2.1   Title  ##\n\n\n\n  Indented   line.   \n\t\n\n\nNext\tpart.  \n\n\n")
    assert doc == "2.1 Title\n\nIndented line.\n\nNext part."


def test_deterministic_and_line_ending_independent():
    crlf = CHAPTER.replace("\n", "\r\n")
    assert chapter_documents(CHAPTER) == chapter_documents(CHAPTER) == chapter_documents(crlf)


def test_control_characters_used_internally_cannot_leak():
    doc = clean_section("## 3.1 T\n\nA \x00 0 \x00 and \x01 marker, $m$.")
    assert "\x00" not in doc and "\x01" not in doc
    assert doc.endswith("$m$.")
