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
CoverageOpt = typer.Option(0.97, "--coverage", help="Per-layer retrieval budget: the smallest top-k whose keys held this much attention at ingest.")
DenseOpt = typer.Option(0.8, "--dense-below", help="Layers whose static + top-100 keys held less softmax mass than this at ingest attend densely (0 = never).")
IndexOpt = typer.Option("graph", "--index", help="Search index: graph (attention-aware, ours), hnsw (hnswlib on centred keys), flat (exact, nothing to build).")


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


def _check_ingest_options(chunk_size: int, kv_dtype: str, dtype: str, index: str = "graph") -> None:
    """Reject bad options before any slow work starts."""
    from ra_cli.index import KINDS
    from ra_cli.model import check_dtype_name

    check_dtype_name(dtype)
    if index not in KINDS:
        raise RaError(f"unknown --index '{index}'; choose {', '.join(KINDS)}")
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
    from ra_cli.ui import LayerProgress, TokenProgress

    layers = LayerProgress(f"{options.index.kind} index")
    try:
        with TokenProgress("prefill") as bar:
            return ingest(loaded, document, out, options, bar, layers)
    except KeyboardInterrupt:
        raise RaError("interrupted; the finished chunks are kept — run the same command again to resume")
    finally:
        layers.close()


@app.command("ingest")
@user_errors
def ingest_command(
    document: Path = typer.Argument(..., help="Document to ingest (.pdf, .txt, .md)."),
    save: Optional[Path] = typer.Option(None, "--save", "-o", help="Context directory to write (default: ra's cache, used by `ra chat DOCUMENT`)."),
    chunk_size: int = ChunkOpt,
    kv_dtype: str = KvDtypeOpt,
    index: str = IndexOpt,
    sinks: int = typer.Option(128, "--sinks", help="First tokens kept on the device at chat time, never indexed."),
    window: int = typer.Option(512, "--window", help="Last tokens kept on the device at chat time, never indexed."),
    model: Optional[str] = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    encoding: str = EncodingOpt,
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
):
    """Extract text, prefill it in chunks and save the KV cache (resumable: rerun after Ctrl-C)."""
    from ra_cli.index import IndexParams
    from ra_cli.ingest import IngestOptions, cached_context_path
    from ra_cli.ui import stderr

    _check_ingest_options(chunk_size, kv_dtype, dtype, index)
    doc = _load_document(document, encoding)
    loaded = _load_model(model, device, dtype)
    if sinks < 0 or window < 0:
        raise RaError("--sinks and --window must be at least 0")
    options = IngestOptions(chunk_size=chunk_size, kv_dtype=kv_dtype, index=IndexParams(kind=index, sinks=sinks, window=window))
    out = save or cached_context_path(loaded, doc, options)
    result = _run_ingest(loaded, doc, out, options)
    summary = {
        "context": str(result.path), "document": doc.name, "pages": len(doc.pages), "tokens": result.n_tokens,
        "reused_tokens": result.reused_tokens, "prefilled_tokens": result.prefilled_tokens, "index": index,
        "seconds": round(result.seconds, 3), "prefill_seconds": round(result.prefill_seconds, 3),
        "index_seconds": round(result.index_seconds, 3), "tokens_per_second": round(result.tokens_per_second, 1),
    }
    if as_json:
        print(json.dumps(summary))
    else:
        resumed = f" (resumed after {result.reused_tokens:,})" if result.reused_tokens else ""
        stderr.print(f"saved {result.n_tokens:,} tokens from {doc.name} ({len(doc.pages)} pages) to {result.path}: "
                     f"prefilled {result.prefilled_tokens:,}{resumed} in {result.seconds:.1f} s, "
                     f"{result.tokens_per_second:,.0f} tok/s")


def _open_source(source: Path, loaded, encoding: str, chunk_size: int, kv_dtype: str, index_params):
    """A saved context directory, or a document ingested into (or reused from) the cache."""
    from ra_cli.ingest import IngestOptions, ensure_context
    from ra_cli.store import MANIFEST, ContextStore, partial_path
    from ra_cli.ui import LayerProgress, TokenProgress, status

    if source.is_dir() or (not source.exists() and partial_path(source).exists()):
        if source.is_dir() and not (source / MANIFEST).exists() and not partial_path(source).exists():
            raise RaError(f"{source} is a directory but not an ra context; give a document or a context made by `ra ingest`")
        store = ContextStore.open(source, loaded.fingerprint)
        status(f"context {source}: {store.n_tokens:,} tokens of {store.manifest['document']['name']}")
        return store
    doc = _load_document(source, encoding)
    options = IngestOptions(chunk_size=chunk_size, kv_dtype=kv_dtype, index=index_params)
    layers = LayerProgress(f"{options.index.kind} index")
    try:
        with TokenProgress("prefill") as bar:
            store, result = ensure_context(loaded, doc, options, bar, layers)
    except KeyboardInterrupt:
        raise RaError("interrupted while ingesting; run the same command again to resume")
    finally:
        layers.close()
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
    attention: str = typer.Option("retrieval", "--attention", help="retrieval (static set on the device + index search, default), full (all KV on the device), flat (exact top-k search), or the context's index kind (graph, hnsw)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Keys retrieved per query head per layer (default: per-layer budget chosen at ingest)."),
    ef: Optional[int] = typer.Option(None, "--ef", help="Search beam width (default: calibrated per layer at ingest)."),
    window: Optional[int] = typer.Option(None, "--window", help="Recent tokens kept on the device; older ones move into the index (default: as ingested, 512)."),
    coverage: float = CoverageOpt,
    dense_below: float = DenseOpt,
    sinks: Optional[int] = typer.Option(None, "--sinks", help="First tokens kept on the device; fixed when the document is ingested (default 128)."),
    index: str = IndexOpt,
    as_json: bool = typer.Option(False, "--json", help="One JSON object per answer on stdout."),
    chunk_size: int = ChunkOpt,
    kv_dtype: str = KvDtypeOpt,
    model: Optional[str] = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    encoding: str = EncodingOpt,
):
    """Chat with a document: interactive, or scripted with --ask."""
    from ra_cli.index import IndexParams
    from ra_cli.chat import ChatSession, open_cache
    from ra_cli.engine.generate import Sampling
    from ra_cli.engine.retrieval import RetrievalSettings

    _check_ingest_options(chunk_size, kv_dtype, dtype, index)
    if max_new_tokens < 1:
        raise RaError("--max-new-tokens must be at least 1")
    if temperature < 0 or not 0 < top_p <= 1 or repeat_penalty <= 0:
        raise RaError("--temperature must be >= 0, --top-p in (0, 1] and --repeat-penalty > 0")
    if attention not in ("retrieval", "full", "flat", "graph", "hnsw"):
        raise RaError(f"unknown --attention '{attention}'; choose retrieval, full, flat, graph or hnsw")
    if (top_k is not None and top_k < 1) or (ef is not None and ef < 1) or (window or 0) < 0 or (sinks or 0) < 0:
        raise RaError("--top-k and --ef must be at least 1, --window and --sinks at least 0")
    if not source.exists() and not source.with_name(source.name + ".partial").exists():
        raise RaError(f"{source}: no such file or context")
    loaded = _load_model(model, device, dtype)
    defaults = IndexParams()
    index_params = IndexParams(kind=index, sinks=defaults.sinks if sinks is None else sinks,
                               window=defaults.window if window is None else window)
    store = _open_source(source, loaded, encoding, chunk_size, kv_dtype, index_params)
    stored = store.manifest.get("index", {}).get("params", {})
    if sinks is not None and stored and stored["sinks"] != sinks:
        raise RaError(f"{source} was ingested with --sinks {stored['sinks']}; sinks are fixed at ingest — "
                      "ingest again to change them")
    settings = RetrievalSettings(top_k=top_k, ef=ef, window=stored.get("window", index_params.window) if window is None else window,
                                 dense_below=dense_below, coverage=coverage)
    session = ChatSession(loaded, store, open_cache(loaded, store, attention, settings),
                          rebuild=(lambda: open_cache(loaded, store, attention, settings)) if attention != "full" else None)
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
            try:
                answer(line)
            except RaError as exc:
                stderr.print(f"[bold red]error:[/bold red] {exc}")


def parse_tokens(text: str) -> int:
    """'16k' -> 16384, '128K' -> 131072, '5000' -> 5000."""
    value = text.strip().lower()
    try:
        return int(float(value[:-1]) * 1024) if value.endswith("k") else int(value)
    except ValueError:
        raise RaError(f"cannot read '{text}' as a token count; use e.g. 4096, 16k or 128k")


@app.command("bench")
@user_errors
def bench_command(
    recall: bool = typer.Option(False, "--recall", help="Index quality: Recall@100 and keys scanned vs hnswlib and exact search."),
    decode_step: bool = typer.Option(False, "--decode-step", help="CPU cost of one decode step of one layer: retrieval vs exact attention."),
    shape: str = typer.Option("smollm2", "--shape", help="Layer shape for --decode-step: smollm2 or llama3-8b."),
    context: str = typer.Option("16k", "--context", help="Context length in tokens (e.g. 8k, 16k, 32k)."),
    document: Optional[Path] = typer.Option(None, "--document", help="Text to use (default: the shipped sample, repeated)."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Comma-separated layers to evaluate (default: every 4th), or 'all'."),
    queries: int = typer.Option(256, "--queries", help="Held-out decode-time queries."),
    query_stride: int = typer.Option(16, "--query-stride", help="Graph build: sample every n-th prefill query."),
    baseline_ingest: bool = typer.Option(False, "--baseline-ingest", help="With --recall: also time the same prefill without any index."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    model: Optional[str] = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
):
    """Measure ra: index recall and cost (--recall), or one decode step's cost (--decode-step)."""
    from ra_cli.ui import TokenProgress, status

    if recall == decode_step:
        raise RaError("choose what to measure: --recall or --decode-step")
    if decode_step:
        from ra_cli.bench.decode import SHAPES, DecodeStepConfig, run_decode_step_bench

        if shape not in SHAPES:
            raise RaError(f"unknown --shape '{shape}'; choose {', '.join(SHAPES)}")
        report = run_decode_step_bench(DecodeStepConfig(keys=parse_tokens(context), shape=shape, queries=min(queries, 256)),
                                       status=status)
        if as_json:
            print(json.dumps(report))
        else:
            from ra_cli.ui import stderr

            for key, value in report.items():
                stderr.print(f"  {key:24s} {value}")
        return
    from ra_cli.bench.recall import RecallBenchConfig, run_recall_bench

    from ra_cli.index import IndexParams

    config = RecallBenchConfig(context=parse_tokens(context), queries=queries, document=document,
                               params=IndexParams(query_stride=query_stride), baseline_ingest=baseline_ingest)
    if layers and layers != "all":
        try:
            config.layers = [int(part) for part in layers.split(",")]
        except ValueError:
            raise RaError("--layers takes comma-separated layer numbers, e.g. 2,15,28, or 'all'")
    loaded = _load_model(model, device, dtype)
    if layers == "all":
        from ra_cli.engine.cache import layer_windows

        config.layers = [i for i, w in enumerate(layer_windows(loaded.model.config)) if w is None]
    with TokenProgress("prefill") as bar:
        report = run_recall_bench(loaded, config, on_progress=bar, status=status)
    if as_json:
        print(json.dumps(report))
    else:
        _print_recall_table(report)


def _print_recall_table(report: dict) -> None:
    from rich.table import Table

    from ra_cli.ui import stderr

    table = Table(title=f"Recall@100 on {report['context_tokens']:,} tokens ({report['indexed_keys']:,} indexed keys, "
                        f"{report['held_out_queries']} held-out queries, layers {report['layers']})")
    for column in ("index", "recall@100", "worst head", "evaluations/query", "scanned", "evals for 0.95", "build s", "bytes"):
        table.add_column(column, justify="right")
    for kind, row in report["indexes"].items():
        at = row["evaluations_at_target"]
        table.add_row(kind, f"{row['recall_at_100']:.3f}", f"{row['worst_head_recall_at_100']:.3f}",
                      f"{row['evaluations_per_query']:,.0f}", f"{row['scanned_fraction']:.1%}",
                      "-" if at is None else f"{at:,.0f}", f"{row['build_seconds']:.1f}", f"{row['index_bytes']:,}")
    stderr.print(table)
    stderr.print(f"hnsw/graph evaluations at 0.95: {report['hnsw_to_graph_scan_ratio']}; "
                 f"centred hnsw/graph: {report['hnsw_centered_to_graph_scan_ratio']}")
    for layer, mass in report["attention_mass"].items():
        stderr.print(f"layer {layer}: static mass {mass['static_mean']:.3f} (min head {mass['static_min_head']:.3f}), "
                     f"static+top100 {mass['static_top100_mean']:.3f} (min head {mass['static_top100_min_head']:.3f})")


@app.command("eval")
@user_errors
def eval_command(
    source: Path = typer.Argument(..., help="A context saved by `ra ingest`, or a document."),
    tokens: int = typer.Option(64, "--tokens", help="Teacher-forced continuation tokens per prompt."),
    attention: str = typer.Option("retrieval", "--attention", help="Mode compared with full attention: retrieval or flat."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Keys retrieved per query head per layer (default: per-layer budget chosen at ingest)."),
    ef: Optional[int] = typer.Option(None, "--ef", help="Search beam width (default: calibrated per layer)."),
    coverage: float = CoverageOpt,
    dense_below: float = DenseOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    chunk_size: int = ChunkOpt,
    model: Optional[str] = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    encoding: str = EncodingOpt,
):
    """Fidelity of retrieval attention against full attention on the same context."""
    from ra_cli.bench.fidelity import EvalConfig, run_eval
    from ra_cli.engine.retrieval import RetrievalSettings
    from ra_cli.index import IndexParams
    from ra_cli.ui import stderr, status

    _check_ingest_options(chunk_size, "auto", dtype)
    if attention not in ("retrieval", "flat", "graph", "hnsw"):
        raise RaError(f"unknown --attention '{attention}'; choose retrieval, flat, graph or hnsw")
    if tokens < 1 or (top_k is not None and top_k < 1) or (ef is not None and ef < 1):
        raise RaError("--tokens, --top-k and --ef must be at least 1")
    if not source.exists():
        raise RaError(f"{source}: no such file or context")
    loaded = _load_model(model, device, dtype)
    store = _open_source(source, loaded, encoding, chunk_size, "auto", IndexParams())
    window = store.manifest["index"]["params"]["window"]
    report = run_eval(loaded, store, EvalConfig(tokens=tokens, attention=attention,
                                                settings=RetrievalSettings(top_k=top_k, ef=ef, window=window,
                                                                           dense_below=dense_below, coverage=coverage)), status)
    if as_json:
        print(json.dumps(report))
        return
    stderr.print(f"{report['context_tokens']:,} tokens, {report['indexed_keys']:,} indexed keys per head; "
                 f"{report['attention']} attention, top-k {report['top_k'] or 'per layer'}")
    for name in ("token_agreement", "kl_mean", "mass_coverage", "recall_at_k", "scanned_fraction",
                 "keys_scanned_per_search", "ms_per_token_full", "ms_per_token_retrieval"):
        stderr.print(f"  {name:24s} {report[name]}")
