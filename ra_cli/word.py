"""Word (.docx) -> text in pages or sections, read for document.py: contracts and reports as
people send them.

Word records where each page began when it last laid the document out (`w:lastRenderedPageBreak`)
and where the author forced one (`w:br w:type="page"`, `w:pageBreakBefore`): a document saved by
Word is cut into those pages, numbered as Word showed them, and answers cite pages. A document
no word processor laid out (generated ones) has only the forced breaks, which would number its
pages wrongly: it is cut into sections at its level 1-3 headings instead, as HTML is. Tracked
deletions, field codes, comments, headers and footers are not text; a table's cells are kept
apart by a tab, its rows by a line. Standard library only; members are size-checked before
unpacking (markup.ZipPackage).
"""

from __future__ import annotations

import re
from pathlib import Path

from ra_cli.errors import RaError, first_line
from ra_cli.markup import UNREADABLE_ZIP, Section, ZipPackage, cut_at_headings, local_name

W = "{http://schemas.openxmlformats.org/wordprocessingml/2006/main}"
NOT_TEXT = {"delText", "instrText", "rPr", "pPr", "footnoteReference", "endnoteReference", "commentReference",
            "drawing", "pict", "object"}
HEADING_LEVELS = 3  # outline levels 0-2, as HTML's h1-h3


def word_sections(path: Path, raw: bytes) -> tuple[str, list[Section]]:
    """("page", a Section per page as Word last laid the document out) or ("section", Sections
    cut at headings) when it has no page marks; `raw`: the file's bytes (`path` names it in messages)."""
    try:
        with ZipPackage(path, "not a valid .docx (it is not a zip archive); save it as .docx from the word processor "
                              "(an old .doc too)", raw) as package:
            if not package.has("word/document.xml"):
                raise RaError(f"{path}: not a Word document (no word/document.xml inside); save it as .docx "
                              "from the word processor")
            body = package.xml("word/document.xml")
            reader = _Reader(_heading_levels(package))
    except UNREADABLE_ZIP as exc:
        raise RaError(f"{path}: cannot read this Word document ({first_line(exc)}); it may be damaged — open it "
                      "and save it again")
    reader.walk(body)
    reader.close_page()
    if reader.laid_out and len(reader.pages) > 1:
        return "page", [Section("", _tidy(text)) for text in reader.pages]
    text = "".join(reader.pages) + "".join(reader.page)
    return "section", [Section(s.title, _tidy(s.text)) for s in cut_at_headings(text, reader.headings)]


def _heading_levels(package: ZipPackage) -> dict[str, int]:
    """Paragraph style id -> outline level (0-based) of the heading styles: named "heading N" or
    "Title" (names are stable; ids are translated: "Heading1", "berschrift1"), or given an outline
    level."""
    if not package.has("word/styles.xml"):
        return {}
    levels = {}
    for style in package.xml("word/styles.xml").iter(W + "style"):
        named = style.find(W + "name")
        name = (named.get(W + "val") or "").lower() if named is not None else ""
        outline = _level(style.find(f"{W}pPr/{W}outlineLvl"))
        if re.fullmatch(r"heading \d", name):
            levels[style.get(W + "styleId")] = int(name[-1]) - 1
        elif name == "title":
            levels[style.get(W + "styleId")] = 0
        elif outline is not None:
            levels[style.get(W + "styleId")] = outline
    return levels


def _level(element) -> int | None:
    value = element.get(W + "val") if element is not None else None
    return int(value) if value and value.isdigit() else None


class _Reader:
    """Walks the body in document order: the text of each page, and the headings."""

    def __init__(self, levels: dict[str, int]):
        self.levels = levels
        self.page: list[str] = []  # the text of the page being read
        self.pages: list[str] = []
        self.offset = 0  # characters read so far, all pages
        self.laid_out = False  # a word processor marked where its pages began
        self.headings: list[tuple[int, str]] = []  # (offset in the whole text, title)
        self.cells = 0  # table cells open: their paragraphs are joined by a space

    def add(self, text: str):
        self.page.append(text)
        self.offset += len(text)

    def walk(self, element):
        name = local_name(element.tag)
        if name in NOT_TEXT:
            return
        if name == "p":
            self.paragraph(element)
        elif name == "t":
            self.add(element.text or "")
        elif name == "tab":
            self.add("\t")
        elif name in ("br", "cr"):
            self.close_page() if element.get(W + "type") == "page" else self.add("\n")
        elif name == "lastRenderedPageBreak":
            self.laid_out = True
            self.close_page()
        elif name == "noBreakHyphen":
            self.add("-")
        else:
            self.cells += name == "tc"
            for child in element:
                self.walk(child)
            self.cells -= name == "tc"
            if name == "tc":
                if self.page and self.page[-1] == " ":  # the space after the cell's last paragraph
                    self.page.pop()
                    self.offset -= 1
                self.add("\t")
            elif name in ("tr", "tbl"):
                self.add("\n")

    def paragraph(self, element):
        properties = element.find(W + "pPr")
        level = None
        if properties is not None:
            if properties.find(W + "pageBreakBefore") is not None:
                self.close_page()
            style = properties.find(W + "pStyle")
            level = self.levels.get(style.get(W + "val")) if style is not None else None
            own = _level(properties.find(W + "outlineLvl"))
            level = own if own is not None else level
        start = self.offset
        for child in element:
            self.walk(child)
        if level is not None and level < HEADING_LEVELS:
            title = " ".join("".join(t.text or "" for t in element.iter(W + "t")).split())
            if title:
                self.headings.append((start, title))
        self.add(" " if self.cells else "\n\n")

    def close_page(self):
        """End the page being read, unless it holds no text yet: Word may mark one page's start
        twice (a forced break, then where the page was laid out), and a page counts once."""
        text = "".join(self.page)
        if text.strip() or not self.pages:
            self.pages.append(text)
            self.page = []


def _tidy(text: str) -> str:
    """Runs' text as Word stores it, made plain: no white space at line ends, no run of blank lines."""
    lines = [line.rstrip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
