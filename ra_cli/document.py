"""Document -> text: read a .pdf, .docx, .epub, .html, .txt or .md file (any other text file as text; a
document piped in by its first bytes) into one string plus a page map.

Text policy (documented in docs/store-format.md):
- .txt/.md are decoded as UTF-8 (a UTF-8 BOM is dropped, UTF-16 with a BOM is accepted). Invalid
  UTF-8 is an error unless the user names another encoding with --encoding; we never guess.
  .html files likewise, except that the charset the page declares replaces the UTF-8 default.
- Line endings become "\n". PDF text is NFKC-normalised so ligatures such as "ﬁ" tokenize as "fi".
- PDF pages are joined with a blank line; the page map records each page's character span. HTML
  and EPUB text (markup.py) is cut into sections at h1-h3 headings (and an EPUB's files), which
  take the place of pages, each with its heading as title; a Word file (word.py) into the pages
  Word laid it out in, or where it has no page marks into sections at its headings.
- A document's `unit` is what answers cite: "page", "section" or (text files) "line".
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import io
import logging
import unicodedata
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ra_cli.errors import RaError, first_line
from ra_cli.markup import UNREADABLE_ZIP, Section, declared_charset, epub_sections, html_sections
from ra_cli.word import word_sections

# plain text, and the plain-text markups manuals and papers are written in (read as text, cited by line)
TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".text", ".rst", ".adoc", ".asciidoc", ".org", ".tex"}
PDF_SUFFIXES = {".pdf"}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
EPUB_SUFFIXES = {".epub"}
WORD_SUFFIXES = {".docx"}
# source code and its build files, which a folder's walk takes besides documents (a file named on
# the command line is read as text whatever its suffix, when it is text)
CODE_SUFFIXES = {
    ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".hh", ".cu", ".rs", ".go", ".java", ".kt",
    ".scala", ".swift", ".m", ".cs", ".fs", ".js", ".mjs", ".ts", ".tsx", ".jsx", ".vue", ".rb", ".php",
    ".pl", ".lua", ".r", ".jl", ".hs", ".ml", ".ex", ".exs", ".erl", ".clj", ".dart", ".zig", ".nim",
    ".sh", ".bash", ".zsh", ".ps1", ".sql", ".proto", ".cmake", ".toml", ".ini", ".cfg",
}
PAGE_SEPARATOR = "\n\n"
READ = ".pdf, .docx, .epub, .html, .txt and .md (also .rst, .adoc, .org, .tex), and other plain text such as source code"
UNITS = ("page", "section", "line")


@dataclass
class Page:
    number: int  # 1-based, as printed by PDF viewers (sections: in reading order)
    char_start: int
    char_end: int
    title: str = ""  # a section's heading


@dataclass
class Document:
    name: str
    sha256: str
    kind: str  # "pdf", "docx", "epub", "html" or "text"
    text: str
    pages: list[Page] = field(default_factory=list)
    unit: str = "page"  # what a Page is and answers cite: "page", "section", or "line" (one page of text)
    parts: list[dict] = field(default_factory=list)  # a collection's documents (collection.Part records)


def citation_unit(record: dict) -> str:
    """The unit of a stored document record (a manifest's "document"); stores written before
    records named it held only PDFs (pages) and text (lines)."""
    unit = record.get("unit")
    if unit in UNITS:
        return unit
    return "page" if record.get("kind") == "pdf" else "line"


def extent(unit: str, pages: int, documents: int = 0) -> str:
    """How much of a document there is, in its own units: "117 pages", "12 sections", "text";
    a collection's: "3 documents, 45 pages"."""
    if documents:
        return f"{documents:,} document{'s' if documents != 1 else ''}, {extent(unit, pages)}"
    if unit == "line":
        return "text"
    return f"{pages:,} {unit}{'s' if pages != 1 else ''}"


def load_document(
    path: str | Path,
    encoding: str = "utf-8",
    on_page: Callable[[int, int], None] | None = None,
    raw: bytes | None = None,
) -> Document:
    """A document file, read once (`raw`: its bytes, when the caller has read them): its text comes
    from the bytes its sha256 is taken of, so a file written to while ra reads it (a growing log)
    cannot be cached under bytes other than those read."""
    path = Path(path)
    if not path.exists():
        raise RaError(f"{path}: no such file")
    if path.is_dir():
        raise RaError(f"{path}: is a directory; give a file ra reads ({READ})")
    if not path.is_file():
        # a pipe (`ra chat <(curl URL)`: /dev/fd/63, a FIFO) reads once: hashing it again would
        # hash nothing, and every piped document would find the first one's context
        return load_piped(path.read_bytes(), encoding, path.name)
    suffix = path.suffix.lower()
    kind = ("pdf" if suffix in PDF_SUFFIXES else "text" if suffix in TEXT_SUFFIXES else "html" if suffix in HTML_SUFFIXES
            else "epub" if suffix in EPUB_SUFFIXES else "docx" if suffix in WORD_SUFFIXES else "other")
    return _document(path, path.read_bytes() if raw is None else raw, kind, encoding, on_page)


PIPED = "-"  # the document argument that means "read it from stdin"


def load_piped(raw: bytes, encoding: str = "utf-8", name: str = "stdin") -> Document:
    """A document piped in (`pdftotext book.pdf - | ra chat -`, `curl URL | ra chat -`, `ra chat
    <(curl URL)`), told apart by its first bytes since a pipe's name says nothing: a PDF, a zip
    (a .docx or an EPUB, by the parts inside), an HTML page, or text. Its context is cached by its
    bytes' sha256 like a file's, so piping the same document again reuses it."""
    label = Path(name)
    if not raw:
        raise RaError(f"{label}: nothing was piped in; pipe a document (cat notes.txt | ra chat -) or give its path")
    head = raw[:1024].lstrip(codecs.BOM_UTF8 + b" \t\r\n").lower()
    if raw.startswith(b"%PDF-"):
        kind = "pdf"
    elif raw.startswith(b"PK\x03\x04"):
        kind = _zip_kind(label, raw)
    elif head.startswith((b"<!doctype html", b"<html")):
        kind = "html"
    else:
        kind = "text"
    return _document(label, raw, kind, encoding, None)


def _zip_kind(label: Path, raw: bytes) -> str:
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            names = set(archive.namelist())
    except UNREADABLE_ZIP as exc:
        raise RaError(f"{label}: cannot read this zip archive ({first_line(exc)}); it may be damaged") from None
    if "word/document.xml" in names:
        return "docx"
    if "META-INF/container.xml" in names:
        return "epub"
    raise RaError(f"{label}: a zip archive that is neither a .docx nor an EPUB; ra reads {READ}")


def _document(path: Path, raw: bytes, kind: str, encoding: str, on_page) -> Document:
    """The Document of a file's (or a pipe's) bytes, read as `kind` ("other": text if it is text)."""
    if kind == "pdf":
        text, pages = _read_pdf(path, on_page, raw)
        unit = "page"
    elif kind in ("text", "other"):
        text = _read_text(path, encoding, raw) if kind == "text" else _read_other_as_text(path, encoding, raw)
        pages = [Page(1, 0, len(text))]
        kind, unit = "text", "line"
    else:
        if kind == "docx":
            unit, sections = word_sections(path, raw)
        else:
            unit, sections = "section", _html_sections(path, encoding, raw) if kind == "html" else epub_sections(path, raw)
        text, pages = _joined(sections)
        if not text.strip():
            what = {"epub": "only images (a comic or a scanned book?)", "html": "no text outside its markup",
                    "docx": "no text (only images or drawings?)"}[kind]
            raise RaError(f"{path}: no text to read — it holds {what}; ra needs the document's text")
    if not text.strip():
        raise RaError(f"{path}: the document is empty; nothing to chat about")
    return Document(name=path.name, sha256=hashlib.sha256(raw).hexdigest(), kind=kind, text=text, pages=pages,
                    unit=unit)


def _html_sections(path: Path, encoding: str, raw: bytes) -> list[Section]:
    """A saved web page or HTML manual: decoded as it declares (unless --encoding says otherwise),
    cut at its headings; text before the first heading is titled by the page's <title>."""
    declared = declared_charset(raw) if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else None
    title, sections = html_sections(_read_text(path, declared or encoding, raw))
    if sections and not sections[0].title:
        sections[0].title = title
    return sections


def _joined(sections: list[Section]) -> tuple[str, list[Page]]:
    """Sections joined as PDF pages are (a blank line between), each a page with its title."""
    pages, offset = [], 0
    for section in sections:
        if pages:
            offset += len(PAGE_SEPARATOR)
        pages.append(Page(len(pages) + 1, offset, offset + len(section.text), section.title))
        offset += len(section.text)
    return PAGE_SEPARATOR.join(section.text for section in sections), pages


class BinaryData(RaError):
    """A file that is not text: NUL bytes, or too many control characters once decoded."""


class NotDecodable(RaError):
    """A file whose bytes are not text in the encoding asked for."""


def _read_other_as_text(path: Path, encoding: str, raw: bytes) -> str:
    """A file of a kind ra does not know by its name (source code, a log, a config file, a README
    or LICENSE without a suffix) is plain text to read, cited by line, when it is text."""
    suffix = path.suffix.lower()
    try:
        return _read_text(path, encoding, raw)
    except (BinaryData, NotDecodable) as exc:
        # bytes that do not decode are text in another encoding only if few of them are controls
        binary = isinstance(exc, BinaryData) or _control_fraction(raw[:65536].decode("latin-1")) > 0.05
        why = "binary, not text" if binary else f"not {encoding} text; if it is text, pass --encoding"
        raise RaError(
            f"{path}: unsupported file type '{suffix or '(none)'}' ({why}); ra reads {READ} "
            "(convert other formats to text or PDF first)"
        ) from None


def _read_text(path: Path, encoding: str, raw: bytes) -> str:
    if not raw:
        raise RaError(f"{path}: the file is empty; nothing to chat about")
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"
    elif b"\x00" in raw[:65536]:
        raise BinaryData(f"{path}: looks like binary data, not text (it contains NUL bytes)")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise RaError(f"unknown encoding '{encoding}'; use a Python codec name such as utf-8 or latin-1")
    try:
        text = raw.decode("utf-8-sig" if encoding.lower().replace("_", "-") == "utf-8" else encoding)
    except UnicodeDecodeError as exc:
        raise NotDecodable(
            f"{path}: not valid {encoding} (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "pass --encoding (e.g. --encoding latin-1) or convert the file to UTF-8"
        )
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if _control_fraction(text) > 0.05:
        raise BinaryData(f"{path}: looks like binary data, not text (too many control characters)")
    return text


def _control_fraction(text: str) -> float:
    sample = text[:65536]
    if not sample:
        return 0.0
    controls = sum(1 for ch in sample if unicodedata.category(ch) == "Cc" and ch not in "\n\t\f\v")
    return controls / len(sample)


@contextlib.contextmanager
def _quiet_pypdf():
    """pypdf logs and warns a lot on real-world PDFs; none of it is actionable for a chat user."""
    logger = logging.getLogger("pypdf")
    previous = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(previous)


def _read_pdf(path: Path, on_page: Callable[[int, int], None] | None, raw: bytes) -> tuple[str, list[Page]]:
    import pypdf

    with _quiet_pypdf():
        try:
            reader = pypdf.PdfReader(io.BytesIO(raw))
            if reader.is_encrypted:
                # Many PDFs are "encrypted" with an empty user password only (print restrictions).
                try:
                    unlocked = reader.decrypt("")
                except Exception:
                    unlocked = 0
                if not unlocked:
                    raise RaError(
                        f"{path}: the PDF is password-protected; decrypt it first "
                        "(e.g. qpdf --password=PASSWORD --decrypt in.pdf out.pdf)"
                    )
            page_count = len(reader.pages)
        except (RaError, MemoryError):
            raise
        except Exception as exc:  # pypdf meets damage with any exception (an assert, NotImplementedError for a mangled filter name)
            raise RaError(f"{path}: cannot read this PDF ({first_line(exc)}); it may be damaged — try repairing it with qpdf or re-exporting it")
        if page_count == 0:
            raise RaError(f"{path}: the PDF has no pages")
        parts: list[str] = []
        pages: list[Page] = []
        offset = 0
        for index in range(page_count):
            try:
                page_text = reader.pages[index].extract_text() or ""
            except Exception as exc:  # a single bad page must not lose the whole book
                logging.getLogger("ra").debug("page %d: %s", index + 1, exc)
                page_text = ""
            page_text = unicodedata.normalize("NFKC", page_text).replace("\r\n", "\n").strip()
            if parts:
                offset += len(PAGE_SEPARATOR)
            pages.append(Page(index + 1, offset, offset + len(page_text)))
            parts.append(page_text)
            offset += len(page_text)
            if on_page is not None:
                on_page(index + 1, page_count)
    text = PAGE_SEPARATOR.join(parts)
    if not text.strip():
        raise RaError(
            f"{path}: no extractable text in {page_count} page(s) — it is probably scanned images; "
            "run OCR first (e.g. ocrmypdf in.pdf out.pdf)"
        )
    return text, pages
