"""`ra chat`: ask a stored context (or a document, ingested on first use) questions."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from ra_cli.cli import options as opt
from ra_cli.cli.steps import load_model, open_store, read_source
from ra_cli.choices import AttentionMode


def chat_command(
    source: Path = typer.Argument(..., help="A context saved by `ra ingest`, or a document (.pdf, .txt, .md)."),
    ask: Optional[List[str]] = typer.Option(None, "--ask", "-a", help="Ask this and exit (repeatable; turns follow each other)."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n", min=1, help="Most tokens per answer."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", min=0.0, help="0 = greedy (default)."),
    top_p: float = typer.Option(1.0, "--top-p", max=1.0, callback=opt.positive, help="Nucleus sampling mass (with --temperature > 0)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for sampling."),
    repeat_penalty: float = typer.Option(1.0, "--repeat-penalty", callback=opt.positive,
                                         help="Penalise the answer's recent tokens (1.1 stops small models looping; 1 = off)."),
    raw: bool = typer.Option(False, "--raw", help="Append the text right after the document, no chat template (plain continuation)."),
    attention: AttentionMode = typer.Option(AttentionMode.retrieval, "--attention",
                                            help="retrieval (static set on the device + index search, default), full (all KV on the device), "
                                                 "flat (exact top-k search), or the context's index kind (graph, hnsw)."),
    top_k: Optional[int] = opt.TopK,
    ef: Optional[int] = opt.Ef,
    window: Optional[int] = typer.Option(None, "--window", min=0, help="Recent tokens kept on the device; older ones move into the index (default: as ingested, 512)."),
    coverage: float = opt.Coverage,
    dense_below: float = opt.DenseBelow,
    sinks: Optional[int] = typer.Option(None, "--sinks", min=0, help="First tokens kept on the device; fixed when the document is ingested (default 128)."),
    index: opt.IndexKind = opt.Index,
    as_json: bool = typer.Option(False, "--json", help="One JSON object per answer on stdout."),
    chunk_size: int = opt.ChunkSize,
    kv_dtype: opt.KvDtype = opt.KvDtypeOption,
    model: Optional[str] = opt.Model,
    device: str = opt.Device,
    dtype: opt.ComputeDtype = opt.Dtype,
    weights: opt.WeightFormat = opt.Weights,
    load_in_4bit: bool = opt.LoadIn4bit,
    load_in_8bit: bool = opt.LoadIn8bit,
    gpu_mem_gb: Optional[float] = opt.GpuMemGb,
    encoding: str = opt.Encoding,
):
    """Chat with a document: interactive, or scripted with --ask."""
    from ra_cli.chat import start_chat
    from ra_cli.engine.generate import Sampling
    from ra_cli.index import IndexParams
    from ra_cli.ingest import IngestOptions
    from ra_cli.retrieval.modes import settings_for

    found = read_source(source, encoding)
    loaded = load_model(model, device, dtype, weights.value, opt.quantization(load_in_4bit, load_in_8bit), gpu_mem_gb)
    defaults = IndexParams()
    options = IngestOptions(chunk_size=chunk_size, kv_dtype=kv_dtype.value,
                            index=IndexParams(kind=index.value, sinks=defaults.sinks if sinks is None else sinks,
                                              window=defaults.window if window is None else window))
    store = open_store(loaded, found, options)
    settings = settings_for(store, top_k, ef, window, coverage, dense_below, sinks)
    session = start_chat(loaded, store, attention, settings)
    sampling = Sampling(temperature=temperature, top_p=top_p, seed=seed, repeat_penalty=repeat_penalty)

    def answer(question: str) -> None:
        from ra_cli.ui import status

        result = session.ask(question, max_new_tokens, sampling, raw,
                             on_text=None if as_json else (lambda piece: (sys.stdout.write(piece), sys.stdout.flush())))
        if as_json:
            print(json.dumps(result.as_json()), flush=True)
            return
        sys.stdout.write("\n")
        sys.stdout.flush()
        note = " (stopped)" if result.stop_reason == "interrupted" else ""
        status(f"{result.tokens} tokens in {result.seconds:.2f} s, {result.tokens_per_second:.1f} tok/s{note}")

    if ask:
        for question in ask:
            answer(question)
        return
    from ra_cli.cli.repl import repl

    repl(session, answer)
