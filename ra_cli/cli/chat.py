"""`ra chat`: ask a stored context (or a document, ingested on first use) questions."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from ra_cli.cli import options as opt
from ra_cli.cli.steps import load_model, model_for, open_store, read_source
from ra_cli.choices import AttentionMode


def chat_command(
    source: Optional[Path] = typer.Argument(None, help="A context saved by `ra ingest`, a document (.pdf, .docx, .epub, .html, .txt, .md, "
                                                       "any text file), - for one piped in, or a folder of them; "
                                                       "with --resume, not needed (the session names its context; a question may stand here)."),
    question: Optional[str] = typer.Argument(None, help="Ask this and exit, as --ask does (`ra chat book.pdf \"Who signed it?\"`)."),
    ask: Optional[List[str]] = typer.Option(None, "--ask", "-a", help="Ask this and exit (repeatable; turns follow each other)."),
    resume: Optional[str] = typer.Option(None, "--resume", "-r", help="Continue a conversation saved with /save NAME (`ra sessions` lists them)."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n", min=1, help="Most tokens per answer."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", min=0.0, help="0 = greedy (default)."),
    top_p: float = typer.Option(1.0, "--top-p", max=1.0, callback=opt.positive, help="Nucleus sampling mass (with --temperature > 0)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for sampling."),
    repeat_penalty: float = typer.Option(1.0, "--repeat-penalty", callback=opt.positive,
                                         help="Penalise the answer's recent tokens (1.1 stops small models looping; 1 = off)."),
    raw: bool = typer.Option(False, "--raw", help="Append the text right after the document, no chat template (plain continuation)."),
    sources: bool = typer.Option(True, "--sources/--no-sources", help="Cite the pages (lines in text files) each answer's attention went to."),
    attention: AttentionMode = typer.Option(AttentionMode.retrieval, "--attention",
                                            help="retrieval (static set on the device + index search, default), full (all KV on the device), "
                                                 "flat (exact top-k search), or the context's index kind (graph, hnsw)."),
    top_k: Optional[int] = opt.TopK,
    ef: Optional[int] = opt.Ef,
    window: Optional[int] = typer.Option(None, "--window", min=0, help="Recent tokens kept on the device; older ones move into the index (default: as ingested, 512)."),
    coverage: float = opt.Coverage,
    dense_below: float = opt.DenseBelow,
    dense_when_cheaper: bool = opt.DenseWhenCheaper,
    exact_margin: float = opt.ExactMargin,
    sinks: Optional[int] = typer.Option(None, "--sinks", min=0, help="First tokens kept on the device; fixed when the document is ingested (default 128)."),
    index: opt.IndexKind = opt.Index,
    as_json: bool = typer.Option(False, "--json", help="One JSON object per answer on stdout."),
    chunk_size: Optional[int] = opt.ChunkSize,
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
    """Chat with a document: interactive, or one question (`ra chat book.pdf "Who signed it?"`, --ask for more).

    Each answer cites where its attention went: pages, sections (HTML, EPUB) or lines, by document in a folder."""
    from ra_cli.chat import start_chat
    from ra_cli.cli.repl import ReplSettings, questions_from_the_terminal, repl
    from ra_cli.document import PIPED
    from ra_cli.engine.generate import Sampling
    from ra_cli.errors import Interrupted, RaError
    from ra_cli.index import IndexParams
    from ra_cli.ingest import IngestOptions
    from ra_cli.retrieval.modes import settings_for
    from ra_cli.sessions import check_same_document, load_session, resume as resume_session, what_to_reopen
    from ra_cli.ui import status

    piped = source is not None and str(source) == PIPED
    if resume and source is not None and question is None and not source.exists() and not piped:
        source, question = None, str(source)  # `ra chat --resume NAME "And then?"`: the session names the context
    ask = ([question] if question is not None else []) + (ask or [])
    saved = load_session(resume) if resume else None
    if source is None and saved is None:
        raise typer.BadParameter("give a context or document to chat with (or --resume NAME)", param_hint="'SOURCE'")
    found = read_source(source if source is not None else what_to_reopen(saved), encoding)
    if source is None and found.context is None:  # the session's context was cleared: its document read again
        check_same_document(saved, found.sha256)
    if piped and not ask and not questions_from_the_terminal():
        raise RaError("the document came through stdin, so the questions cannot: give them with --ask "
                      "(or give the document's path)")
    loaded = load_model(model_for(found, model), device, dtype, weights.value,
                        opt.quantization(load_in_4bit, load_in_8bit), gpu_mem_gb)
    defaults = IndexParams()
    options = IngestOptions(chunk_size=chunk_size, kv_dtype=kv_dtype.value,
                            index=IndexParams(kind=index.value, sinks=defaults.sinks if sinks is None else sinks,
                                              window=defaults.window if window is None else window))
    store = open_store(loaded, found, options)
    settings = settings_for(store, top_k, ef, window, coverage, dense_below, sinks, dense_when_cheaper, exact_margin)
    session = start_chat(loaded, store, attention, settings)
    session.origin = saved.origin if saved is not None and saved.origin is not None else found.origin
    if getattr(session.cache, "retrieval_stats", None) and session.cache.retrieval_stats.dense_layers:
        status(dense_note(session.cache.retrieval_stats, len(store.layers), store.n_tokens))
    if saved is not None:
        resume_session(session, saved)
        status(f"resumed {saved.name!r}: {len(saved.marks)} turn(s), {len(saved.transcript):,} conversation tokens")
    interactive = not ask and sys.stdin.isatty() and sys.stdout.isatty()
    chat_settings = ReplSettings(max_new_tokens, Sampling(temperature=temperature, top_p=top_p, seed=seed,
                                                          repeat_penalty=repeat_penalty), raw, sources)

    def answer(question: str):
        result = stream_answer(session, question, chat_settings, as_json, spinner=interactive)
        if ask and result.stop_reason == "interrupted":
            raise Interrupted("interrupted; the answer above is incomplete")
        return result

    if ask:
        for question in ask:
            answer(question)
        return
    code = repl(session, chat_settings, answer, interactive)
    if code:
        raise typer.Exit(code)


def dense_note(stats, layers: int, tokens: int) -> str:
    """Which layers attend densely in this chat, and why (said once, at the start)."""
    cheaper = len(stats.cheaper_dense_layers)
    diffuse = len(stats.dense_layers) - cheaper
    reasons = ([f"{diffuse} too diffuse to retrieve"] if diffuse else []) + (
        [f"{cheaper} faster to read whole than to search at {tokens:,} tokens on this CPU "
         "(--search-every-layer searches them)"] if cheaper else [])
    return f"attention: {len(stats.dense_layers)} of {layers} layers dense — " + "; ".join(reasons)


def stream_answer(session, question: str, settings, as_json: bool, spinner: bool):
    """Ask, printing the answer as it comes (stdout), then a footer (stderr): speeds and sources."""
    from ra_cli.ui import status, stderr

    waiting = stderr.status("thinking…", spinner="dots") if spinner else None
    if waiting is not None:
        waiting.start()

    def on_text(piece: str) -> None:
        nonlocal waiting
        if waiting is not None:
            waiting.stop()
            waiting = None
        sys.stdout.write(piece)
        sys.stdout.flush()

    session.cite = settings.sources and not settings.raw
    try:
        result = session.ask(question, settings.max_new_tokens, settings.sampling, settings.raw,
                             on_text=None if as_json else on_text)
    finally:
        if waiting is not None:
            waiting.stop()
    if as_json:
        print(json.dumps(result.as_json()), flush=True)
        return result
    sys.stdout.write("\n")
    sys.stdout.flush()
    status(footer(result))
    if settings.sources and result.sources:
        status("sources: " + ", ".join(f"{s.label()} ({s.share:.0%})" for s in result.sources))
    return result


def footer(result) -> str:
    speed = f"{result.tokens_per_second:.1f} tok/s" if result.decode_steps else "-"
    if result.exact_steps:
        calls = "close call" if result.exact_steps == 1 else "close calls"
        speed += f" ({result.exact_steps} {calls} run again exactly)"
    note = " (stopped)" if result.stop_reason == "interrupted" else ""
    return (f"{result.tokens} tokens{note} · prompt {result.prompt_tokens} tokens at "
            f"{result.prompt_tokens_per_second:,.0f} tok/s · generation {speed} · {result.seconds:.2f} s")
