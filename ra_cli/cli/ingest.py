"""`ra ingest`: document -> prefilled KV + index on disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from ra_cli.cli import options as opt
from ra_cli.cli.steps import ingest_with_progress, load_model, read_documents


def ingest_command(
    documents: List[Path] = typer.Argument(..., help="Document to ingest (.pdf, .docx, .epub, .html, .txt, .md, any text file; "
                                                      "- for one piped in); several, or a folder of them, make one collection."),
    save: Optional[Path] = typer.Option(None, "--save", "-o", help="Context directory to write (default: ra's cache, used by `ra chat DOCUMENT`)."),
    chunk_size: Optional[int] = opt.ChunkSize,
    prefill: opt.PrefillMode = opt.Prefill,
    kv_dtype: opt.KvDtype = opt.KvDtypeOption,
    index: opt.IndexKind = opt.Index,
    sinks: int = typer.Option(128, "--sinks", min=0, help="First tokens kept on the device at chat time, never indexed."),
    window: int = typer.Option(512, "--window", min=0, help="Last tokens kept on the device at chat time, never indexed."),
    model: Optional[str] = opt.Model,
    device: str = opt.Device,
    dtype: opt.ComputeDtype = opt.Dtype,
    weights: opt.WeightFormat = opt.Weights,
    load_in_4bit: bool = opt.LoadIn4bit,
    load_in_8bit: bool = opt.LoadIn8bit,
    gpu_mem_gb: Optional[float] = opt.GpuMemGb,
    encoding: str = opt.Encoding,
    as_json: bool = opt.Json,
):
    """Extract text, prefill it in chunks and save the KV cache (resumable: rerun after Ctrl-C)."""
    from ra_cli.document import extent
    from ra_cli.index import IndexParams
    from ra_cli.ingest import IngestOptions, cached_context_path, ingest
    from ra_cli.ui import stderr

    doc = read_documents(documents, encoding)
    loaded = load_model(model, device, dtype, weights.value, opt.quantization(load_in_4bit, load_in_8bit), gpu_mem_gb)
    options = IngestOptions(chunk_size=chunk_size, kv_dtype=kv_dtype.value, prefill=prefill.value,
                            index=IndexParams(kind=index.value, sinks=sinks, window=window))
    out = save or cached_context_path(loaded, doc.name, doc.sha256, options)
    from ra_cli.ui import warn

    result = ingest_with_progress(lambda bar, layers: ingest(loaded, doc, out, options, bar, layers, warn), index.value,
                                  "interrupted; the finished chunks are kept — run the same command again to resume")
    summary = {
        "context": str(result.path), "document": doc.name, "documents": max(1, len(doc.parts)), "pages": len(doc.pages),
        "tokens": result.n_tokens,
        "reused_tokens": result.reused_tokens, "prefilled_tokens": result.prefilled_tokens, "index": index.value,
        "seconds": round(result.seconds, 3), "prefill_seconds": round(result.prefill_seconds, 3),
        "index_seconds": round(result.index_seconds, 3), "tokens_per_second": round(result.tokens_per_second, 1),
    }
    if as_json:
        print(json.dumps(summary))
        return
    if result.prefilled_tokens == 0 and result.index_seconds == 0:
        stderr.print(f"{result.path} already holds {doc.name} ({result.n_tokens:,} tokens) from the same model and "
                     "options; nothing to do", markup=False, highlight=False)
        return
    if result.prefilled_tokens == 0:  # an earlier run prefilled everything and stopped before the index was saved
        stderr.print(f"saved {result.n_tokens:,} tokens from {doc.name} to {result.path}: the prefill was already done "
                     f"(kept from the earlier run), index built in {result.index_seconds:.1f} s", markup=False, highlight=False)
        return
    resumed = f" (resumed after {result.reused_tokens:,})" if result.reused_tokens else ""
    size = extent(doc.unit, len(doc.pages), len(doc.parts))
    stderr.print(f"saved {result.n_tokens:,} tokens from {doc.name} ({size}) to {result.path}: "
                 f"prefilled {result.prefilled_tokens:,}{resumed} in {result.seconds:.1f} s, "
                 f"{result.tokens_per_second:,.0f} tok/s", markup=False, highlight=False)
