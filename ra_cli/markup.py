"""HTML and EPUB -> text in sections: saved web pages, HTML manuals and e-books, read for
document.py.

A section starts at each h1-h3 heading and, in an EPUB, at each file of the book's reading order
(its spine): the unit an answer's citation names, as a page is in a PDF. Text keeps paragraph
breaks (block elements), `<pre>` blocks verbatim, and nothing of scripts, styles, the head or
images. Standard library only (html.parser, zipfile, xml.etree): nothing a file names is
fetched, and an EPUB's members are size-checked before they are unpacked (a small zip can unpack
to gigabytes). ZipPackage and the cut at headings serve word.py too.
"""

from __future__ import annotations

import codecs
import io
import posixpath
import re
import zipfile
import zlib
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote
from xml.etree import ElementTree

from ra_cli.errors import RaError, first_line

HEADINGS = {"h1", "h2", "h3"}  # a section per heading down to h3: chapters and their main parts
PARAGRAPH = {"p", "div", "h4", "h5", "h6", "blockquote", "section", "article", "table", "ul", "ol", "dl", "pre",
             "figure", "figcaption", "hr", "header", "footer", "main", "aside", "address", "details",
             "summary", "body", "caption"}
LINE = {"br", "li", "tr", "dt", "dd"}
CELL = {"td", "th"}
# not text of the document: code, styles, the head, and a page's navigation and controls
SKIPPED = {"script", "style", "head", "title", "noscript", "template", "svg", "object", "iframe", "nav", "button",
           "select"}
DOCUMENT_TYPES = {"application/xhtml+xml", "text/html", "application/x-dtbook+xml"}
# what a damaged zip or XML member raises while it is read (zlib.error: corrupt deflate data;
# BadZipFile: a member failing its CRC)
# ValueError: a cut zip read from memory seeks before its start ("negative seek value"), where a
# file raises OSError
UNREADABLE_ZIP = (ElementTree.ParseError, KeyError, NotImplementedError, EOFError, OSError, ValueError, zlib.error,
                  zipfile.BadZipFile)
MEMBER_LIMIT = 64 << 20  # bytes one file inside an EPUB or .docx may unpack to
BOOK_LIMIT = 1 << 30  # and all its files together
_CHARSET = re.compile(rb"""(?:<meta[^>]*charset\s*=\s*["']?|<\?xml[^>]*encoding\s*=\s*["'])([A-Za-z0-9_.:-]+)""", re.I)


@dataclass
class Section:
    title: str  # the heading's text ("" where a part starts without one)
    text: str


class _TextOfHtml(HTMLParser):
    """Text of one HTML document, with the character offset and text of each h1-h3 heading."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.length = 0
        self.breaks = 0  # newlines owed before the next text: 1 a line, 2 a paragraph
        self.skipping: list[str] = []  # open elements whose content is not text
        self.preformatted = 0
        self.heading: list[str] | None = None  # text of the heading being read
        self.heading_at: int | None = None  # where its first text landed
        self.headings: list[tuple[int, str]] = []
        self.title = ""
        self.in_title = False

    def handle_starttag(self, tag, attrs):
        if tag == "title" and not self.title and self.skipping in ([], ["head"]):
            self.in_title = True  # the page's own title (an <svg>'s title is not)
        if self.skipping == ["head"] and (tag == "body" or tag in HEADINGS | PARAGRAPH | LINE):
            self.skipping.pop()  # the head ends where the body's content starts, </head> or not
        if tag in SKIPPED:
            self.skipping.append(tag)
        if self.skipping:
            return
        if tag in HEADINGS:
            self._owe(2)
            self.heading, self.heading_at = [], None
        elif tag in PARAGRAPH:
            self._owe(2)
        elif tag in LINE:
            self._owe(1)
        elif tag in CELL and not self.breaks and self.parts and not self.parts[-1][-1:].isspace():
            self._emit(" ")
        if tag == "pre":
            self.preformatted += 1

    def handle_endtag(self, tag):
        if tag == "title":
            self.in_title = False
        if self.skipping:
            if tag == self.skipping[-1]:
                self.skipping.pop()
            return
        if tag in HEADINGS and self.heading is not None:
            title = " ".join("".join(self.heading).split())
            if title:  # an empty heading (an anchor, an image) starts nothing
                self.headings.append((self.heading_at, title))
            self.heading = None
            self._owe(2)
        elif tag in PARAGRAPH:
            self._owe(2)
        elif tag in LINE - {"br"}:
            self._owe(1)
        if tag == "pre" and self.preformatted:
            self.preformatted -= 1

    def handle_data(self, data):
        if self.in_title:
            self.title += data
        if self.skipping:
            return
        if not self.preformatted:
            data = re.sub(r"\s+", " ", data)
            if self.breaks or not self.parts or self.parts[-1][-1:].isspace():
                data = data.lstrip()
        else:
            data = data.replace("\r\n", "\n").replace("\r", "\n")
        if not data:
            return
        if self.heading is not None:
            self.heading.append(data)
        self._emit(data)

    def _owe(self, newlines: int):
        self.breaks = max(self.breaks, newlines)

    def _emit(self, data: str):
        if self.breaks and self.parts:
            while self.parts and self.parts[-1].endswith(" "):  # no space left at a line's end
                self.parts[-1] = self.parts[-1][:-1]
                self.length -= 1
            self.parts.append("\n" * self.breaks)
            self.length += self.breaks
        self.breaks = 0
        if self.heading is not None and self.heading_at is None:
            self.heading_at = self.length
        self.parts.append(data)
        self.length += len(data)


def html_sections(markup: str) -> tuple[str, list[Section]]:
    """(the document's <title>, its text cut at each h1-h3 heading: cut_at_headings)."""
    parser = _TextOfHtml()
    parser.feed(markup)
    parser.close()
    return " ".join(parser.title.split()), cut_at_headings("".join(parser.parts), parser.headings)


def cut_at_headings(text: str, headings: list[tuple[int, str]]) -> list[Section]:
    """text cut where each heading (offset, title) starts, the part before the first untitled.
    Empty sections are dropped, and a heading with no text of its own before the next ("Chapter
    3", then "The Storm") joins that next section, titles joined by " · "."""
    starts = [0] + [offset for offset, _ in headings]
    titles = [""] + [title for _, title in headings]
    sections: list[Section] = []
    for title, start, end in zip(titles, starts, starts[1:] + [len(text)]):
        body = text[start:end].strip()
        if sections and sections[-1].text == sections[-1].title:
            heading = sections.pop()
            title, body = f"{heading.title} · {title}", f"{heading.text}\n\n{body}".strip()
        if body:
            sections.append(Section(title, body))
    return sections


def declared_charset(raw: bytes) -> str | None:
    """The encoding an HTML or XHTML file declares in its first 2 KB (meta charset or XML
    declaration), when Python has a codec of that name (None otherwise, or when none is declared)."""
    found = _CHARSET.search(raw[:2048])
    if found is None:
        return None
    try:
        return codecs.lookup(found.group(1).decode("ascii")).name
    except LookupError:
        return None


def decode_markup(raw: bytes) -> str:
    """An EPUB member's text: its BOM or declared charset, else UTF-8. Bytes invalid there become
    U+FFFD: one bad byte must not lose the book."""
    if raw.startswith(b"\xef\xbb\xbf"):
        return raw[3:].decode("utf-8", "replace")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16", "replace")
    return raw.decode(declared_charset(raw) or "utf-8", "replace")


def epub_sections(path: Path, raw: bytes) -> list[Section]:
    """An EPUB's text in reading order, cut into sections (every spine file starts one); `raw`:
    the file's bytes (`path` names it in messages)."""
    try:
        with ZipPackage(path, "not a valid EPUB (it is not a zip archive); re-export it from the e-book software",
                        raw) as book:
            return [section for markup in _spine_documents(book) for section in html_sections(markup)[1]]
    except UNREADABLE_ZIP as exc:
        raise RaError(f"{path}: cannot read this EPUB ({first_line(exc)}); it may be damaged — re-export it "
                      "(e.g. with Calibre)")


def _spine_documents(book: "ZipPackage"):
    """The markup of each document in the book's spine, in reading order."""
    container = book.xml("META-INF/container.xml")
    rootfile = next((e for e in container.iter() if local_name(e.tag) == "rootfile" and e.get("full-path")), None)
    if rootfile is None:
        raise RaError(f"{book.path}: not a valid EPUB (META-INF/container.xml names no package file)")
    package_path = rootfile.get("full-path")
    package = book.xml(package_path)
    items = {e.get("id"): e for e in package.iter() if local_name(e.tag) == "item"}
    spine = [e.get("idref") for e in package.iter() if local_name(e.tag) == "itemref"]
    if not spine:
        raise RaError(f"{book.path}: not a valid EPUB (its package file lists no reading order)")
    encrypted = _encrypted_members(book)
    base = posixpath.dirname(package_path)
    for idref in spine:
        item = items.get(idref)
        if item is None or item.get("media-type") not in DOCUMENT_TYPES or not item.get("href"):
            continue
        member = posixpath.normpath(posixpath.join(base, unquote(item.get("href").split("#")[0])))
        if member in encrypted:
            raise RaError(f"{book.path}: the EPUB is DRM-protected (its text is encrypted); ra can read only DRM-free "
                          "books")
        yield decode_markup(book.read(member))


def _encrypted_members(book: "ZipPackage") -> set[str]:
    """Members META-INF/encryption.xml lists (fonts are often obfuscated this way; text only with DRM)."""
    if not book.has("META-INF/encryption.xml"):
        return set()
    return {posixpath.normpath(unquote(element.get("URI"))) for element in book.xml("META-INF/encryption.xml").iter()
            if local_name(element.tag) == "CipherReference" and element.get("URI")}


class ZipPackage:
    """A document that is a zip of parts (EPUB, .docx), read member by member; each member's size
    is checked from the zip's directory before it is unpacked, against MEMBER_LIMIT and against
    what is left of BOOK_LIMIT for the whole file."""

    def __init__(self, path: Path, not_zip: str, raw: bytes):
        try:
            self.zip = zipfile.ZipFile(io.BytesIO(raw))
        except zipfile.BadZipFile:
            raise RaError(f"{path}: {not_zip}")
        self.path, self.left = path, BOOK_LIMIT

    def __enter__(self) -> "ZipPackage":
        return self

    def __exit__(self, *exc) -> None:
        self.zip.close()

    def has(self, member: str) -> bool:
        return member in self.zip.NameToInfo

    def read(self, member: str) -> bytes:
        size = self.zip.getinfo(member).file_size
        self.left -= size
        if size > MEMBER_LIMIT or self.left < 0:
            raise RaError(f"{self.path}: {member} unpacks to {size / 2**20:,.0f} MB, more than an e-book's text "
                          f"needs (ra reads at most {MEMBER_LIMIT >> 20} MB a file, {BOOK_LIMIT >> 30} GB a book)")
        return self.zip.read(member)

    def xml(self, member: str) -> ElementTree.Element:
        return ElementTree.fromstring(self.read(member))


def local_name(tag) -> str:
    """An XML tag without its namespace: EPUB 2 and 3 and sloppy writers all agree on local names."""
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""
