"""Document -> text: read a .pdf, .txt or .md file into one string plus a page map.

Text policy (documented in docs/store-format.md):
- .txt/.md are decoded as UTF-8 (a UTF-8 BOM is dropped, UTF-16 with a BOM is accepted). Invalid
  UTF-8 is an error unless the user names another encoding with --encoding; we never guess.
- Line endings become "\n". PDF text is NFKC-normalised so ligatures such as "ﬁ" tokenize as "fi".
- PDF pages are joined with a blank line; the page map records each page's character span.
"""

from __future__ import annotations

import codecs
import contextlib
import logging
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ra_cli.errors import RaError
from ra_cli.files import file_sha256

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".text"}
PDF_SUFFIXES = {".pdf"}
PAGE_SEPARATOR = "\n\n"


@dataclass
class Page:
    number: int  # 1-based, as printed by PDF viewers
    char_start: int
    char_end: int


@dataclass
class Document:
    name: str
    sha256: str
    kind: str  # "pdf" or "text"
    text: str
    pages: list[Page] = field(default_factory=list)


def load_document(
    path: str | Path,
    encoding: str = "utf-8",
    on_page: Callable[[int, int], None] | None = None,
) -> Document:
    path = Path(path)
    if not path.exists():
        raise RaError(f"{path}: no such file")
    if path.is_dir():
        raise RaError(f"{path}: is a directory; give a .pdf, .txt or .md file")
    suffix = path.suffix.lower()
    if suffix in PDF_SUFFIXES:
        text, pages = _read_pdf(path, on_page)
        kind = "pdf"
    elif suffix in TEXT_SUFFIXES:
        text = _read_text(path, encoding)
        pages = [Page(1, 0, len(text))]
        kind = "text"
    else:
        raise RaError(
            f"{path}: unsupported file type '{suffix or '(none)'}'; ra reads .pdf, .txt and .md "
            "(convert other formats to text or PDF first)"
        )
    if not text.strip():
        raise RaError(f"{path}: the document is empty; nothing to chat about")
    return Document(name=path.name, sha256=file_sha256(path), kind=kind, text=text, pages=pages)


def _read_text(path: Path, encoding: str) -> str:
    raw = path.read_bytes()
    if not raw:
        raise RaError(f"{path}: the file is empty; nothing to chat about")
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"
    elif b"\x00" in raw[:65536]:
        raise RaError(f"{path}: looks like binary data, not text (it contains NUL bytes)")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise RaError(f"unknown encoding '{encoding}'; use a Python codec name such as utf-8 or latin-1")
    try:
        text = raw.decode("utf-8-sig" if encoding.lower().replace("_", "-") == "utf-8" else encoding)
    except UnicodeDecodeError as exc:
        raise RaError(
            f"{path}: not valid {encoding} (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "pass --encoding (e.g. --encoding latin-1) or convert the file to UTF-8"
        )
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if _control_fraction(text) > 0.05:
        raise RaError(f"{path}: looks like binary data, not text (too many control characters)")
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


def _read_pdf(path: Path, on_page: Callable[[int, int], None] | None) -> tuple[str, list[Page]]:
    import pypdf
    from pypdf.errors import PyPdfError

    with _quiet_pypdf():
        try:
            reader = pypdf.PdfReader(path)
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
        except RaError:
            raise
        except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
            raise RaError(f"{path}: cannot read this PDF ({_short(exc)}); it may be damaged — try repairing it with qpdf or re-exporting it")
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


def _short(exc: Exception) -> str:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return message[:160]
