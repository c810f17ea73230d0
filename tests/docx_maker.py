"""Minimal Word (.docx) files for tests, laid out as Word writes them: [Content_Types].xml,
word/document.xml (paragraphs of runs; page marks where asked) and word/styles.xml naming the
heading styles (their ids translated, as in a German Word: only the names say "heading")."""

from __future__ import annotations

import zipfile
from pathlib import Path
from xml.sax.saxutils import escape

W = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"
STYLES = (f'<w:styles xmlns:w="{W}">'
          '<w:style w:type="paragraph" w:styleId="berschrift1"><w:name w:val="heading 1"/></w:style>'
          '<w:style w:type="paragraph" w:styleId="berschrift2"><w:name w:val="heading 2"/></w:style>'
          '<w:style w:type="paragraph" w:styleId="Titel"><w:name w:val="Title"/></w:style>'
          '<w:style w:type="paragraph" w:styleId="Standard"><w:name w:val="Normal"/></w:style></w:styles>')


def paragraph(text: str = "", style: str | None = None, page_mark: bool = False, inner: str = "") -> str:
    """One w:p: its style, a rendered page mark before its text (Word's lastRenderedPageBreak), the
    text as one run (tabs and breaks as Word writes them) and any raw inner XML after it."""
    properties = f'<w:pPr><w:pStyle w:val="{style}"/></w:pPr>' if style else ""
    mark = "<w:lastRenderedPageBreak/>" if page_mark else ""
    run = "".join(f'<w:t xml:space="preserve">{escape(piece)}</w:t>' if piece not in ("\t",) else "<w:tab/>"
                  for piece in _pieces(text))
    return f"<w:p>{properties}<w:r>{mark}{run}</w:r>{inner}</w:p>"


def _pieces(text: str):
    piece = ""
    for ch in text:
        if ch == "\t":
            yield from ([piece] if piece else [])
            yield "\t"
            piece = ""
        else:
            piece += ch
    if piece:
        yield piece


def table(rows: list[list[str]]) -> str:
    cells = "".join("<w:tr>" + "".join(f"<w:tc>{paragraph(cell)}</w:tc>" for cell in row) + "</w:tr>" for row in rows)
    return f"<w:tbl>{cells}</w:tbl>"


def make_docx(path: Path, body: str, styles: bool = True) -> Path:
    document = f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><w:document xmlns:w="{W}"><w:body>{body}</w:body></w:document>'
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as package:
        package.writestr("[Content_Types].xml", '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"/>')
        package.writestr("word/document.xml", document)
        if styles:
            package.writestr("word/styles.xml", STYLES)
    return path
