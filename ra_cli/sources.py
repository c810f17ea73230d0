"""What `ra chat` and `ra eval` are pointed at, and the context store behind it: a saved context,
or a document (or a folder of them) whose context ra keeps in its cache, ingested when needed.

A document is read before any model loads, so a bad one fails fast — unless it was chatted with
before: its file's sha256 then names a cached context, and reading it again (a PDF's text
extraction takes seconds per hundred pages) is put off until the context turns out to be missing
for this model and these parameters."""

from __future__ import annotations

import glob
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ra_cli.collection import load_collection
from ra_cli.document import PIPED, Document, load_document, load_piped
from ra_cli.errors import RaError
from ra_cli.ingest import (IngestOptions, IngestResult, cached_context_path, cached_context_stem, context_limit_notice,
                           ingest, is_context)
from ra_cli.manifest import MANIFEST
from ra_cli.model import LoadedModel
from ra_cli.paths import contexts_dir
from ra_cli.store import ContextStore


@dataclass
class Source:
    context: Path | None = None  # a saved context
    document: Document | None = None  # a document read, to ingest unless its context is cached
    origin: Path | None = None  # the document's file or folder (None: a context, or a document piped in)
    unread_sha256: str = ""  # of a document file with a cached context, not read (yet)
    encoding: str = "utf-8"

    @property
    def name(self) -> str:
        return self.context.name if self.context else self.document.name if self.document else self.origin.name

    @property
    def sha256(self) -> str:
        """The document's, read or not."""
        return self.document.sha256 if self.document else self.unread_sha256


def resolve_source(path: Path, encoding: str = "utf-8", on_page=None, on_skip=None) -> Source:
    """A context (saved, or an ingest's partial one), a document, or a folder of documents (one
    collection; `on_skip` hears of files in it that cannot be read)."""
    path = Path(path)
    if str(path) == PIPED:
        return Source(document=read_piped(encoding))
    if is_context(path):
        return Source(context=path)
    if path.is_dir():
        return Source(document=load_collection([path], encoding, on_skip, on_page), origin=path)
    if not path.exists():
        raise RaError(f"{path}: no such file or context")
    if not path.is_file():  # a pipe given as a path: read once, as it is
        return Source(document=load_document(path, encoding, on_page))
    raw = path.read_bytes()  # hashed, and read as the document unless a cached context makes that needless
    sha256 = hashlib.sha256(raw).hexdigest()
    if cached_for_file(path.name, sha256):
        return Source(origin=path, unread_sha256=sha256, encoding=encoding)
    return Source(document=load_document(path, encoding, on_page, raw), origin=path)


def read_piped(encoding: str = "utf-8") -> Document:
    """The document piped in for `-`. A terminal on stdin pipes nothing: ra would wait for Ctrl-D."""
    if sys.stdin.isatty():
        raise RaError("-: nothing is piped in; pipe a document (cat notes.txt | ra chat -) or give its path")
    return load_piped(sys.stdin.buffer.read(), encoding)


def cached_for_file(name: str, sha256: str) -> bool:
    """Whether ra's cache holds a finished context of a document file of this name and sha256
    (made by any model: which one is asked for is known only once it loads)."""
    for path in contexts_dir().glob(glob.escape(cached_context_stem(name)) + "-*.idx"):
        try:
            document = json.loads((path / MANIFEST).read_text())["document"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(document, dict) and document.get("name") == name and document.get("sha256") == sha256:
            return True
    return False


def open_source(loaded: LoadedModel, source: Source, options: IngestOptions | None = None, on_progress=None,
                on_index=None, on_notice=None) -> tuple[ContextStore, IngestResult | None]:
    """The store behind a source: the saved context itself, or the document's cached context
    (ingested, or an interrupted ingest finished, when needed). The result is None when nothing
    was prefilled. `on_notice` hears when the context is longer than the model's trained context."""
    options = options or IngestOptions()
    if source.context is not None:
        store, result = ContextStore.open(source.context, loaded.fingerprint), None
    else:
        store, result = ensure_context(loaded, source, options, on_progress, on_index, on_notice)
    notice = context_limit_notice(loaded, store.n_tokens)
    if notice and on_notice is not None and result is None:  # an ingest already said it
        on_notice(notice)
    return store, result


def ensure_context(loaded: LoadedModel, source: Source, options: IngestOptions, on_progress=None, on_index=None,
                   on_notice=None) -> tuple[ContextStore, IngestResult | None]:
    """The cached context of a source's document, ingesting (or finishing an ingest) when needed;
    an unread document is read only then."""
    document = source.document
    path = cached_context_path(loaded, source.name, source.sha256, options)
    if (path / MANIFEST).is_file():
        try:
            return ContextStore.open(path, loaded.fingerprint), None
        except RaError:
            pass  # damaged cache entry: rebuild it below
    if document is None:
        document = load_document(source.origin, source.encoding)
        if document.sha256 != source.sha256:  # the file changed since it was hashed: key the context by what was read
            return ensure_context(loaded, Source(document=document, origin=source.origin), options, on_progress,
                                  on_index, on_notice)
    result = ingest(loaded, document, path, options, on_progress, on_index, on_notice)
    return ContextStore.open(path, loaded.fingerprint), result
