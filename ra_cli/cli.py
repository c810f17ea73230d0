"""`ra` command line: thin wrappers over ingest / chat / bench. Answers go to stdout, status to stderr."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from ra_cli.errors import RaError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Chat with long documents on one machine, with retrieval attention over an on-disk KV cache.")

ModelOpt = typer.Option(None, "--model", "-m", envvar="RA_MODEL",
                        help="Model: 'smollm2' (embedded, default), a .gguf file, a model directory, or a cached HF id.")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N")
DtypeOpt = typer.Option("auto", "--dtype", help="Compute dtype: auto (float32 on CPU, bf16/fp16 on GPU), float32, float16, bfloat16.")
EncodingOpt = typer.Option("utf-8", "--encoding", help="Encoding of .txt/.md files (default: strict UTF-8).")
ChunkOpt = typer.Option(512, "--chunk-size", help="Tokens per prefill chunk.")
KvDtypeOpt = typer.Option("auto", "--kv-dtype", help="Stored KV dtype: auto (= compute dtype), float32, float16, bfloat16.")


def user_errors(command):
    """Show RaError as one line on stderr with exit code 1, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except RaError as exc:
            from ra_cli.ui import stderr

            stderr.print(f"[bold red]error:[/bold red] {exc}", soft_wrap=True)
            raise typer.Exit(1)

    return wrapper


def _check_ingest_options(chunk_size: int, kv_dtype: str, dtype: str) -> None:
    """Reject bad options before any slow work starts."""
    from ra_cli.model import check_dtype_name

    check_dtype_name(dtype)
    if chunk_size < 1:
        raise RaError("--chunk-size must be at least 1")
    if kv_dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise RaError(f"unknown --kv-dtype '{kv_dtype}'; use auto, float32, float16 or bfloat16")


def _load_document(path: Path, encoding: str):
    from ra_cli.document import load_document
    from ra_cli.ui import page_progress

    if path.suffix.lower() == ".pdf" and path.is_file():
        with page_progress(f"reading {path.name}") as on_page:
            return load_document(path, encoding, on_page)
    return load_document(path, encoding)


def _load_model(model: Optional[str], device: str, dtype: str):
    from ra_cli.model import load_model
    from ra_cli.ui import status

    loaded = load_model(model, device=device, dtype=dtype)
    status(f"model {loaded.fingerprint.source} on {loaded.device} ({loaded.fingerprint.dtype}), loaded in {loaded.load_seconds:.1f} s")
    return loaded


def _run_ingest(loaded, document, out, options):
    from ra_cli.ingest import ingest
    from ra_cli.ui import TokenProgress

    try:
        with TokenProgress("prefill") as bar:
            return ingest(loaded, document, out, options, bar)
    except KeyboardInterrupt:
        raise RaError(f"interrupted; the finished chunks are kept — run the same command again to resume")


@app.command("ingest")
@user_errors
def ingest_command(
    document: Path = typer.Argument(..., help="Document to ingest (.pdf, .txt, .md)."),
    save: Optional[Path] = typer.Option(None, "--save", "-o", help="Context directory to write (default: ra's cache, used by `ra chat DOCUMENT`)."),
    chunk_size: int = ChunkOpt,
    kv_dtype: str = KvDtypeOpt,
    model: Optional[str] = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    encoding: str = EncodingOpt,
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
):
    """Extract text, prefill it in chunks and save the KV cache (resumable: rerun after Ctrl-C)."""
    from ra_cli.ingest import IngestOptions, cached_context_path
    from ra_cli.ui import stderr

    _check_ingest_options(chunk_size, kv_dtype, dtype)
    doc = _load_document(document, encoding)
    loaded = _load_model(model, device, dtype)
    options = IngestOptions(chunk_size=chunk_size, kv_dtype=kv_dtype)
    out = save or cached_context_path(loaded, doc, options)
    result = _run_ingest(loaded, doc, out, options)
    summary = {
        "context": str(result.path), "document": doc.name, "pages": len(doc.pages), "tokens": result.n_tokens,
        "reused_tokens": result.reused_tokens, "prefilled_tokens": result.prefilled_tokens,
        "seconds": round(result.seconds, 3), "tokens_per_second": round(result.tokens_per_second, 1),
    }
    if as_json:
        print(json.dumps(summary))
    else:
        resumed = f" (resumed after {result.reused_tokens:,})" if result.reused_tokens else ""
        stderr.print(f"saved {result.n_tokens:,} tokens from {doc.name} ({len(doc.pages)} pages) to {result.path}: "
                     f"prefilled {result.prefilled_tokens:,}{resumed} in {result.seconds:.1f} s, "
                     f"{result.tokens_per_second:,.0f} tok/s")


def _open_source(source: Path, loaded, encoding: str, chunk_size: int, kv_dtype: str):
    """A saved context directory, or a document ingested into (or reused from) the cache."""
    from ra_cli.ingest import IngestOptions, ensure_context
    from ra_cli.store import MANIFEST, ContextStore, partial_path
    from ra_cli.ui import TokenProgress, status

    if source.is_dir() or (not source.exists() and partial_path(source).exists()):
        if source.is_dir() and not (source / MANIFEST).exists() and not partial_path(source).exists():
            raise RaError(f"{source} is a directory but not an ra context; give a document or a context made by `ra ingest`")
        store = ContextStore.open(source, loaded.fingerprint)
        status(f"context {source}: {store.n_tokens:,} tokens of {store.manifest['document']['name']}")
        return store
    doc = _load_document(source, encoding)
    options = IngestOptions(chunk_size=chunk_size, kv_dtype=kv_dtype)
    try:
        with TokenProgress("prefill") as bar:
            store, result = ensure_context(loaded, doc, options, bar)
    except KeyboardInterrupt:
        raise RaError("interrupted while ingesting; run the same command again to resume")
    if result is None:
        status(f"reused {store.n_tokens:,}/{store.n_tokens:,} tokens of {doc.name} from the cache")
    else:
        status(f"reused {result.reused_tokens:,}/{result.n_tokens:,} tokens; prefilled {result.prefilled_tokens:,} "
               f"in {result.seconds:.1f} s ({result.tokens_per_second:,.0f} tok/s)")
    return store


HELP_TEXT = """commands:
  /help    this help
  /clear   forget the conversation, keep the document
  /stats   tokens, timing and memory
  /exit    leave (Ctrl-D works too); Ctrl-C stops a reply"""


@app.command("chat")
@user_errors
def chat_command(
    source: Path = typer.Argument(..., help="A context saved by `ra ingest`, or a document (.pdf, .txt, .md)."),
    ask: Optional[List[str]] = typer.Option(None, "--ask", "-a", help="Ask this and exit (repeatable; turns follow each other)."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n", help="Most tokens per answer."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy (default)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (with --temperature > 0)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for sampling."),
    repeat_penalty: float = typer.Option(1.0, "--repeat-penalty", help="Penalise the answer's recent tokens (1.1 stops small models looping; 1 = off)."),
    raw: bool = typer.Option(False, "--raw", help="Append the text right after the document, no chat template (plain continuation)."),
    attention: str = typer.Option("full", "--attention", help="Attention at decode: full (exact, all KV on the device)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per answer on stdout."),
    chunk_size: int = ChunkOpt,
    kv_dtype: str = KvDtypeOpt,
    model: Optional[str] = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    encoding: str = EncodingOpt,
):
    """Chat with a document: interactive, or scripted with --ask."""
    from ra_cli.chat import ChatSession, full_attention_cache
    from ra_cli.engine.generate import Sampling

    _check_ingest_options(chunk_size, kv_dtype, dtype)
    if max_new_tokens < 1:
        raise RaError("--max-new-tokens must be at least 1")
    if temperature < 0 or not 0 < top_p <= 1 or repeat_penalty <= 0:
        raise RaError("--temperature must be >= 0, --top-p in (0, 1] and --repeat-penalty > 0")
    if attention != "full":
        raise RaError(f"unknown --attention '{attention}'; choose full")
    if not source.exists() and not source.with_name(source.name + ".partial").exists():
        raise RaError(f"{source}: no such file or context")
    loaded = _load_model(model, device, dtype)
    store = _open_source(source, loaded, encoding, chunk_size, kv_dtype)
    session = ChatSession(loaded, store, full_attention_cache(loaded, store))
    sampling = Sampling(temperature=temperature, top_p=top_p, seed=seed, repeat_penalty=repeat_penalty)

    def answer(question: str) -> None:
        streaming = not as_json
        result = session.ask(question, max_new_tokens, sampling, raw,
                             on_text=(lambda piece: (sys.stdout.write(piece), sys.stdout.flush())) if streaming else None)
        if as_json:
            print(json.dumps(result.as_json()), flush=True)
        else:
            sys.stdout.write("\n")
            sys.stdout.flush()
            from ra_cli.ui import status

            note = " (stopped)" if result.stop_reason == "interrupted" else ""
            status(f"{result.tokens} tokens in {result.seconds:.2f} s, {result.tokens_per_second:.1f} tok/s{note}")

    if ask:
        for question in ask:
            answer(question)
        return
    _repl(session, answer)


def _repl(session, answer) -> None:
    from ra_cli.ui import stderr

    stderr.print(f"[dim]{session.document_tokens:,} document tokens ready. /help for commands.[/dim]")
    while True:
        try:
            stderr.print("[bold green]>>> [/bold green]", end="")
            line = input()
        except EOFError:
            stderr.print()
            return
        except KeyboardInterrupt:
            stderr.print("\n[dim](use /exit or Ctrl-D to leave)[/dim]")
            continue
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit", "/bye"):
            return
        if line == "/help":
            stderr.print(HELP_TEXT)
        elif line == "/clear":
            session.clear()
            stderr.print("[dim]conversation cleared; the document is kept[/dim]")
        elif line == "/stats":
            stderr.print(json.dumps(session.stats(), indent=1))
        elif line.startswith("/"):
            stderr.print(f"unknown command {line.split()[0]}; /help lists them")
        else:
            answer(line)
