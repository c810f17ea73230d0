"""Several documents as one: a folder of contracts and their annexes, a manual saved as one HTML
file per chapter. Read for document.py's callers (`ra ingest A B DIR`, `ra chat DIR`).

Each document keeps its own units (a PDF's pages, a book's sections, a text file's lines) and
starts with its file name on a line of its own ("File: lease.pdf"), so that the model reads
which document says what; the collection's pages are its documents' pages in order, numbered on
(a text file: one page), and `parts` maps them back, so that answers cite "lease.pdf p. 3".
Files in a folder (documents and source code, by suffix) are taken in natural order (ch2 before
ch10), hidden files, saved contexts and what tools put beside code (node_modules, __pycache__,
virtual environments) left out; one that cannot be read is skipped with a warning (a folder rarely
holds only good files), while a file named on the command line must be read.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ra_cli.document import (CODE_SUFFIXES, EPUB_SUFFIXES, HTML_SUFFIXES, PAGE_SEPARATOR, PDF_SUFFIXES, READ,
                             TEXT_SUFFIXES, WORD_SUFFIXES, Document, Page, load_document)
from ra_cli.errors import RaError

READABLE = PDF_SUFFIXES | WORD_SUFFIXES | EPUB_SUFFIXES | HTML_SUFFIXES | TEXT_SUFFIXES | CODE_SUFFIXES
MAX_DOCUMENTS = 10_000
NOT_WRITTEN_BY_HAND = {"node_modules", "__pycache__"}  # folders of installed or generated code
HEADER = "File: {name}\n\n"  # before each document's text, so the model reads whose text follows


@dataclass
class Part:
    """One document of a collection, as its manifest records it."""

    name: str  # path relative to the folder given (or as given)
    sha256: str
    kind: str
    unit: str  # its own: page, section or line
    first_page: int  # the collection's page its first page is
    pages: int
    first_line: int  # the collection's line its own first line is (a text file's lines are cited)
    sections: list[str] | None = None

    def as_dict(self) -> dict:
        record = asdict(self)
        if self.sections is None:
            del record["sections"]
        return record


def documents_in(paths: list[Path]) -> list[tuple[Path, str, bool]]:
    """(file, name shown, named on the command line) for every document the paths give: files as
    they are, folders' readable files in natural order (named from the folder; with other paths
    beside it, from the folder's own name, so that two folders' a.pdf stay apart)."""
    found = []
    for path in paths:
        if not path.exists():
            raise RaError(f"{path}: no such file or folder")
        if path.is_dir():
            prefix = f"{path.resolve().name}/" if len(paths) > 1 else ""
            inside = [(file, prefix + file.relative_to(path).as_posix(), False) for file in _readable_files(path)]
            if not inside:
                raise RaError(f"{path}: no documents in this folder (ra reads {READ}), and it is not a context "
                              "made by `ra ingest`")
            found.extend(inside)
        else:
            found.append((path, path.name, True))
    if len(found) > MAX_DOCUMENTS:
        raise RaError(f"{len(found):,} documents: more than ra takes at once ({MAX_DOCUMENTS:,}); choose a smaller folder")
    return found


def _readable_files(folder: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(folder):
        # hidden folders, and contexts saved inside the folder (their manifest marks them), are not documents
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in NOT_WRITTEN_BY_HAND
                   and not any((Path(root) / d / marker).exists() for marker in ("manifest.json", "pyvenv.cfg"))]
        files.extend(Path(root) / name for name in names
                     if not name.startswith(".") and Path(name).suffix.lower() in READABLE)
    return sorted(files, key=lambda file: _natural(file.relative_to(folder).as_posix()))


def _natural(name: str) -> list:
    return [(0, int(piece), "") if piece.isdigit() else (1, 0, piece.lower()) for piece in re.split(r"(\d+)", name)]


def load_collection(paths: list[Path], encoding: str = "utf-8", on_skip: Callable[[str], None] | None = None,
                    on_page: Callable[[int, int], None] | None = None) -> Document:
    """The documents `paths` give (files, folders), read and joined as one Document of kind
    "collection" whose pages are its documents' pages in order; `parts` says whose they are."""
    documents: list[tuple[str, Document]] = []
    for file, name, named in documents_in(paths):
        try:
            documents.append((name, load_document(file, encoding, on_page)))
        except RaError as exc:
            if named:
                raise
            if on_skip is not None:
                on_skip(f"skipped {name}: {str(exc).removeprefix(str(file) + ': ')}")
    if not documents:
        raise RaError(f"none of the documents in {', '.join(str(p) for p in paths)} could be read")
    return _joined(documents, _collection_name(paths))


def _collection_name(paths: list[Path]) -> str:
    if len(paths) == 1:
        return f"{paths[0].resolve().name}/"
    return f"{paths[0].name} + {len(paths) - 1} more"


def _joined(documents: list[tuple[str, Document]], name: str) -> Document:
    texts, pages, parts = [], [], []
    offset, line = 0, 1  # where the next document starts: character, and line (1-based)
    digest = hashlib.sha256()
    for name_in, document in documents:
        digest.update(f"{name_in}\0{document.sha256}\0".encode())
        if texts:
            offset += len(PAGE_SEPARATOR)
            line += PAGE_SEPARATOR.count("\n")
        header = HEADER.format(name=name_in)
        base = offset + len(header)
        first_page = len(pages) + 1
        for page in document.pages:  # the header belongs to the first page
            start = offset if page is document.pages[0] else base + page.char_start
            pages.append(Page(len(pages) + 1, start, base + page.char_end, page.title))
        parts.append(Part(name_in, document.sha256, document.kind, document.unit, first_page, len(document.pages),
                          line + header.count("\n"),
                          [page.title for page in document.pages] if document.unit == "section" else None).as_dict())
        texts.append(header + document.text)
        offset = base + len(document.text)
        line += texts[-1].count("\n")
    return Document(name=name, sha256=digest.hexdigest(), kind="collection", text=PAGE_SEPARATOR.join(texts),
                    pages=pages, unit="page", parts=parts)
