"""Benchmark text and contexts: the shipped documents, a text cut or repeated to N tokens, and
ingests of it cached by content, so that repeated benchmark runs reuse them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ra_cli.document import Document, load_document
from ra_cli.errors import RaError
from ra_cli.index import IndexParams
from ra_cli.ingest import IngestOptions, IngestResult, store_header, write_context
from ra_cli.paths import contexts_dir
from ra_cli.prompt import layout_for
from ra_cli.store import ContextStore

DATA = Path(__file__).resolve().parents[1] / "data"  # package data: works from a normal install
SAMPLE = DATA / "ra-handbook.md"
# Real English, ~35K tokens of distinct text in all (sources and licences: data/corpus/README.md)
CORPUS = tuple(DATA / "corpus" / name for name in ("gpl-3.0.txt", "python-execution-model.txt",
                                                     "vim-user-manual.txt", "apache-2.0.txt", "mpl-2.0.txt"))


def bench_text(document: Path | None, default: str = "sample") -> tuple[str, str]:
    """(name, text) of a benchmark's document: the one given, else the shipped sample (`sample`)
    or the shipped corpus joined (`corpus`)."""
    if document is not None:
        path = Path(document)
        if not path.is_file():
            raise RaError(f"benchmark document {path} not found; pass --document FILE")
        return path.name, load_document(path).text
    if default == "corpus":
        return "corpus", "\n\n".join(load_document(path).text for path in CORPUS)
    return SAMPLE.name, load_document(SAMPLE).text


def context_tokens(loaded, text: str, total: int) -> tuple[list[int], dict]:
    """Template opening + document tokens, the document repeated until `total` tokens exist."""
    layout = layout_for(loaded.tokenizer)
    doc_ids = loaded.tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids
    ids = [layout.bos_token_id] if layout.bos_token_id is not None else []
    ids += loaded.tokenizer(layout.opening, add_special_tokens=False).input_ids if layout.opening else []
    while len(ids) < total:
        ids.extend(doc_ids)
    return ids[:total], layout.as_dict()


@dataclass
class BenchContext:
    store: ContextStore
    continuation: list[int]  # the tokens that follow the context in the text: decode-time inputs
    result: IngestResult | None  # None when the ingest came from the cache


def cached_context(loaded, name: str, text: str, context: int, following: int, params: IndexParams,
                   chunk_size: int | None = None, on_progress=None, on_index=None, prefill: str = "auto") -> BenchContext:
    """The first `context` tokens of `text` (repeated as needed) ingested as `ra ingest` would,
    cached under a key of tokens, model and parameters; plus the `following` tokens after them."""
    tokens, layout = context_tokens(loaded, text, context + following)
    return cached_tokens(loaded, name, tokens, layout, context, params, chunk_size, on_progress, on_index, prefill)


def random_tokens(loaded, count: int, seed: int = 0) -> tuple[list[int], dict]:
    """Token ids for a model without a tokenizer (synthetic weights): seeded, uniform."""
    import numpy as np

    from ra_cli.prompt import PromptLayout

    vocab = loaded.model.config.get_text_config(decoder=True).vocab_size
    ids = np.random.default_rng(seed).integers(0, vocab, count).tolist()
    return ids, PromptLayout("plain", "", "", "", "").as_dict()


def cached_tokens(loaded, name: str, tokens: list[int], layout: dict, context: int, params: IndexParams,
                  chunk_size: int | None = None, on_progress=None, on_index=None, prefill: str = "auto") -> BenchContext:
    """tokens[:context] ingested (cached by content), tokens[context:] returned as the continuation."""
    prefix, continuation = tokens[:context], tokens[context:]
    options = IngestOptions(chunk_size=chunk_size, index=params, prefill=prefill)
    key = hashlib.sha256(json.dumps([prefix, loaded.fingerprint.digest, options.content_params(str(loaded.dtype))],
                                    default=str).encode()).hexdigest()[:16]
    path = contexts_dir() / f"bench-{Path(name).stem[:24]}-{context}-{key}.idx"
    result = None
    if not (path / "manifest.json").is_file():
        document = Document(name=f"{name} (bench)", sha256=key, kind="text", text="")
        header = store_header(loaded, document, options, layout)
        result = write_context(loaded, prefix, [0] * len(prefix), header, path, options, on_progress, on_index)
    return BenchContext(ContextStore.open(path, loaded.fingerprint), continuation, result)
